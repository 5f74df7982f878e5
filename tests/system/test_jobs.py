"""`ray job submit` against a real local Ray head on loopback, started and stopped with cluster/local-up.sh and
cluster/local-down.sh (token authentication on, as Ray 2.60's `ray start` has it); `make demo-cluster` end to end;
the check of a job's paths (dermray/jobpaths.py)."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pandas as pd
import psutil
import pytest

from dermray import jobpaths

import early as runs
from helpers import free_port

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
def head():
    """A head started by cluster/local-up.sh in a private state folder; stopped by local-down.sh, and every process
    it started is checked gone (and killed by PID if not)."""
    state = pathlib.Path(tempfile.mkdtemp(prefix="dr-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", DERMRAY_RAY_DIR=str(state), RAY_PORT=str(free_port()),
               DASHBOARD_PORT=str(dashboard), NUM_CPUS="2", RAY_AUTH_MODE="token",
               # Ports of their own: the suite's in-process Ray already holds Ray's default agent and client ports.
               AGENT_PORT=str(free_port()), METRICS_PORT=str(free_port()), CLIENT_PORT=str(free_port()))
    up = subprocess.run(["bash", str(REPO / "cluster" / "local-up.sh")], env=env, capture_output=True, text=True,
                        timeout=180)
    pid = int((state / "head.pid").read_text()) if (state / "head.pid").exists() else None
    procs = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr + (state / "head.log").read_text()
        token = (state / "auth_token").read_text()
        assert token not in up.stdout + up.stderr  # never printed
        assert oct((state / "auth_token").stat().st_mode & 0o777) == "0o600"
        client = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state / "auth_token"))
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": client, "state": state, "pid": pid}
        procs = psutil.Process(pid).children(recursive=True)
        down = subprocess.run(["bash", str(REPO / "cluster" / "local-down.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        gone, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, f"processes left behind by the head: {[p.pid for p in alive]}"
    finally:
        for p in procs + ([psutil.Process(pid)] if pid and psutil.pid_exists(pid) else []):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def submit(head, *entrypoint, wait_s=300) -> tuple[str, str]:
    """`ray job submit` with the project's runtime env, as a laptop runs it: it follows the job to its end (one CLI
    process, instead of one `ray job status` process every 2 s: each costs a core-second on 2 cores). Returns
    (status, logs)."""
    sid = f"dermray-test-{time.time_ns()}"
    ray = str(BIN / "ray")
    for _ in range(90):  # a fresh head's job agent can answer a minute or more after its dashboard on a busy machine
        out = subprocess.run([ray, "job", "submit", "--address", head["address"], "--submission-id", sid,
                              "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
                              "--working-dir", str(REPO), "--", *entrypoint], env=head["env"], capture_output=True,
                             text=True, timeout=wait_s, cwd=REPO)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(2)
    # It ends with "Job '<id>' succeeded" (or failed / stopped) once the job is over.
    m = re.search(r"Job '[^']+' (succeeded|failed|stopped)", out.stdout + out.stderr)
    assert m, out.stdout[-3000:] + out.stderr[-3000:]
    logs = subprocess.run([ray, "job", "logs", "--address", head["address"], sid], env=head["env"],
                          capture_output=True, text=True, timeout=60).stdout
    return m.group(1).upper(), logs


def test_submitted_partition_and_score_jobs_succeed_and_a_bad_config_fails_clearly(head, score_study, tmp_path):
    d = score_study
    out = tmp_path / "out"
    status, logs = submit(head, "python", "jobs/partition.py", "--manifest", str(d / "in" / "manifest.parquet"),
                          "--taxonomy", str(d / "in" / "taxonomy.parquet"), "--tasks", str(d / "in" / "tasks.yaml"),
                          "--max-class-size", "8", "--folds", "2", "--output", str(out))
    assert status == "SUCCEEDED", logs
    assert "partition: 40 input rows = 40 assigned + 0 quarantined" in logs
    assert len(pd.read_parquet(out / "partition" / "default" / "labels.parquet")) == 40
    assert "\r" not in logs  # no progress bars redrawn into the log

    status, logs = submit(head, "python", "jobs/score.py", "--checkpoint", str(d / "out" / "train" / "r1"),
                          "--input", str(d / "archive" / "manifest.parquet"), "--output", str(out), "--run-id", "job",
                          "--set", "score.batch_size=8", "--set", "score.cpus_per_actor=0.5", "--json")
    assert status == "SUCCEEDED", logs
    summary = json.loads(logs[logs.index("{\n"):logs.rindex("}") + 1])
    assert summary["scored"] == 24 and summary["quarantined"] == 0
    assert len(pd.read_parquet(out / "predictions" / "job" / "predictions")) == 24

    bad = tmp_path / "bad.yaml"
    bad.write_text("partition:\n  max_class_sise: 10\n")
    status, logs = submit(head, "python", "jobs/partition.py", "--config", str(bad))
    assert status == "FAILED"
    assert "unknown key 'partition.max_class_sise'" in logs and "Traceback" not in logs


def test_a_client_without_the_token_is_refused(head):
    env = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head["address"]], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "token" in (out.stdout + out.stderr).lower()


def test_the_issue_command_with_the_demo_config_fails_in_one_line_saying_why(head):
    """The command cluster/local-up.sh's header used to show: configs/demo.yaml's relative paths name nothing in the
    uploaded copy of the working directory."""
    status, logs = submit(head, "python", "jobs/partition.py", "--config", "configs/demo.yaml")
    assert status == "FAILED"
    line = next(ln for ln in logs.splitlines() if ln.startswith("dermray partition: error:"))
    assert line.startswith("dermray partition: error: data.manifest outputs/demo/data/manifest.parquet is a relative "
                           "local path, and this Ray job runs in the uploaded copy of its working directory ("), line
    assert "cluster/runtime_env.yaml ships without outputs/ and data/" in line and jobpaths.REMEDY in line
    assert "Traceback" not in logs


