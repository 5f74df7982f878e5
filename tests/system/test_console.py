"""What a person sees on the console: errors in one line, a progress meter that redraws one line on a terminal and
prints plain lines elsewhere, dermray's lines only unless -v. (The demo pipeline's console is judged in
tests/system/test_pipeline.py, on the module's one demo run.)"""
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
RAY_NOISE = ("Starting execution of Dataset", "worker processes have been started", "constructor arguments",
             "Execution plan", "Traceback", "checkpoint_", "WARNING", "(raylet)", "pid=")


def test_a_user_error_is_one_line_and_the_version_is_printed(tmp_path):
    """Errors are one line on the console (the details in the log file); --version names the release and commit."""
    cmd = [sys.executable, "-m", "dermray.cli", "lineage", "--output", str(tmp_path / "nothing"), "--run-id", "r"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "no stage outputs" in run.stderr
    version = subprocess.run([sys.executable, "-m", "dermray.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("dermray 0.1.0")


METERED = """
import sys, time
from dermray.runtime import console, progress
with console.session("t", verbose=False) as c:
    meter = progress.Meter("work", 6, every_s=60)
    for i in range(6):
        time.sleep(0.6)
        meter.update()
        if i == 2:
            progress.say("a line between")
    print("in the log only")
print("log:", c.log_path)
"""


def _run_on(stream: str, tmp_path) -> tuple[str, str]:
    """METERED with its stdout and stderr on a pseudo-terminal ("tty") or on pipes; (console text, log text)."""
    import os
    import pty

    if stream == "tty":
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-c", METERED], stdout=slave, stderr=slave, cwd=tmp_path)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.wait(60) == 0
        text = b"".join(chunks).decode().replace("\r\n", "\n")  # the terminal's own line endings
    else:
        run = subprocess.run([sys.executable, "-c", METERED], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        text = run.stdout + run.stderr
    log = pathlib.Path(re.search(r"log: (\S+)", text).group(1))
    return text, log.read_text()


def _screen(raw: bytes, columns: int = 100) -> list[str]:
    """The lines a terminal shows after ``raw`` (its text and control sequences), as a VT100 emulator draws them."""
    import pyte

    screen = pyte.Screen(columns, 40)
    pyte.ByteStream(screen).feed(raw)
    return [line.rstrip() for line in screen.display if line.strip()]


def test_on_a_terminal_a_meter_is_one_live_line_and_elsewhere_plain_lines(tmp_path):
    """On a terminal the meter redraws one line in place about twice a second, other lines print above it, and its
    last line stays: the screen, as a terminal emulator draws it, holds the line between, the meter's last line
    and nothing of its earlier states. In job logs (pipes) and in the log file only the lines that last (here: the
    line between and the meter's last, every_s being 60 s)."""
    tty, tty_log = _run_on("tty", tmp_path)
    assert all(f"work: {k} / 6 images" in tty for k in range(1, 6)), repr(tty)  # drawn as it went
    shown = _screen(tty.replace("\n", "\r\n").encode())  # the pty's own line endings (onlcr)
    assert shown[0] == "a line between", shown
    assert re.match(r"work: 6 / 6 images \(100%\), ", shown[1]) and shown[2].startswith("log: "), shown
    assert len(shown) == 3, shown  # the meter's earlier states were drawn over, in place
    piped, piped_log = _run_on("pipe", tmp_path)
    assert "\r" not in piped and "\x1b" not in piped
    assert [ln for ln in piped.splitlines() if ln.startswith("work:")] == [
        next(ln for ln in piped.splitlines() if ln.startswith("work: 6 / 6"))]
    assert "a line between" in piped and "in the log only" not in piped
    for log in (tty_log, piped_log):
        assert len([ln for ln in log.splitlines() if "work: " in ln]) == 1 and "in the log only" in log


OTHERS = """
import logging, sys
from dermray.runtime import console, progress
with console.session("t", verbose=sys.argv[1] == "-v") as c:
    logging.getLogger("ray.data").warning("a line of Ray's")
    print("printed by a library")
    progress.say("a line of dermray's")
print("log:", c.log_path)
"""


def test_minus_v_shows_everything_on_the_console_and_the_default_only_dermray_lines(tmp_path):
    quiet, verbose = (subprocess.run([sys.executable, "-c", OTHERS, flag], capture_output=True, text=True,
                                     timeout=60, cwd=tmp_path) for flag in ("", "-v"))
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    console_text = quiet.stdout + quiet.stderr
    assert "a line of dermray's" in console_text
    assert "a line of Ray's" not in console_text and "printed by a library" not in console_text
    log = pathlib.Path(re.search(r"log: (\S+)", quiet.stdout).group(1)).read_text()
    assert "a line of Ray's" in log and "printed by a library" in log and "a line of dermray's" in log
    everything = verbose.stdout + verbose.stderr
    assert all(s in everything for s in ("a line of Ray's", "printed by a library", "a line of dermray's"))
    assert "log: None" in verbose.stdout  # -v keeps no log file: the console is the log
