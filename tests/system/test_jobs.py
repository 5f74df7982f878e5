"""`ray job submit` against a real local Ray head on loopback, started and stopped with cluster/local-up.sh and
cluster/local-down.sh (token authentication on, as Ray 2.60's `ray start` has it); `make demo-cluster` end to end;
the check of a job's paths (dermray/runtime/jobpaths.py)."""
import json
import pathlib
import re
import shutil
import sys

import pandas as pd
import pytest

from dermray.runtime import jobpaths

import early as runs

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def test_make_demo_cluster_submits_the_demo_pipeline_and_stops_its_head(early, tmp_path_factory):
    """`make demo-cluster` as a newcomer runs it: the job succeeds, the report's path is printed and exists, and the
    head and everything it started are gone after. Run in the background from the session's start
    (tests/early.py): after the demo pipeline, as a re-run of the demo's run, every stage skipped; alone, the
    whole pipeline at a reduced size (fewer lesions, one epoch, two folds)."""
    if not (BIN / "ray").exists():
        pytest.skip(f"the ray CLI is not installed next to {sys.executable}")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = early.result("demo_cluster", lambda env: runs.demo_cluster(tmp_path_factory.mktemp("demo_cluster"), env))
    out = r["out"]
    assert not r["timed_out"], f"make demo-cluster ran past {runs.DEMO_CLUSTER_TIMEOUT_S} s:\n{out[-6000:]}"
    assert r["rc"] == 0, out[-8000:]
    assert re.search(r"demo-cluster: job dermray-demo-\S+ SUCCEEDED", out), out[-8000:]
    assert f"pipeline: run {r['run_id']}" in out, out[-8000:]
    if r["reused"]:  # the demo's run again, as a job: the same inputs and settings, so every stage skips
        for stage in ("partition", "train", "score", "evaluate", "saliency"):
            assert re.search(rf"pipeline \[\d/5\] {stage}: skipped", out), (stage, out[-8000:])
    report = re.search(r"^demo-cluster: report: (\S+)$", out, re.MULTILINE)
    assert report and pathlib.Path(report.group(1)).is_file(), out[-4000:]
    assert pathlib.Path(report.group(1)).is_relative_to(r["demo_dir"])
    state = re.search(r"state in (/tmp/dr-demo-\S+)\)", out).group(1)
    assert "Ray head stopped" in out and not pathlib.Path(state).exists()  # stopped, its state folder removed
    assert not r["left_behind"], f"processes left behind by make demo-cluster: {r['left_behind']}"


@pytest.fixture(scope="module")
def jobs(early, score_study, tmp_path_factory):
    """The local head's run (tests/early.py: local_head_jobs): started by cluster/local-up.sh in a private state
    folder, the jobs below submitted to it, stopped by local-down.sh. Run in the background from the session's
    start; alone, here."""
    if not (BIN / "ray").exists():
        pytest.skip(f"the ray CLI is not installed next to {sys.executable}")
    return early.result("jobs", lambda env: runs.local_head_jobs(tmp_path_factory.mktemp("jobs"), env, score_study))


def test_the_local_head_starts_with_a_private_token_and_stops_leaving_nothing(jobs):
    assert jobs["up"]["rc"] == 0, jobs["up"]["text"][-6000:]
    assert not jobs["token_printed"]  # never printed
    assert jobs["token_mode"] == "0o600"
    assert jobs["down"]["rc"] == 0, jobs["down"]["text"]
    assert not jobs["left_behind"], f"processes left behind by the head: {jobs['left_behind']}"


def test_submitted_partition_and_score_jobs_succeed_and_a_bad_config_fails_clearly(jobs):
    out = pathlib.Path(jobs["out"])
    status, logs = jobs["jobs"]["partition"]
    assert status == "SUCCEEDED", logs
    assert "partition: 40 input rows = 40 assigned + 0 quarantined" in logs
    assert len(pd.read_parquet(out / "partition" / "default" / "labels.parquet")) == 40
    assert "\r" not in logs  # no progress bars redrawn into the log

    status, logs = jobs["jobs"]["score"]
    assert status == "SUCCEEDED", logs
    summary = json.loads(logs[logs.index("{\n"):logs.rindex("}") + 1])
    assert summary["scored"] == 24 and summary["quarantined"] == 0
    assert len(pd.read_parquet(out / "predictions" / "job" / "predictions")) == 24

    status, logs = jobs["jobs"]["bad_config"]
    assert status == "FAILED"
    assert "unknown key 'partition.max_class_sise'" in logs and "Traceback" not in logs


def test_a_client_without_the_token_is_refused(jobs):
    rc, text = jobs["no_token"]
    assert rc != 0
    assert "token" in text.lower()


def test_the_issue_command_with_the_demo_config_fails_in_one_line_saying_why(jobs):
    """The command cluster/local-up.sh's header used to show: configs/demo.yaml's relative paths name nothing in the
    uploaded copy of the working directory."""
    status, logs = jobs["jobs"]["demo_config"]
    assert status == "FAILED"
    line = next(ln for ln in logs.splitlines() if ln.startswith("dermray partition: error:"))
    assert line.startswith("dermray partition: error: data.manifest outputs/demo/data/manifest.parquet is a relative "
                           "local path, and this Ray job runs in the uploaded copy of its working directory ("), line
    assert "cluster/runtime_env.yaml ships without outputs/ and data/" in line and jobpaths.REMEDY in line
    assert "Traceback" not in logs
