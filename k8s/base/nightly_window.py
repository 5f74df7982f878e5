"""The nightly RayJob's entrypoint wrapper: the starting deadline that KubeRay's RayCronJob lacks.

    python nightly_window.py COMMAND [ARGS...]

Runs COMMAND (os.execvp: its exit status is the job's) when started within DERMRAY_NIGHTLY_WINDOW_S seconds after
the most recent time of DERMRAY_NIGHTLY_SCHEDULE ("M H * * *", daily) in DERMRAY_NIGHTLY_TIME_ZONE. Started later -
a RayCronJob catching up after operator downtime, or a feature gate turned on long after the object was created -
it prints one line saying which night it skips and exits 0, before the command starts any GPU work. Scoring is
incremental, so the next scheduled night scores what a skipped one would have. Exits 2 on a bad setting.
Standard library only: it runs on the Ray head, in the dermray image, before dermray is imported.
"""
import datetime as dt
import os
import re
import sys

USAGE = "usage: nightly_window.py COMMAND [ARGS...]"


def zone(name: str) -> dt.tzinfo:
    if name in ("UTC", "Etc/UTC"):
        return dt.timezone.utc
    from zoneinfo import ZoneInfo  # needs the OS tz database for other zones

    return ZoneInfo(name)


def last_schedule(schedule: str, tz: dt.tzinfo, now: dt.datetime) -> dt.datetime:
    """The most recent time at or before `now` that a daily "M H * * *" schedule fired."""
    m = re.fullmatch(r"\s*(\d{1,2})\s+(\d{1,2})\s+\*\s+\*\s+\*\s*", schedule)
    if not m or int(m.group(1)) > 59 or int(m.group(2)) > 23:
        raise ValueError(f"DERMRAY_NIGHTLY_SCHEDULE must be a daily 'M H * * *' schedule, got {schedule!r}")
    local = now.astimezone(tz)
    fired = local.replace(hour=int(m.group(2)), minute=int(m.group(1)), second=0, microsecond=0)
    if fired > local:
        fired -= dt.timedelta(days=1)
    return fired


def decide(now: dt.datetime, schedule: str, tz_name: str, window_s: int) -> tuple[bool, str]:
    """(run?, the line to log)."""
    fired = last_schedule(schedule, zone(tz_name), now)
    late = (now - fired).total_seconds()
    when = f"{fired:%Y-%m-%d %H:%M} {tz_name}"
    if late <= window_s:
        return True, f"nightly window: started {late / 60:.0f} min after the {when} schedule: running"
    return False, (f"nightly window: started {late / 3600:.1f} h after the {when} schedule (window "
                   f"{window_s / 3600:.1f} h): a stale launch (missed schedule), skipped; the next night scores "
                   "every image not yet scored")


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        window_s = int(os.environ.get("DERMRAY_NIGHTLY_WINDOW_S", ""))
        run, line = decide(dt.datetime.now(dt.timezone.utc), os.environ.get("DERMRAY_NIGHTLY_SCHEDULE", ""),
                           os.environ.get("DERMRAY_NIGHTLY_TIME_ZONE", "Etc/UTC"), window_s)
    except Exception as e:  # a bad setting: fail the job loudly rather than skip or run every launch
        print(f"nightly window: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(line, flush=True)
    if not run:
        return 0
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
