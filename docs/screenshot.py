"""The README's picture of the demo's report: its first screen at a laptop's width, rendered by headless Chromium.

    make demo && make screenshot        # or: .venv/bin/python docs/screenshot.py [path/to/report.html]

Writes docs/img/report.png (1280 x 800). Needs Debian's chromium (apt-get install chromium).
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
REPORT = REPO / "outputs" / "demo" / "metrics" / "demo" / "report.html"
OUT = REPO / "docs" / "img" / "report.png"
WIDTH, HEIGHT = 1280, 800


def main(argv: list[str]) -> int:
    report = pathlib.Path(argv[0]) if argv else REPORT
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not report.exists():
        print(f"screenshot: no report at {report} (run `make demo` first)", file=sys.stderr)
        return 2
    if exe is None:
        print("screenshot: Debian's chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dr-chromium-") as profile:
        run = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                              f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={OUT}", report.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120)
    if run.returncode != 0 or not OUT.exists():
        print(f"screenshot: chromium failed: {run.stderr[-500:]}", file=sys.stderr)
        return 1
    print(f"screenshot: {OUT.relative_to(REPO)} ({OUT.stat().st_size / 1024:.0f} KiB) from {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
