"""Progress of long work, as a person wants to see it: what runs, how far, how fast, how long is left.

Every stage reports through ``Meter`` (counts of a known or unknown total) and ``say`` (one line). The lines go to
the ``dermray.progress`` logger, which the CLI shows on the console and writes to the stage's log file: in job logs
and the file at most one line per ``every_s`` seconds per meter, plus the last; on a terminal a meter's line is
redrawn in place every ``LIVE_EVERY_S`` until its last (records marked ``live``; ``console_only`` ones go nowhere
else: dermray/runtime/console.py).
"""
from __future__ import annotations

import logging
import time

from dermray.core import formatting

log = logging.getLogger("dermray.progress")
LIVE_EVERY_S = 0.5  # a terminal's live line: often enough to look alive, rarely enough to cost nothing


def say(message: str, *args) -> None:
    log.info(message, *args)


class Meter:
    """Counts towards ``total`` (None when unknown) of ``unit``; ``update(n)`` logs at most every ``every_s``."""

    def __init__(self, label: str, total: int | None, unit: str = "images", every_s: float = 5.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.done = 0
        self.t0 = time.monotonic()
        self._last = self._last_live = self.t0
        self.extra = ""

    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        if self.total:
            pct = 100.0 * self.done / self.total
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            head = f"{self.label}: {self.done:,} / {self.total:,} {self.unit} ({pct:.0f}%)"
            tail = (f", ETA {formatting.duration(left)}" if self.done < self.total
                    else f", {formatting.duration(time.monotonic() - self.t0)}")
        else:
            head, tail = f"{self.label}: {self.done:,} {self.unit}", ""
        return f"{head}, {formatting.rate(rate)} {self.unit}/s{tail}{self.extra}"

    def update(self, n: int = 1, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        last = force or bool(self.total and self.done >= self.total)
        if last or now - self._last >= self.every_s:
            self._last = self._last_live = now
            # Not the last line: a terminal redraws it in place; the log file and job logs keep it as a line.
            log.info("%s", self.line(), extra={"meter": self.label, "live": not last})
        elif now - self._last_live >= LIVE_EVERY_S:
            self._last_live = now
            log.info("%s", self.line(), extra={"meter": self.label, "live": True, "console_only": True})


class Relay:
    """Progress lines from Ray workers to the driver's console: workers ``put`` lines on a Ray queue (an actor
    with no CPU), a driver thread logs them as the driver's own ``dermray.progress`` lines. (Ray forwards worker
    output to the driver too, but mixed with everything else its workers print; the console shows only these.)"""

    def __init__(self):
        import threading

        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._seen: set[str] = set()  # the ONCE lines already shown
        self._status: dict[str, str] = {}  # the latest STATUS of each worker, shown only after a silence
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="dermray-progress-relay", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                self._heartbeat()
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone: the run is ending
                return
            self._show(line)

    def _show(self, line: str) -> None:
        if line.startswith(STATUS):  # where a worker is: kept, and shown (with the others') after a silence
            key, _, text = line[len(STATUS):].partition("\x00")
            self._status.pop("", None)  # the driver's own "starting" status: the workers speak for themselves now
            self._status[key] = text
            self._heartbeat()
            return
        if line.startswith(ONCE):  # the same note from every worker (e.g. the precision chosen): shown once
            line = line[len(ONCE):]
            if line in self._seen:
                return
            self._seen.add(line)
        self._last = time.monotonic()
        self._status.clear()  # a line supersedes every status sent before it (no stale "epoch 3/3" later)
        log.info("%s", line)

    def starting(self, text: str) -> None:
        """The driver's status until the first worker sends its own (shown after a silence, like theirs)."""
        self._status[""] = text

    def _heartbeat(self) -> None:
        """After QUIET_S seconds without a line, one line of every worker's latest status (issue 29: 2 minutes
        of silence inside the first epochs); nothing while lines come."""
        if self._status and time.monotonic() - self._last >= QUIET_S:
            texts = [self._status[k] for k in sorted(self._status)]
            head = texts[0].split(": ", 1)[0] + ": "  # "train: ": said once when every status starts with it
            head = head if all(t.startswith(head) for t in texts) else ""
            log.info("%s", head + "; ".join(t[len(head):] for t in texts))
            # Shown: cleared - but the driver's "starting" status stays until a worker speaks (a slow start is
            # said again after the next silence, not left silent).
            self._status = {k: v for k, v in self._status.items() if k == ""}
            self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                self._show(line)
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - best effort at the end of a run
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


ONCE = "\x00once\x00"  # a relayed line that the driver shows the first time only
STATUS = "\x00status\x00"  # a relayed status (STATUS + key + "\x00" + text): shown only after a silence
QUIET_S = 12.0


def status(queue, key: str, text: str) -> None:
    """Worker side: where ``key`` (a fold) is now; the driver shows it only when the console has been quiet."""
    if queue is not None:
        relay(queue, f"{STATUS}{key}\x00{text}")


def relay(queue, line: str) -> None:
    """Worker side: hand ``line`` to the driver (or log it here when there is no relay)."""
    if queue is None:
        log.info("%s", line.removeprefix(ONCE))
        return
    try:
        queue.put_nowait(line)
    except Exception:  # noqa: BLE001 - progress must never fail training
        log.info("%s", line)
