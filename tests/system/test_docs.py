"""The commands the docs show for `ray job submit` (docs/cluster.md, "Submit from a laptop") run as written, against
a real local head started and stopped by them (cluster/local-up.sh, cluster/local-down.sh), so the documentation
cannot drift from what works. Script headers show no commands of their own: they point to that section (checked
here)."""
import pathlib
import re
import sys

import pytest

import early as runs
from early import DEFAULT_ADDRESS, laptop_blocks

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
CLUSTER_PAGE = REPO / "docs" / "cluster.md"  # the "Submit from a laptop" commands
README = REPO / "README.md"
COMMANDS = re.compile(r"^(bash|ray|export|make|python|kubectl|dermray|[A-Z_]+=)\b")


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


def test_script_headers_show_only_commands_the_docs_section_runs():
    documented = [" ".join(c.split()) for b in laptop_blocks(CLUSTER_PAGE.read_text()) for c in commands_of(b)]
    # Not run here: aws-gpu.yaml's `ray up` / `ray down` need an AWS account, the Dockerfile's build needs docker.
    cloud_only = {"aws-gpu.yaml", "Dockerfile"}
    for path in sorted((REPO / "cluster").glob("*")):
        if path.name not in cloud_only:
            for cmd in header_commands(path):
                assert " ".join(cmd.split()) in documented, \
                    f"{path.name}'s header shows {cmd!r}, not in docs/cluster.md"
    # What the section names exists: the scripts, the entrypoint, the config, the make target.
    text = "\n".join(laptop_blocks(CLUSTER_PAGE.read_text()))
    for rel in re.findall(r"\b((?:cluster|jobs|configs)/[\w.-]+\.(?:sh|py|yaml))", text):
        assert (REPO / rel).exists(), rel
    assert re.search(r"^demo-cluster:", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert "make demo-cluster" in README.read_text() and "make demo-cluster" in CLUSTER_PAGE.read_text()
    assert 'DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"' in (REPO / "cluster" / "local-up.sh").read_text()


def test_the_submit_from_a_laptop_commands_work_as_written(early, tmp_path_factory):
    """The section's fenced blocks joined into one script, run in a clone-like copy of the checkout against a local
    head that they start and stop (tests/early.py: laptop; in the background from the session's start)."""
    if not (BIN / "ray").exists():
        pytest.skip(f"the ray CLI is not installed next to {sys.executable}")
    script = "\n".join(laptop_blocks(CLUSTER_PAGE.read_text()))
    assert DEFAULT_ADDRESS in script and "<" not in script  # the address to substitute is there, no placeholders
    r = early.result("laptop", lambda env: runs.laptop(tmp_path_factory.mktemp("laptop"), env))
    assert r["synth"]["rc"] == 0, r["synth"]["text"]
    out = r["out"]
    assert r["rc"] == 0, out[-6000:]
    assert "Job 'demo-partition' succeeded" in out, out[-6000:]
    assert re.search(r"partition: \d+ input rows = \d+ assigned", out), out[-6000:]
    assert (r["clone"] / "outputs" / "demo" / "partition" / "demo" / "labels.parquet").exists()
    assert "Ray head stopped" in out
    assert r["token"] and r["token"] not in out
    print(f"docs/cluster.md commands: {r['seconds']} s")
    assert not r["left_behind"], f"processes left behind by the docs' commands: {r['left_behind']}"

