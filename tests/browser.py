"""A real headless browser for the tests that look at what a person sees: Debian's chromium renders a page, runs a
check script in it, and takes a screenshot."""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({alt: i.alt, src: i.src.slice(0, 80),
                                                      width: i.naturalWidth, height: i.naturalHeight}));
  const cards = Array.from(document.querySelectorAll('.card')).map(c => ({task: c.dataset.task,
      text: c.innerText}));
  const pre = document.createElement('pre');
  pre.id = 'dermray-check';
  pre.textContent = JSON.stringify({images: imgs, cards: cards, title: document.title,
                                    first_screen: document.body.innerText.slice(0, 600),
                                    scroll_width: document.documentElement.scrollWidth});
  document.body.appendChild(pre);
});
</script>"""


WIDTH = 1280  # the window the pages are read in: a laptop's (issue 29: the gallery needed ~2,450 px)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): pages not rendered")
    return exe


def _run(exe: str, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="dr-chromium-")
    try:
        return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def look(page: pathlib.Path, screenshot: pathlib.Path) -> dict:
    """Render ``page`` (its images loaded from beside it), return what the check script saw, and save a screenshot
    of the first screen."""
    exe = chromium()
    probe = page.with_name(page.stem + ".check.html")
    text = page.read_text()
    probe.write_text(text.replace("</body>", CHECK + "</body>") if "</body>" in text else text + CHECK)
    try:
        dom = _run(exe, [f"--window-size={WIDTH},1000", "--dump-dom", probe.as_uri()])
        assert dom.returncode == 0, dom.stderr[-2000:]
        m = re.search(r'<pre id="dermray-check">(.*?)</pre>', dom.stdout, re.S)
        assert m, dom.stdout[-2000:]
        import html

        result = json.loads(html.unescape(m.group(1)))
        shot = _run(exe, [f"--screenshot={screenshot}", f"--window-size={WIDTH},1000", page.as_uri()])
        assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
        return result
    finally:
        probe.unlink(missing_ok=True)
