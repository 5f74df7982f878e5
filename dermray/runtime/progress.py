"""Progress of long work, as a person wants to see it: what runs, how far, how fast, how long is left.

Every stage reports through ``Meter`` (counts of a known or unknown total) and ``say`` (one line). The lines go to
the ``dermray.progress`` logger, which the CLI shows on the console and writes to the stage's log file: in job logs
and the file at most one line per ``every_s`` seconds per meter, plus the last; on a terminal a meter's line is
redrawn in place every ``LIVE_EVERY_S`` until its last (records marked ``live``; ``console_only`` ones go nowhere
else: dermray/runtime/console.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Callable, Iterator, Mapping, Union

from dermray.core import formatting

log = logging.getLogger("dermray.progress")
LIVE_EVERY_S = 0.5  # a terminal's live line: often enough to look alive, rarely enough to cost nothing
QUIET_S = 13.0  # the longest the console stays silent while something runs (issue 29: at most 15 s)


def say(message: str, *args) -> None:
    log.info(message, *args)


def to_log_only(message: str, *args) -> None:
    """A line for the log file, not the console (detail behind a line the console shows)."""
    log.info(message, *args, extra={"file_only": True})


# What runs now, innermost last: a text ("evaluate: running"), said with the time since it began after a silence,
# or a callable that returns the lines to say then (a Relay: where its workers are), or none when it has nothing.
Activity = Union[str, Callable[[], list[str]]]
_activities: list[tuple[Activity, float]] = []
_last_shown = [time.monotonic()]


def shown() -> None:
    """The console just showed a line (called by the console's filter)."""
    _last_shown[0] = time.monotonic()


_lead = [""]  # what the console's next line begins with (the pipeline's "[2/5] "), taken by that line


@contextlib.contextmanager
def leading(prefix: str, otherwise: str) -> Iterator[None]:
    """While the block runs, the console's next line begins with ``prefix``; a block that said nothing on the console
    says ``otherwise`` at its end. (Issue 29: a line of its own for each stage's start was 5 of the demo's 47.)"""
    _lead[0] = prefix
    try:
        yield
    except BaseException:
        _lead[0] = ""
        raise
    unsaid, _lead[0] = _lead[0], ""
    if unsaid:
        say(otherwise)


def take_lead() -> str:
    """The prefix for the console line being shown now ("" when none is pending); called by the console's filter."""
    lead, _lead[0] = _lead[0], ""
    return lead


@contextlib.contextmanager
def working(what: Activity) -> Iterator[None]:
    """While the block runs, a silence of QUIET_S seconds on the console is broken by ``what``."""
    entry = (what, time.monotonic())
    _activities.append(entry)
    try:
        yield
    finally:
        _activities.remove(entry)


def break_silence() -> None:
    """If the console has been quiet for QUIET_S seconds while something runs: the innermost activity's lines (a
    callable's, when it has any), else the innermost text with the time it has run. Called by ``Watchdog``."""
    now = time.monotonic()
    if not _activities or now - _last_shown[0] < QUIET_S:
        return
    for what, _ in reversed(list(_activities)):
        lines = what() if callable(what) else []
        if lines:
            for line in lines:
                log.info("%s", line)
            _last_shown[0] = time.monotonic()
            return
    text, since = next(((w, t) for w, t in reversed(list(_activities)) if isinstance(w, str)), (None, now))
    if text is not None:
        log.info("%s (%s so far)", text, formatting.duration(now - since))
    _last_shown[0] = time.monotonic()


class Watchdog:
    """A thread that breaks the console's silences (``break_silence``) while a command runs."""

    def __init__(self, every_s: float = 0.5):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), name="dermray-silence", daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                break_silence()
            except Exception:  # noqa: BLE001 - progress must never fail a run
                pass

    def __enter__(self):
        shown()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Meter:
    """Counts towards ``total`` (None when unknown) of ``unit``; ``update(n)`` logs at most every ``every_s``.
    ``quick_to_log``: when the count is done before its first line was due, that last line goes to the log file
    only (a step that took no time is not worth a console line)."""

    def __init__(self, label: str, total: int | None, unit: str = "images", every_s: float = 10.0,
                 quick_to_log: bool = False):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.quick_to_log = quick_to_log
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
            quick = last and self.quick_to_log and self._last == self.t0 and now - self.t0 < self.every_s
            # An in-between line while the console speaks anyway (a status line a moment ago) goes to the log file
            # only (issue 29: the demo's console was over its 40 lines).
            spoke = not last and now - _last_shown[0] < self.every_s
            self._last = self._last_live = now
            # Not the last line: a terminal redraws it in place; the log file and job logs keep it as a line.
            log.info("%s", self.line(), extra={"meter": self.label, "live": not last, "file_only": quick or spoke})
        elif now - self._last_live >= LIVE_EVERY_S:
            self._last_live = now
            log.info("%s", self.line(), extra={"meter": self.label, "live": True, "console_only": True})


class Relay:
    """Progress lines from Ray workers to the driver's console: workers ``put`` lines on a Ray queue (an actor
    with no CPU), a driver thread logs them as the driver's own ``dermray.progress`` lines. (Ray forwards worker
    output to the driver too, but mixed with everything else its workers print; the console shows only these.)

    Besides plain lines, workers send a STATUS (where one is now: said only to break a silence, all workers'
    in one line) and GATHER records (one per worker on a topic, e.g. an epoch's figures): the driver says one
    line per topic, made by ``mergers[kind]``, once ``workers`` records are in, or at the next silence."""

    def __init__(self, workers: int = 1, mergers: Mapping[str, Callable[[list[dict]], list[str]]] | None = None):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._init_state(workers, mergers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="dermray-progress-relay", daemon=True)
        self._working = working(self.quiet_lines)
        self._working.__enter__()
        self._thread.start()

    def _init_state(self, workers: int, mergers: Mapping | None) -> None:
        self.workers, self.mergers = workers, dict(mergers or {})
        self._seen: set[str] = set()  # the ONCE lines already shown
        self._status: dict[str, str] = {}  # the latest STATUS of each worker, shown only after a silence
        self._gathered: dict[str, list[dict]] = {}  # topic -> the records in so far (in arrival order)
        self._said: dict[str, tuple[int, set]] = {}  # topic -> (records already said, the lines they made)
        self._lock = threading.Lock()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone: the run is ending
                return
            self._show(line)

    def _show(self, line: str) -> None:
        with self._lock:
            if line.startswith(STATUS):  # where a worker is: kept, and shown (with the others') after a silence
                key, _, text = line[len(STATUS):].partition("\x00")
                self._status.pop("", None)  # the driver's own "starting" status: the workers speak for themselves
                self._status[key] = text
                return
            if line.startswith(GATHER):
                topic, _, rest = line[len(GATHER):].partition("\x00")
                key, _, record = rest.partition("\x00")
                self._status.pop(key, None)  # what it sends now supersedes where it said it was
                records = self._gathered.setdefault(topic, [])
                records.append(json.loads(record))
                if len(records) + self._said.get(topic, (0, set()))[0] < self.workers:
                    return
                lines = self._merge(topic)
                if not lines:
                    return
            elif line.startswith(ONCE):  # the same note from every worker: shown once
                line = line[len(ONCE):]
                if line in self._seen:
                    return
                self._seen.add(line)
                lines = [line]
            else:
                lines = [line]
            self._status.clear()  # a line supersedes every status sent before it (no stale "epoch 3/3" later)
            for text in lines:
                log.info("%s", text)

    def _merge(self, topic: str) -> list[str]:
        """The lines of a topic's records in so far; a topic said in part at a silence is completed by the late
        records alone, and a line it said already (the same precision from the late fold) is not said again."""
        records = self._gathered.pop(topic)
        kind = topic.split(" ", 1)[0]
        merge = self.mergers.get(kind)
        count, shown = self._said.get(topic, (0, set()))
        lines = [line for line in (merge(records) if merge else [str(r) for r in records]) if line not in shown]
        self._said[topic] = (count + len(records), shown | set(lines))
        return lines

    def starting(self, text: str) -> None:
        """The driver's status until the first worker sends its own (shown after a silence, like theirs)."""
        self._status[""] = text

    def quiet_lines(self) -> list[str]:
        """What breaks a silence: the topics gathered so far (a worker that is behind is not waited for), else one
        line of every worker's latest status; nothing when there is nothing new. The driver's "starting" status
        stays until a worker speaks (a slow start is said again after the next silence)."""
        with self._lock:
            if self._gathered:
                return [text for topic in list(self._gathered) for text in self._merge(topic)]
            if not self._status:
                return []
            texts = [self._status[k] for k in sorted(self._status)]
            head = texts[0].split(": ", 1)[0] + ": "  # "train: ": said once when every status starts with it
            head = head if all(t.startswith(head) for t in texts) else ""
            self._status = {k: v for k, v in self._status.items() if k == ""}
            return [head + "; ".join(t[len(head):] for t in texts)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                self._show(line)
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - best effort at the end of a run
            pass
        with self._lock:
            rest = [text for topic in list(self._gathered) for text in self._merge(topic)]
        for text in rest:
            log.info("%s", text)
        self._working.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


ONCE = "\x00once\x00"  # a relayed line that the driver shows the first time only
STATUS = "\x00status\x00"  # a relayed status (STATUS + key + "\x00" + text): shown only after a silence
GATHER = "\x00gather\x00"  # GATHER + topic + "\x00" + key + "\x00" + JSON: one line per topic, all workers'


def status(queue, key: str, text: str) -> None:
    """Worker side: where ``key`` (a fold) is now; the driver shows it only when the console has been quiet."""
    if queue is not None:
        relay(queue, f"{STATUS}{key}\x00{text}")


def gather(queue, topic: str, key: str, record: dict) -> None:
    """Worker side: worker ``key``'s record on ``topic`` ("<kind> <id>": the driver merges one kind's records with
    its ``mergers[kind]``)."""
    if queue is not None:
        relay(queue, f"{GATHER}{topic}\x00{key}\x00{json.dumps(record)}")


def relay(queue, line: str) -> None:
    """Worker side: hand ``line`` to the driver (or log it here when there is no relay)."""
    if queue is None:
        log.info("%s", line.removeprefix(ONCE))
        return
    try:
        queue.put_nowait(line)
    except Exception:  # noqa: BLE001 - progress must never fail training
        log.info("%s", line)
