"""What a person sees: a pipeline run from the command line prints only dermray's own lines - one per stage start,
progress per fold and epoch, the summary and where the report and the log are - and keeps everything else (Ray's
execution plans, worker warnings, C++ messages) in the log file beside the outputs."""
import pathlib
import re
import subprocess
import sys

import pytest

from dermray.cli import main

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[1]
RAY_NOISE = ("Starting execution of Dataset", "worker processes have been started", "constructor arguments",
             "Execution plan", "Traceback", "checkpoint_", "WARNING", "(raylet)", "pid=")


def test_a_demo_pipeline_prints_a_few_meaningful_lines_and_logs_the_rest(tmp_path):
    assert main(["synth", "--output", str(tmp_path / "data"), "--lesions", "300", "--test-lesions", "60"]) == 0
    d = tmp_path / "data"
    cmd = [sys.executable, "-m", "dermray.cli", "pipeline", "--config", str(REPO / "configs" / "demo.yaml"),
           "--set", f"output={tmp_path / 'out'}", "--set", f"data.manifest={d / 'manifest.parquet'}",
           "--set", f"data.taxonomy={d / 'taxonomy.parquet'}", "--set", f"data.tasks={d / 'tasks.yaml'}",
           "--set", f"evaluate.readers={d / 'readers.parquet'}",
           "--set", f"pipeline.test_manifest={d / 'test_manifest.parquet'}", "--set", "train.epochs=2",
           "--set", "saliency.sanity=false", "--set", "evaluate.n_bootstrap=50"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    for noise in RAY_NOISE:
        assert not any(noise in ln for ln in lines), noise
    # Each stage says it starts; training says how far each fold is; the end says where things are.
    for k, stage in enumerate(("partition", "train", "score", "evaluate", "saliency"), 1):
        assert any(ln.startswith(f"pipeline [{k}/5] {stage}: running") for ln in lines), stage
    epochs = [ln for ln in lines if re.match(r"train: fold \d epoch \d/2, train loss", ln)]
    assert len(epochs) == 6 and all("img/s" in ln and "ETA" in ln for ln in epochs), epochs
    assert any(ln.startswith("score: ") and "images/s" in ln for ln in lines)
    report = next(ln for ln in lines if ln.strip().startswith("report: ")).split("report: ")[1]
    assert pathlib.Path(report).exists()
    last = run.stdout.strip().splitlines()[-1]  # stdout: the summary alone, ending with the log's place
    log = pathlib.Path(last.split("log: ")[1])
    assert last.strip().startswith("log: ") and log.exists()
    assert all(not ln.startswith(("pipeline [", "train: fold", "score: ")) for ln in run.stdout.splitlines())
    text = log.read_text()
    assert "Starting execution of Dataset" in text and "pipeline [2/5] train" in text  # everything is in the log


def test_a_user_error_is_one_line_and_the_version_is_printed(tmp_path):
    """Errors are one line on the console (the details in the log file); --version names the release and commit."""
    cmd = [sys.executable, "-m", "dermray.cli", "lineage", "--output", str(tmp_path / "nothing"), "--run-id", "r"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "no stage outputs" in run.stderr
    version = subprocess.run([sys.executable, "-m", "dermray.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("dermray 0.1.0")
