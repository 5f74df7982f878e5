"""Whole-process runs that mostly wait, started at the session's first test so that their waiting overlaps the
other tests: the demo pipeline (`dermray pipeline` in a process of its own), `make demo-cluster` (a head of its
own, a Ray job: after the demo, a re-run of the demo's run, every stage skipped) and the multi-node cluster's driver
(tests/multinode_driver.py). They run one after the other in one background thread (the demo, the reduced
demo-cluster and the driver alone measured 72, 75 and 226 s on 2 cores, much of it Ray starting, nodes dying and
being replaced); the system tests that judge them wait for their results.

`tests/conftest.py` starts them (fixture `early`, at the session's first test) when a test that needs one is
selected; a run that did not start one (its prerequisites missing, or the fixture not used) gets it in the
foreground: `Early.result` runs the launcher there. Each launcher returns what its tests judge and kills by PID
what it started.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
# faults.ENV, study.py's planted secret, and the session's botocore setting (tests/conftest.py: s3_servers)
NOT_INHERITED = ("RAY_ADDRESS", "DERMRAY_TEST_FAULTS", "DERMRAY_PLANTED_SECRET", "AWS_MAX_ATTEMPTS")


class Early:
    """Launchers run in order in one daemon thread; ``result(name)`` waits for one (or runs it here)."""

    def __init__(self):
        self.env: dict[str, str] = {}
        self.launchers: dict[str, object] = {}
        self.results: dict[str, dict] = {}
        self.done: dict[str, threading.Event] = {}
        self.thread: threading.Thread | None = None

    def start(self, launchers: dict[str, object], overrides: dict[str, str] | None = None) -> None:
        """``launchers``: name -> fn(env). The environment is this process's now, without fault hooks, updated
        with ``overrides``: tests change os.environ while they run (fault hooks, planted secrets), and none of that
        is for these runs."""
        self.env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        self.env.update(overrides or {})
        self.launchers = dict(launchers)
        self.done = {name: threading.Event() for name in launchers}
        self.thread = threading.Thread(target=self._run_all, name="early-processes", daemon=True)
        self.thread.start()

    def _run_all(self) -> None:
        for name, launch in self.launchers.items():
            t0 = time.time()
            try:
                self.results[name] = {"value": launch(self.env), "seconds": round(time.time() - t0, 1)}
            except BaseException:  # noqa: BLE001 - handed to the test that asks for it
                self.results[name] = {"error": traceback.format_exc(), "seconds": round(time.time() - t0, 1)}
            finally:
                self.done[name].set()

    def wait(self, name: str, timeout_s: float = 1800) -> None:
        """Until the run ``name`` has ended, if it was started (its result is its test's to judge)."""
        if name in self.done:
            self.done[name].wait(timeout_s)

    def result(self, name: str, launch, timeout_s: float = 1800) -> dict:
        if name not in self.done:  # not started early (a module run alone): run it now, in the foreground
            return launch({k: v for k, v in os.environ.items() if k not in NOT_INHERITED})
        if not self.done[name].wait(timeout_s):
            raise TimeoutError(f"the early run {name} did not finish in {timeout_s} s")
        r = self.results[name]
        if "error" in r:
            raise RuntimeError(f"the early run {name} failed:\n{r['error']}")
        print(f"\n{name}: ran in the background ({r['seconds']} s)")
        return r["value"]


def _kill_all(processes) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                p.kill()


# ---- `make demo-cluster` (tests/system/test_jobs.py) ----
DEMO_CLUSTER_TIMEOUT_S = 420
DEMO_CLUSTER_ARGS = ("--set train.epochs=1 --set partition.folds=2 --set partition.max_class_size=25 "
                     "--set evaluate.n_bootstrap=50 --set saliency.k=2 --set saliency.audit_size=2 "
                     "--set saliency.sanity_levels=1")


def demo_cluster(work: pathlib.Path, base_env: dict, demo: dict | None = None) -> dict:
    """`make demo-cluster` as a newcomer runs it. After the demo pipeline (``demo``: demo_pipeline's result), as a
    re-run of that demo's run (its data, outputs, run id and settings) submitted as a job: every stage is expected
    to skip, and the job's head, submission, log, status and report are what is judged (the demo's ~130
    core-seconds of training and scoring are not paid twice; the stages in a job are judged by test_jobs.py's
    partition and score jobs and by the multi-node driver). Without it, the whole pipeline at a reduced size (fewer
    lesions, one epoch, two folds). Returns {"rc", "out", "demo_dir", "run_id", "reused", "timed_out",
    "left_behind"}: left_behind lists the PIDs of processes it started that were still alive 30 s after it ended
    (they are killed)."""
    from helpers import marked

    venv, mark = BIN.parent, uuid.uuid4().hex
    env = {k: v for k, v in base_env.items() if not k.startswith("RAY_")}
    env.update(NUM_CPUS="2", DR_TEST_MARK=mark)
    if demo is not None:
        demo_dir, run_id = demo["dir"], "demo"
        args = " ".join(f"--set {o}" for o in (*demo_overrides(demo_dir), f"run_id={run_id}"))
    else:
        demo_dir, run_id, args = work / "demo", "demo-cluster", DEMO_CLUSTER_ARGS
        env.update(SYNTH_ARGS="--lesions 80 --test-lesions 30 --size 48")
    env.update(DEMO_DIR=str(demo_dir))
    # -o: the installed stamp counts as up to date (a test does not reinstall the environment it runs in)
    cmd = ["make", "-o", f"{venv}/.installed", "demo-cluster", f"VENV={venv}", f"DEMO_ARGS={args}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed_out = False
    try:
        try:
            out, _ = proc.communicate(timeout=DEMO_CLUSTER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            timed_out = True
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGTERM)  # the script's trap stops the head it started
            out, _ = proc.communicate(timeout=120)
        _, alive = psutil.wait_procs(marked(mark), timeout=30)
        return {"rc": proc.returncode, "out": out, "demo_dir": demo_dir, "run_id": run_id, "reused": demo is not None,
                "timed_out": timed_out, "left_behind": [p.pid for p in alive]}
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(marked(mark))


# ---- the multi-node cluster's driver (tests/system/test_multinode.py) ----
MULTINODE_TIMEOUT_S = 540


def multinode(ham_dir: pathlib.Path, s3_env: dict, work: pathlib.Path, base_env: dict) -> dict:
    """Runs tests/multinode_driver.py once (all scenarios); returns {"report", "bucket", "log", "rc"}. Every
    process the driver started is killed by PID at the end, whatever happened, and Ray's folder (outside the test
    folders: socket paths must be short) is removed."""
    import boto3

    bucket = f"dermray-mn-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    ray_tmp = tempfile.mkdtemp(prefix="dmn-", dir="/tmp")
    env = dict(base_env, **s3_env, RAY_TMPDIR=ray_tmp)
    log_path, report_path = work / "driver.log", work / "report.json"
    seen: dict[int, psutil.Process] = {}
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "multinode_driver.py"), "--work", str(work),
                                 "--bucket", bucket, "--ham", str(ham_dir), "--report", str(report_path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            while proc.poll() is None and time.time() - t0 < MULTINODE_TIMEOUT_S:
                try:
                    for c in psutil.Process(proc.pid).children(recursive=True):
                        seen.setdefault(c.pid, c)
                except psutil.NoSuchProcess:
                    pass
                time.sleep(0.5)
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        finally:
            _kill_all(seen.values())  # the cluster's processes, by PID (psutil checks each is the same process)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log_path.read_text()
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return {"report": report, "bucket": bucket, "log": text, "rc": proc.returncode,
            "seconds": round(time.time() - t0, 1)}


# ---- the demo pipeline (tests/system/test_pipeline.py) ----
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEMO_SYNTH = ("--lesions", "400", "--test-lesions", "120")
DEMO_EPOCHS = 1


def demo_overrides(d: pathlib.Path, *extra: str) -> list[str]:
    return [f"output={d / 'out'}", f"data.manifest={d / 'data' / 'manifest.parquet'}",
            f"data.taxonomy={d / 'data' / 'taxonomy.parquet'}", f"data.tasks={d / 'data' / 'tasks.yaml'}",
            f"evaluate.readers={d / 'data' / 'readers.parquet'}",
            f"pipeline.test_manifest={d / 'data' / 'test_manifest.parquet'}", f"train.epochs={DEMO_EPOCHS}",
            "evaluate.n_bootstrap=100", "saliency.k=1", "saliency.audit_size=2",
            # the demo's 150 scaled to this smaller draw (~700 training images), so that the classes split as in the
            # demo; two folds instead of three: each model trains on half the images, not two thirds, three at once
            "partition.max_class_size=70", "partition.folds=2", *extra]


def demo_pipeline(work: pathlib.Path, env: dict) -> dict:
    """The demo data drawn smaller than `make demo` draws it, then the pipeline run from the command line, as a
    person runs it (stdout and stderr are pipes here, as in a job log). Returns {"dir", "run", "seconds"}."""
    synth = subprocess.run([sys.executable, "-m", "dermray.cli", "synth", "--output", str(work / "data"),
                            *DEMO_SYNTH], capture_output=True, text=True, timeout=300, cwd=work, env=env)
    if synth.returncode != 0:
        raise RuntimeError(f"dermray synth failed: {synth.stderr[-3000:]}")
    cmd = [sys.executable, "-m", "dermray.cli", "pipeline", "--config", str(DEMO_CONFIG)]
    for o in demo_overrides(work):
        cmd += ["--set", o]
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=work, env=env)
    summary = work / "out" / "pipeline" / "demo" / "pipeline_summary.json"
    # As this run wrote it: a later re-run of the same run (the demo-cluster job) writes it again.
    return {"dir": work, "run": run, "seconds": round(time.time() - t0, 1),
            "summary": json.loads(summary.read_text()) if summary.exists() else None}
