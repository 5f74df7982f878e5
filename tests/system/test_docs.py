"""The commands the README shows for `ray job submit` ("Submit from a laptop") run as written, against a real local
head started and stopped by them (cluster/local-up.sh, cluster/local-down.sh), so the documentation cannot drift
from what works. Script headers show no commands of their own: they point to that section (checked here)."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import pytest

from helpers import free_port, marked

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
README = REPO / "README.md"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # cluster/local-up.sh's default DASHBOARD_PORT
COMMANDS = re.compile(r"^(bash|ray|export|make|python|kubectl|dermray|[A-Z_]+=)\b")


def laptop_blocks(text: str) -> list[str]:
    """The fenced bash blocks of the "Submit from a laptop" paragraph (up to the next paragraph or heading that
    starts with ** or #)."""
    start = text.index("**Submit from a laptop**")
    nxt = re.search(r"\n(\*\*|#)", text[start + 2:])
    section = text[start:start + 2 + nxt.start()] if nxt else text[start:]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert blocks, "no ```bash block in the Submit from a laptop paragraph"
    return blocks


def commands_of(block: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines kept out."""
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def header_commands(path: pathlib.Path) -> list[str]:
    """Command lines shown in a file's leading comment block (`#   bash ...`, `#   ray ...`)."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith("   ") and COMMANDS.match(body.strip()):
            out.append(body.strip())
    return out


def test_script_headers_show_only_commands_the_readme_section_runs():
    readme = [" ".join(c.split()) for b in laptop_blocks(README.read_text()) for c in commands_of(b)]
    # Not run here: aws-gpu.yaml's `ray up` / `ray down` need an AWS account, the Dockerfile's build needs docker.
    cloud_only = {"aws-gpu.yaml", "Dockerfile"}
    for path in sorted((REPO / "cluster").glob("*")):
        if path.name not in cloud_only:
            for cmd in header_commands(path):
                assert " ".join(cmd.split()) in readme, f"{path.name}'s header shows {cmd!r}, not in the README"
    # What the section names exists: the scripts, the entrypoint, the config, the make target.
    text = "\n".join(laptop_blocks(README.read_text()))
    for rel in re.findall(r"\b((?:cluster|jobs|configs)/[\w.-]+\.(?:sh|py|yaml))", text):
        assert (REPO / rel).exists(), rel
    assert re.search(r"^demo-cluster:", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert "make demo-cluster" in README.read_text()
    assert 'DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"' in (REPO / "cluster" / "local-up.sh").read_text()


def test_the_submit_from_a_laptop_commands_work_as_written(tmp_path):
    if not (BIN / "ray").exists():
        pytest.skip(f"the ray CLI is not installed next to {sys.executable}")
    # A clone-like copy of the checkout (what `git clone` gives, without outputs), with the demo data in it as
    # `make demo` leaves it (drawn small: only the partition stage runs).
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "data", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", "*.egg-info"))
    # HOME: a short fresh folder, so the README's default state folder ($HOME/.dermray/local-ray) is the test's own
    # (Ray's socket paths are limited to ~100 characters).
    home = pathlib.Path(tempfile.mkdtemp(prefix="drh", dir="/tmp"))
    dashboard, mark = free_port(), uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", HOME=str(home), DR_TEST_MARK=mark, NUM_CPUS="2",
               # the local head's ports: the suite's in-process Ray (or an engineer's) may hold Ray's defaults
               DASHBOARD_PORT=str(dashboard), RAY_PORT=str(free_port()), AGENT_PORT=str(free_port()),
               METRICS_PORT=str(free_port()), CLIENT_PORT=str(free_port()))
    synth = subprocess.run([str(BIN / "dermray"), "synth", "--output", "outputs/demo/data", "--lesions", "40",
                            "--test-lesions", "10", "--size", "32"], cwd=clone, env=env, capture_output=True,
                           text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr
    blocks = laptop_blocks(README.read_text())
    script = "\n".join(b.replace(DEFAULT_ADDRESS, f"http://127.0.0.1:{dashboard}") for b in blocks)
    assert DEFAULT_ADDRESS not in script and "<" not in script  # every address substituted, no placeholders left
    (tmp_path / "readme.sh").write_text("set -euxo pipefail\n" + script)
    try:
        t0 = time.time()
        run = subprocess.run(["bash", str(tmp_path / "readme.sh")], cwd=clone, env=env, capture_output=True,
                             text=True, timeout=480)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-6000:]
        assert "Job 'demo-partition' succeeded" in out, out[-6000:]
        assert re.search(r"partition: \d+ input rows = \d+ assigned", out), out[-6000:]
        assert (clone / "outputs" / "demo" / "partition" / "demo" / "labels.parquet").exists()
        assert "Ray head stopped" in out
        token = (home / ".dermray" / "local-ray" / "auth_token").read_text()
        assert token not in out
        print(f"README commands: {time.time() - t0:.0f} s")
        _, alive = psutil.wait_procs(marked(mark), timeout=30)
        assert not alive, f"processes left behind by the README's commands: {[p.pid for p in alive]}"
    finally:
        state = home / ".dermray" / "local-ray"
        if (state / "head.pid").exists():  # the commands stopped before local-down.sh
            subprocess.run(["bash", str(REPO / "cluster" / "local-down.sh")], env=dict(env, DERMRAY_RAY_DIR=str(state)),
                           capture_output=True, timeout=120)
        for p in marked(mark):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(home, ignore_errors=True)
