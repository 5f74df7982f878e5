"""One smoke test per entry point, as a process of its own: the `dermray` console script and every `jobs/*.py`
(what `ray job submit` runs) start, parse their arguments and refuse a user error in one line with exit 2 before any
work. Everything else runs the CLI in-process (`main([...])`), which is where the stage tests check it."""
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
JOBS = sorted((REPO / "jobs").glob("*.py"))


def _one_line_exit_2(run: subprocess.CompletedProcess, what: str) -> None:
    err = run.stderr.strip()
    assert run.returncode == 2, (what, run.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "error:" in err, (what, err[-2000:])


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_job_script_refuses_a_missing_config_in_one_line(job, tmp_path):
    run = subprocess.run([sys.executable, str(job), "--config", str(tmp_path / "missing.yaml")], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    _one_line_exit_2(run, job.name)
    assert "missing.yaml" in run.stderr


def test_the_console_script_refuses_an_unknown_key_in_one_line(tmp_path):
    if not (BIN / "dermray").exists():
        pytest.skip(f"the dermray console script is not installed next to {sys.executable}")
    run = subprocess.run([str(BIN / "dermray"), "partition", "--set", "partition.max_class_sise=3"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    _one_line_exit_2(run, "dermray partition")
    assert "partition.max_class_sise" in run.stderr
