"""Whole-process runs that mostly wait, started at the session's first test so that their waiting overlaps the
other tests: the demo pipeline (`dermray pipeline` in a process of its own), `make demo-cluster` (a head of its
own, a Ray job: after the demo, a re-run of the demo's run, every stage skipped), the multi-node cluster's driver
(tests/multinode_driver.py), `ray job submit` against a local head (tests/system/test_jobs.py), the docs'
"Submit from a laptop" commands (tests/system/test_docs.py) and mypy. They run one after the other in one
background thread (the demo, the reduced demo-cluster and the driver alone measured 72, 75 and 226 s on 2 cores,
much of it Ray starting, nodes dying and being replaced; the local head's jobs ~65 s, the docs' laptop commands ~23 s,
mypy ~20 s without its cache); the tests that judge them wait for their results.

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
import re
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
    run, heard = timed_run(cmd, cwd=work, env=env, timeout=900)
    summary = work / "out" / "pipeline" / "demo" / "pipeline_summary.json"
    # As this run wrote it: a later re-run of the same run (the demo-cluster job) writes it again.
    return {"dir": work, "run": run, "seconds": round(time.time() - t0, 1), "heard": heard,
            "summary": json.loads(summary.read_text()) if summary.exists() else None}


def timed_run(cmd: list[str], cwd, env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, list[float]]:
    """``subprocess.run(cmd, capture_output=True, text=True)``, and the seconds since the start at which each line
    of stdout or stderr arrived (in order; the end of the process last): the console's silences."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    t0, heard, texts = time.monotonic(), [], {}

    def read(name, stream):
        chunks = []
        for line in stream:
            heard.append(time.monotonic() - t0)
            chunks.append(line)
        texts[name] = "".join(chunks)

    readers = [threading.Thread(target=read, args=(n, s), daemon=True) for n, s in (("out", proc.stdout),
                                                                                    ("err", proc.stderr))]
    for r in readers:
        r.start()
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    for r in readers:
        r.join(10)
    heard.append(time.monotonic() - t0)
    return subprocess.CompletedProcess(cmd, rc, texts.get("out", ""), texts.get("err", "")), sorted(heard)


# ---- `ray job submit` against a local head (tests/system/test_jobs.py) ----
def _ray_env(base_env: dict, **extra: str) -> dict:
    """The environment of a separately started Ray: none of the session's RAY_ settings, the venv's CLIs first."""
    env = {k: v for k, v in base_env.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def submit(address: str, env: dict, *entrypoint: str, wait_s: float = 300) -> tuple[str, str]:
    """`ray job submit` with the project's runtime env, as a laptop runs it: it follows the job to its end (one CLI
    process, instead of one `ray job status` process every 2 s: each costs a core-second on 2 cores). Returns
    (status, logs)."""
    import re

    sid = f"dermray-test-{time.time_ns()}"
    ray = str(BIN / "ray")
    for _ in range(90):  # a fresh head's job agent can answer a minute or more after its dashboard on a busy machine
        out = subprocess.run([ray, "job", "submit", "--address", address, "--submission-id", sid,
                              "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
                              "--working-dir", str(REPO), "--", *entrypoint], env=env, capture_output=True,
                             text=True, timeout=wait_s, cwd=REPO)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(2)
    # It ends with "Job '<id>' succeeded" (or failed / stopped) once the job is over.
    m = re.search(r"Job '[^']+' (succeeded|failed|stopped)", out.stdout + out.stderr)
    if not m:
        return "UNKNOWN", out.stdout[-3000:] + out.stderr[-3000:]
    logs = subprocess.run([ray, "job", "logs", "--address", address, sid], env=env, capture_output=True, text=True,
                          timeout=60).stdout
    return m.group(1).upper(), logs


def local_head_jobs(work: pathlib.Path, base_env: dict, score_study: pathlib.Path) -> dict:
    """A head started by cluster/local-up.sh in a private state folder (token auth on, as Ray 2.60's `ray start`
    has it), the jobs tests/system/test_jobs.py judges submitted to it one after the other, then local-down.sh.
    Returns what each step printed: {"up", "token_printed", "token_mode", "jobs": {name: (status, logs)},
    "no_token": (rc, text), "down", "left_behind", "out"}. Every process the head started is killed by PID at the
    end, whatever happened. ``score_study``: conftest's score_study folder (its inputs, fold models and archive)."""
    from helpers import free_port

    state = pathlib.Path(tempfile.mkdtemp(prefix="dr-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    dashboard = free_port()
    env = _ray_env(base_env, DERMRAY_RAY_DIR=str(state), RAY_PORT=str(free_port()), DASHBOARD_PORT=str(dashboard),
                   NUM_CPUS="2", RAY_AUTH_MODE="token",
                   # Ports of their own: the suite's in-process Ray already holds Ray's default agent and client ports.
                   AGENT_PORT=str(free_port()), METRICS_PORT=str(free_port()), CLIENT_PORT=str(free_port()))
    address = f"http://127.0.0.1:{dashboard}"
    result: dict = {"out": str(work / "out"), "jobs": {}, "left_behind": []}
    up = subprocess.run(["bash", str(REPO / "cluster" / "local-up.sh")], env=env, capture_output=True, text=True,
                        timeout=180)
    pid = int((state / "head.pid").read_text()) if (state / "head.pid").exists() else None
    head_log = state / "head.log"
    result["up"] = {"rc": up.returncode, "text": up.stdout + up.stderr + (head_log.read_text() if head_log.exists()
                                                                          else "")}
    procs: list = []
    try:
        if up.returncode != 0:
            return result
        token = (state / "auth_token").read_text()
        result["token_printed"] = token in up.stdout + up.stderr
        result["token_mode"] = oct((state / "auth_token").stat().st_mode & 0o777)
        client = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state / "auth_token"))
        d, out = score_study, work / "out"
        result["jobs"]["partition"] = submit(
            address, client, "python", "jobs/partition.py", "--manifest", str(d / "in" / "manifest.parquet"),
            "--taxonomy", str(d / "in" / "taxonomy.parquet"), "--tasks", str(d / "in" / "tasks.yaml"),
            "--max-class-size", "8", "--folds", "2", "--output", str(out))
        result["jobs"]["score"] = submit(
            address, client, "python", "jobs/score.py", "--checkpoint", str(d / "out" / "train" / "r1"), "--input",
            str(d / "archive" / "manifest.parquet"), "--output", str(out), "--run-id", "job", "--set",
            "score.batch_size=8", "--set", "score.cpus_per_actor=0.5", "--json")
        bad = work / "bad.yaml"
        bad.write_text("partition:\n  max_class_sise: 10\n")
        result["jobs"]["bad_config"] = submit(address, client, "python", "jobs/partition.py", "--config", str(bad))
        # The command cluster/local-up.sh's header used to show: configs/demo.yaml's relative paths name nothing in
        # the uploaded copy of the working directory.
        result["jobs"]["demo_config"] = submit(address, client, "python", "jobs/partition.py", "--config",
                                               "configs/demo.yaml")
        no_token = {k: v for k, v in client.items() if not k.startswith("RAY_AUTH")}
        listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=no_token,
                                capture_output=True, text=True, timeout=60)
        result["no_token"] = (listed.returncode, listed.stdout + listed.stderr)
        procs = psutil.Process(pid).children(recursive=True)
        down = subprocess.run(["bash", str(REPO / "cluster" / "local-down.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
        result["down"] = {"rc": down.returncode, "text": down.stdout + down.stderr}
        _, alive = psutil.wait_procs(procs, timeout=30)
        result["left_behind"] = [p.pid for p in alive]
        return result
    finally:
        _kill_all(procs + ([psutil.Process(pid)] if pid and psutil.pid_exists(pid) else []))
        shutil.rmtree(state, ignore_errors=True)


# ---- docs/cluster.md's "Submit from a laptop" commands (tests/system/test_docs.py) ----
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # cluster/local-up.sh's default DASHBOARD_PORT


def laptop_blocks(text: str) -> list[str]:
    """The fenced bash blocks of the "Submit from a laptop" paragraph (up to the next paragraph or heading that
    starts with ** or #)."""
    start = text.index("**Submit from a laptop**")
    nxt = re.search(r"\n(\*\*|#)", text[start + 2:])
    section = text[start:start + 2 + nxt.start()] if nxt else text[start:]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert blocks, "no ```bash block in the Submit from a laptop paragraph"
    return blocks


def laptop(work: pathlib.Path, base_env: dict) -> dict:
    """docs/cluster.md's commands (the section's fenced blocks joined) run as written in a clone-like copy of the
    checkout with the demo data drawn small (only the partition stage runs), against a local head on ports of its
    own (DEFAULT_ADDRESS in the commands replaced by its). Returns {"synth", "rc", "out", "token", "clone",
    "left_behind", "seconds"}."""
    from helpers import free_port, marked

    script = "\n".join(laptop_blocks((REPO / "docs" / "cluster.md").read_text()))

    # A clone-like copy of the checkout (what `git clone` gives, without outputs), with the demo data in it as
    # `make demo` leaves it.
    clone = work / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "data", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", "*.egg-info",
        ".mypy_cache", "test-artefacts"))
    # HOME: a short fresh folder, so the docs' default state folder ($HOME/.dermray/local-ray) is the run's own
    # (Ray's socket paths are limited to ~100 characters).
    home = pathlib.Path(tempfile.mkdtemp(prefix="drh", dir="/tmp"))
    dashboard, mark = free_port(), uuid.uuid4().hex
    env = _ray_env(base_env, HOME=str(home), DR_TEST_MARK=mark, NUM_CPUS="2",
                   # the local head's ports: the suite's in-process Ray (or an engineer's) may hold Ray's defaults
                   DASHBOARD_PORT=str(dashboard), RAY_PORT=str(free_port()), AGENT_PORT=str(free_port()),
                   METRICS_PORT=str(free_port()), CLIENT_PORT=str(free_port()))
    result: dict = {"clone": clone, "rc": None, "out": "", "token": None, "left_behind": []}
    synth = subprocess.run([str(BIN / "dermray"), "synth", "--output", "outputs/demo/data", "--lesions", "40",
                            "--test-lesions", "10", "--size", "32"], cwd=clone, env=env, capture_output=True,
                           text=True, timeout=300)
    result["synth"] = {"rc": synth.returncode, "text": synth.stdout + synth.stderr}
    if synth.returncode != 0:
        return result
    (work / "readme.sh").write_text("set -euxo pipefail\n" + script.replace(DEFAULT_ADDRESS,
                                                                            f"http://127.0.0.1:{dashboard}"))
    state = home / ".dermray" / "local-ray"
    t0 = time.time()
    try:
        run = subprocess.run(["bash", str(work / "readme.sh")], cwd=clone, env=env, capture_output=True, text=True,
                             timeout=480)
        result.update(rc=run.returncode, out=run.stdout + run.stderr, seconds=round(time.time() - t0, 1))
        if (state / "auth_token").exists():
            result["token"] = (state / "auth_token").read_text()
        _, alive = psutil.wait_procs(marked(mark), timeout=30)
        result["left_behind"] = [p.pid for p in alive]
        return result
    finally:
        if (state / "head.pid").exists():  # the commands stopped before local-down.sh
            subprocess.run(["bash", str(REPO / "cluster" / "local-down.sh")], env=dict(env, DERMRAY_RAY_DIR=str(state)),
                           capture_output=True, timeout=120)
        _kill_all(marked(mark))
        shutil.rmtree(home, ignore_errors=True)


# ---- mypy over the package (tests/unit/test_architecture.py) ----
def mypy(base_env: dict) -> dict:
    """pyproject.toml's [tool.mypy] run over the package: about 20 s of one core without its cache (a fresh
    clone), so a whole session runs it in the background. Returns {"rc", "text"}."""
    run = subprocess.run([str(BIN / "mypy")], cwd=REPO, capture_output=True, text=True, env=base_env, timeout=600)
    return {"rc": run.returncode, "text": run.stdout[-3000:] + run.stderr[-2000:]}
