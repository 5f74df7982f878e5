"""The entrypoint wrapper of dermray's RayJobs (the nightly scoring and training):

    python entrypoint.py [--night] [--deadline-s N] -- COMMAND [ARGS...]

- --night: COMMAND runs only for a night that the launcher (k8s/base/launch_nightly.py) scheduled: the head's
  DERMRAY_NIGHTLY_SCHEDULED_FOR (the scheduled time, ISO 8601, set by the launcher) must be at most
  DERMRAY_NIGHTLY_WINDOW_S seconds ago. A RayJob copied from the nightly template any other way (the suspended
  RayCronJob replaying missed schedules after someone un-suspends it), or whose cluster came up too late, is refused
  before any GPU work: one line saying why, exit 4, and the RayJob fails - a skipped night is visible, never a
  success.
- --deadline-s N: COMMAND is stopped N seconds after it started (SIGTERM to its process group, SIGKILL --grace-s
  later, 60 by default): one line, exit 124. KubeRay's activeDeadlineSeconds only marks a RayJob failed.
- Logs: COMMAND's output (stdout and stderr merged) is copied to this process's stdout, which Ray keeps as the job's
  log, and to <output>/logs/<run_id>/<start, UTC>-<host>.log, with output and run_id read from the --config file
  that COMMAND is given. The file is written again every DERMRAY_LOG_UPLOAD_S seconds (300) and at the end, through
  fsspec (s3:// or a local path). Each attempt (a retry on a new cluster, a resubmission after the head restarted)
  writes a file of its own, so the driver log of a failed attempt outlives its cluster. A log that cannot be written
  is reported once on stderr and never fails the job.
Exit status: COMMAND's (128 + N when a signal N ended it); 2 on a bad setting; 4 a refused night; 124 the deadline.
Runs on the Ray head, in the dermray image (PyYAML and fsspec come with dermray's dependencies).
"""
import argparse
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

REFUSED, DEADLINE, BAD_SETTING = 4, 124, 2


def night_check(now: dt.datetime, env: dict) -> tuple[bool, str]:
    """(run?, the line to log) for the night that the launcher scheduled (env: the head's environment)."""
    window_s = int(env.get("DERMRAY_NIGHTLY_WINDOW_S", ""))
    scheduled = env.get("DERMRAY_NIGHTLY_SCHEDULED_FOR", "")
    if not scheduled:
        return False, ("nightly: DERMRAY_NIGHTLY_SCHEDULED_FOR is not set: this RayJob was not created by the nightly "
                       "launcher (a copy of the template, e.g. the RayCronJob replaying missed schedules): refused")
    fired = dt.datetime.fromisoformat(scheduled.replace("Z", "+00:00"))
    if fired.tzinfo is None:
        raise ValueError(f"DERMRAY_NIGHTLY_SCHEDULED_FOR {scheduled!r} has no time zone")
    late = (now - fired).total_seconds()
    if late < -300:
        return False, f"nightly: scheduled for {scheduled}, {-late / 60:.0f} min from now: refused"
    if late > window_s:
        return False, (f"nightly: started {late / 3600:.1f} h after the night scheduled for {scheduled} (window "
                       f"{window_s / 3600:.1f} h): a stale launch, refused; the next night scores every image not "
                       "yet scored")
    return True, f"nightly: started {max(late, 0) / 60:.0f} min after the night scheduled for {scheduled}: running"


def log_uri(command: list[str], start: dt.datetime, host: str) -> str | None:
    """Where this attempt's log goes: <output>/logs/<run_id>/<start>-<host>.log of COMMAND's --config file."""
    if "--config" not in command[:-1]:
        return None
    import yaml

    with open(command[command.index("--config") + 1]) as f:
        tree = yaml.safe_load(f) or {}
    output, run_id = tree.get("output"), tree.get("run_id")
    if not output or not run_id:
        return None
    return f"{str(output).rstrip('/')}/logs/{run_id}/{start:%Y%m%dT%H%M%SZ}-{host}.log"


class LogCopy:
    """COMMAND's output, line by line, to stdout and a local file that is copied to `uri` now and then."""

    def __init__(self, uri: str | None, every_s: float):
        self.uri, self.every_s = uri, every_s
        self.local = tempfile.NamedTemporaryFile(prefix="dermray-log-", suffix=".log", delete=False)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.warned = False
        self.uploader = threading.Thread(target=self._periodic, daemon=True)

    def pump(self, stream) -> None:
        for line in iter(stream.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            with self.lock:
                self.local.write(line)

    def upload(self) -> None:
        if not self.uri:
            return
        try:
            import fsspec

            with self.lock:
                self.local.flush()
            with open(self.local.name, "rb") as src, fsspec.open(self.uri, "wb", auto_mkdir=True) as dst:
                shutil.copyfileobj(src, dst)
        except Exception as e:  # a log that cannot be written never fails the job
            if not self.warned:
                print(f"entrypoint: cannot write the log to {self.uri}: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
                self.warned = True

    def _periodic(self) -> None:
        while not self.done.wait(self.every_s):
            self.upload()

    def close(self) -> None:
        self.done.set()
        self.upload()
        self.local.close()
        os.unlink(self.local.name)


def run(command: list[str], deadline_s: float | None, grace_s: float, log: LogCopy) -> int:
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def forward(signum, _frame):  # `ray job stop` signals this process: pass it on to COMMAND's process group
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    pump = threading.Thread(target=log.pump, args=(child.stdout,), daemon=True)
    pump.start()
    log.uploader.start()
    try:
        child.wait(timeout=deadline_s)
        status = child.returncode if child.returncode >= 0 else 128 - child.returncode
    except subprocess.TimeoutExpired:
        print(f"entrypoint: deadline: {deadline_s:.0f} s after the start: stopping {command[0]} (SIGTERM, then "
              f"SIGKILL after {grace_s:.0f} s)", flush=True)
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        status = DEADLINE
    try:
        os.killpg(child.pid, signal.SIGKILL)  # what COMMAND left behind in its group
    except ProcessLookupError:
        pass
    pump.join(timeout=10)
    return status


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: entrypoint.py [--night] [--deadline-s N] [--grace-s N] -- COMMAND [ARGS...]", file=sys.stderr)
        return BAD_SETTING
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="entrypoint.py")
    parser.add_argument("--night", action="store_true")
    parser.add_argument("--deadline-s", type=float)
    parser.add_argument("--grace-s", type=float, default=60.0)
    opts, command = parser.parse_args(argv[:cut]), argv[cut + 1:]
    start = dt.datetime.now(dt.timezone.utc)
    try:
        if opts.night:
            go, line = night_check(start, dict(os.environ))
            print(line, flush=True)
            if not go:
                return REFUSED
        uri = log_uri(command, start, socket.gethostname())
        every_s = float(os.environ.get("DERMRAY_LOG_UPLOAD_S", "300"))
    except Exception as e:  # a bad setting fails the job loudly rather than running unguarded
        print(f"entrypoint: {type(e).__name__}: {e}", file=sys.stderr)
        return BAD_SETTING
    print(f"entrypoint: log: {uri or 'none (no output/run_id in the --config file)'}"
          + (f"; deadline {opts.deadline_s:.0f} s" if opts.deadline_s else ""), flush=True)
    log = LogCopy(uri, every_s)
    try:
        return run(command, opts.deadline_s, opts.grace_s, log)
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
