"""What a person sees while a command runs: dermray's own lines on the console, everything (Ray's execution plans,
worker start-up warnings, C++ core-worker messages, checkpoint chatter) in a log file beside the stage's outputs.

``session(...)`` (the CLI wraps every command in it):
- points the process's stdout and stderr file descriptors at a local log file, so that whatever Ray and its C++
  core print lands there, and keeps the original terminal (or job log) for the console;
- breaks any silence of ``progress.QUIET_S`` seconds with what is running (``progress.working``);
- sends the ``dermray.*`` loggers' INFO lines (progress, "pipeline [2/5] train: running ...") to the console's
  stderr (stdout carries the summary, or the --json document, alone) and every logger's lines to the log file;
- at the end, copies the log file to ``<stage folder>/logs/<command>-<UTC time>.log`` (local or S3) and, on a
  failure, says where it is.
``-v`` turns all of this off: everything on the console, as Ray prints it. When stdout is not a real file (a test
capturing it), nothing is redirected; the same lines still go to the log file.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import tempfile
from typing import TextIO

from dermray.runtime import progress

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Console:
    """The streams for people: ``out`` (summaries, progress) and ``err`` (one-line errors)."""

    def __init__(self, out, err, log_path: str | None):
        self.out, self.err, self.log_path = out, err, log_path

    @property
    def is_terminal(self) -> bool:
        return hasattr(self.out, "isatty") and self.out.isatty()


class _DermrayLines(logging.Filter):
    """dermray's INFO lines, less a meter's in-between refreshes (``console_only``) unless ``live`` shows them."""

    def __init__(self, live: bool = False):
        super().__init__()
        self.live = live

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console_only", False) and not self.live or getattr(record, "file_only", False):
            return False
        if record.name.startswith("dermray") and record.levelno >= logging.INFO:
            progress.shown()  # the console's silences are measured from here (progress.break_silence)
            # A live meter's redraw does not take the pipeline's "[2/5] " (its lasting lines do).
            record.lead = "" if getattr(record, "console_only", False) else progress.take_lead()
            return True
        return False


class _LeadFormatter(logging.Formatter):
    """The message, after the prefix the console's filter gave it (progress.leading); the log file has none."""

    def format(self, record: logging.LogRecord) -> str:
        return getattr(record, "lead", "") + super().format(record)


class _NotConsoleOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "console_only", False)


class _Terminal(logging.Handler):
    """A terminal's console, drawn by rich: a meter's line (records marked ``live``) is one line redrawn in place
    (``rich.live.Live``, cut to the terminal's width so that it never wraps) until its last line, which stays; any
    other line is printed above the live one, whole (the terminal wraps a long path)."""

    def __init__(self, stream):
        from rich.console import Console as RichConsole

        super().__init__()
        # No markup, highlighting or emoji: dermray's lines are shown as they are, with their brackets and colons.
        self.console = RichConsole(file=stream, force_terminal=True, highlight=False, markup=False, emoji=False)
        self.live = None

    @staticmethod
    def _one_line(msg: str):
        from rich.text import Text

        return Text(msg, no_wrap=True, overflow="ellipsis")

    def _end_live(self, keep: bool) -> None:
        if self.live is not None:
            self.live.transient = not keep  # a transient Live erases its line when it stops
            self.live.stop()
            self.live = None

    def emit(self, record: logging.LogRecord) -> None:
        from rich.live import Live

        try:
            msg = self.format(record)
            if getattr(record, "live", False):
                if self.live is None:
                    self.live = Live(self._one_line(msg), console=self.console, auto_refresh=False,
                                     redirect_stdout=False, redirect_stderr=False)
                    self.live.start()
                self.live.update(self._one_line(msg), refresh=True)
                return
            if getattr(record, "meter", None) is not None:  # a meter's last line replaces the live one
                self._end_live(keep=False)
            self.console.print(msg, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the command ended with a meter unfinished: keep its last state
            self._end_live(keep=True)
        super().close()


def console_handler(stream) -> logging.Handler:
    """The handler for dermray's lines on ``stream``: live meters on a terminal, plain lines elsewhere."""
    terminal = hasattr(stream, "isatty") and stream.isatty()
    handler = _Terminal(stream) if terminal else logging.StreamHandler(stream)
    handler.setFormatter(_LeadFormatter("%(message)s"))
    handler.addFilter(_DermrayLines(live=terminal))
    return handler


def _real_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def session(command: str, verbose: bool):
    """The console and log file of one command (see the module docstring). Yields a ``Console``."""
    root = logging.getLogger()
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=FORMAT, force=True)
        yield Console(sys.stdout, sys.stderr, None)
        return
    fd, path = tempfile.mkstemp(prefix=f"dermray-{command}-", suffix=".log")
    os.close(fd)
    log_file = open(path, "a", buffering=1, encoding="utf-8")
    redirect = _real_fd(sys.stdout, 1) and _real_fd(sys.stderr, 2)
    saved = []
    out: TextIO
    err: TextIO
    if redirect:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        out = os.fdopen(os.dup(1), "w", buffering=1)
        err = os.fdopen(os.dup(2), "w", buffering=1)
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    else:
        out, err = sys.stdout, sys.stderr
    to_file = logging.StreamHandler(log_file)
    to_file.setFormatter(logging.Formatter(FORMAT))
    to_file.addFilter(_NotConsoleOnly())
    to_console = console_handler(err)  # progress on stderr: stdout carries the summary (or --json) alone
    old = (root.level, list(root.handlers))
    root.handlers = [to_file, to_console]
    root.setLevel(logging.INFO)
    logging.getLogger("dermray").setLevel(logging.INFO)
    try:
        with progress.Watchdog():
            yield Console(out, err, path)
    finally:
        root.handlers, root.level = old[1], old[0]
        to_console.close()
        log_file.flush()
        if redirect:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in saved:
                os.close(f)
            out.flush()
            err.flush()
        log_file.close()


def keep_log(console: Console, stage_dir: str | None, command: str) -> str | None:
    """Copy the command's log file beside its outputs (``<stage_dir>/logs/``); returns where it went (or the
    local file when there is no stage folder or the copy fails)."""
    if not console.log_path:
        return None
    if not stage_dir:
        return console.log_path
    from dermray.errors import UserError
    from dermray.store import storage

    name = f"{command}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.log"
    uri = storage.join(stage_dir, "logs", name)
    try:
        with open(console.log_path, "rb") as f:
            storage.write_bytes(uri, f.read())
    except (UserError, OSError):
        return console.log_path
    os.unlink(console.log_path)
    return uri
