"""The suite's three tiers and its shared fixtures.

Tiers, by folder (each test gets the folder's marker; `pytest -m unit` or `pytest tests/unit` runs one tier):
- tests/unit: no Ray, no subprocess, no network, no training: pure modules and stage kernels on tiny data. A unit
  test that asks for a fixture of the other tiers fails at collection; tests/unit/conftest.py refuses Ray and
  Python/Ray/shell subprocesses at run time.
- tests/stage: the in-process Ray (`ray_local`) and the real S3 server (`s3_server`; the outage tests stop and
  restart it); stage tests read the outputs of one shared synthetic study (`study`: every stage run once, then
  again, in this session).
- tests/system: whole processes: `ray job submit` on local heads, the multi-node cluster, driver kills, the
  browser, the demo as a user runs it, KubeRay and kustomize.
Real data (../shared/data) is used where the real images matter, and its tests skip with a reason without it."""
from __future__ import annotations

import logging
import os
import pathlib

import pandas as pd
import pyarrow.parquet
import pytest

from helpers import shard_bytes, write_fold

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
HAM = SHARED_DATA / "ham10000"
ISIC_TAXONOMY = SHARED_DATA / "isic-taxonomy" / "diagnosis_nodes.csv"
TESTS = pathlib.Path(__file__).resolve().parent
TIERS = ("unit", "stage", "system")
# Every Ray the tests start (in-process, `ray start`, job drivers and clusters inherit this environment) sends no
# usage statistics and collects no metrics: nothing reads them here, and on 2 cores the exporters' CPU is the
# suite's time (measured: the shared study's build, 133 -> 124 core-seconds).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# Idle workers are kept up to 8 per node instead of one per CPU: the session's Ray runs hundreds of short stages, and
# a worker that Ray kills after a second of idleness is started again (~1.3 core-seconds: Python and Ray's imports)
# by the next run's tasks (measured on tests/stage/test_score.py: 118-122 -> 109 core-seconds, 2 cores, AMD EPYC).
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
# The S3 servers' request lines (werkzeug, one per request, logged from the servers' threads) go to pytest's log
# capture and nowhere else. Left alone, werkzeug binds a handler of its own to the sys.stderr of its first line -
# one test's captured stream - and later lines, from background runs too, print errors into other tests' stderr.
logging.getLogger("werkzeug").setLevel(logging.WARNING)
logging.getLogger("werkzeug").addHandler(logging.NullHandler())  # "has a handler": werkzeug adds none
# What a unit test may not use: Ray, the S3 server, and the studies built with them.
NOT_FOR_UNIT = {"ray_local", "s3_servers", "s3_server", "s3_steady", "s3_bucket", "score_study", "study"}


def pytest_collection_modifyitems(config, items):
    """Each test gets its tier's marker, and the session runs in an order that keeps both cores busy: the system
    tests that wait on processes of their own (about 40 % of their time idle, measured with vmstat), then the stage
    tier (in-process Ray, about 35 % idle), then the system tests that judge the whole-process runs started in the
    background at the first test (tests/early.py: the demo, `make demo-cluster`, the multi-node cluster, the jobs on
    a local head, the docs' laptop commands), then the unit tier (whose mypy ran in the background too); the
    background runs fill the system tests' idle time and overlap the stage tier. (Measured: `pytest
    -n 2` with a module per worker and the shared study on one was slower than one process on 2 cores.)"""
    for item in items:
        parts = pathlib.Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        tier = parts[0] if len(parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/stage or tests/system")
        item.add_marker(getattr(pytest.mark, tier))
        used = NOT_FOR_UNIT & set(getattr(item, "fixturenames", ()))
        if tier == "unit" and used:
            raise pytest.UsageError(f"{item.nodeid}: a unit test uses {sorted(used)}: move it to tests/stage")
    if items and not items[0].get_closest_marker("unit"):  # a session that starts with the unit tier keeps its order
        items.sort(key=_session_order)


def _uses_the_demo(item) -> bool:
    return item.nodeid.startswith("tests/system/test_pipeline.py::") and "demo" in item.fixturenames


def _uses_the_local_head(item) -> bool:
    return item.nodeid.startswith("tests/system/test_jobs.py::") and "jobs" in item.fixturenames


def _judges_an_early_run(item) -> bool:
    return (item.nodeid in (DEMO_CLUSTER_TEST, LAPTOP_TEST) or _uses_the_demo(item) or _uses_the_local_head(item)
            or item.nodeid.startswith("tests/system/test_multinode.py::"))


def _session_order(item) -> int:
    if item.get_closest_marker("unit"):
        return 3
    if item.get_closest_marker("stage"):
        return 1
    return 2 if _judges_an_early_run(item) else 0


@pytest.fixture(scope="session")
def ham_dir() -> pathlib.Path:
    if not (HAM / "labels.csv").exists():
        pytest.skip(f"HAM10000 data not found at {HAM} (set DERMRAY_SHARED_DATA)")
    return HAM


@pytest.fixture(scope="session")
def isic_taxonomy_csv() -> pathlib.Path:
    if not ISIC_TAXONOMY.exists():
        pytest.skip(f"ISIC taxonomy not found at {ISIC_TAXONOMY}")
    return ISIC_TAXONOMY


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One in-process Ray for the test session (2 CPUs), shut down at the end. Started after the S3 server so that
    its workers inherit AWS_ENDPOINT_URL."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = False
    if not ray.is_initialized():
        # address="local": a Ray of its own, even when another one runs on the machine (ray.init() would join it).
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_servers():
    """Two real S3 APIs (moto's threaded servers) on 127.0.0.1 sharing one set of buckets (moto keeps its objects per
    process): ``session``, which this process and its in-process Ray use (AWS_ENDPOINT_URL points at it) and which
    the outage tests stop and start again, and ``steady``, never stopped, for the whole-process runs in the
    background (tests/early.py), which an outage of the stage tier must not touch."""
    from helpers import RestartableS3

    session, steady = RestartableS3(), RestartableS3()
    env = session.env()
    # botocore's own retries are off for every S3 client of the session (its workers inherit this): a failed
    # request reaches dermray's own handling (storage.Retry, quarantine, clear errors), which the tests judge,
    # instead of being retried away below it. Nothing else fails on a loopback server.
    env["AWS_MAX_ATTEMPTS"] = "1"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"session": session, "steady": steady}
    finally:
        session.close()
        steady.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(s3_servers):
    """The session's S3 endpoint, as the environment that points at it (AWS_ENDPOINT_URL, credentials, region)."""
    return s3_servers["session"].env()


@pytest.fixture(scope="session")
def s3_steady(s3_servers):
    """The S3 endpoint that no test stops, for the runs in the background (the same buckets as ``s3_server``)."""
    return s3_servers["steady"].env()


@pytest.fixture()
def s3_bucket(s3_server):
    import uuid

    import boto3

    name = f"dermray-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"


# ---- whole-process runs started at the session's first test (tests/early.py) ----
DEMO_CLUSTER_TEST = "tests/system/test_jobs.py::test_make_demo_cluster_submits_the_demo_pipeline_and_stops_its_head"
LAPTOP_TEST = "tests/system/test_docs.py::test_the_submit_from_a_laptop_commands_work_as_written"
MYPY_TEST = "tests/unit/test_architecture.py::test_mypy_is_clean"


@pytest.fixture(scope="session", autouse=True)
def early(request, tmp_path_factory):
    """Starts, in one background thread, the runs that the selected tests judge: the demo pipeline, `make
    demo-cluster` (re-running the demo's run as a job when the demo ran), the multi-node driver, the jobs on a
    local head, the docs' laptop commands and mypy, in that order; a run whose prerequisites are missing is left
    to its test, which skips. Waits for the thread at the end of the session."""
    import shutil
    import sys

    import early as runs

    items = request.session.items
    if items and items[0].get_closest_marker("unit"):
        # The unit tier refuses subprocesses while it runs: started now, these would fail there; their tests run
        # them in the foreground instead.
        items = []
    selected = {item.nodeid for item in items}
    launchers = {}
    if any(_uses_the_demo(item) for item in items):
        demo_dir = tmp_path_factory.mktemp("demo")
        launchers["demo"] = lambda env: runs.demo_pipeline(demo_dir, env)
    if (DEMO_CLUSTER_TEST in selected and (pathlib.Path(sys.executable).parent / "ray").exists()
            and shutil.which("make")):
        def demo_cluster(env):
            # After the demo: a re-run of its run, as a job (tests/early.py); else the pipeline at a reduced size.
            demo = state.results.get("demo", {}).get("value")
            ok = demo is not None and demo["run"].returncode == 0 and demo["summary"] is not None
            return runs.demo_cluster(demo_cluster_dir, env, demo if ok else None)
        demo_cluster_dir = tmp_path_factory.mktemp("demo_cluster")
        launchers["demo_cluster"] = demo_cluster
    if any(n.startswith("tests/system/test_multinode.py::") for n in selected) and (HAM / "labels.csv").exists():
        s3_env = request.getfixturevalue("s3_steady")
        multinode_dir = tmp_path_factory.mktemp("multinode")
        launchers["multinode"] = lambda env: runs.multinode(HAM, s3_env, multinode_dir, env)
    ray_cli = (pathlib.Path(sys.executable).parent / "ray").exists()
    if any(_uses_the_local_head(item) for item in items) and ray_cli and (HAM / "labels.csv").exists():
        request.getfixturevalue("ray_local")  # the study's partition runs in the session's Ray, not one of its own
        score_study = request.getfixturevalue("score_study")  # built here, on the main thread, before the run
        jobs_dir = tmp_path_factory.mktemp("jobs")
        launchers["jobs"] = lambda env: runs.local_head_jobs(jobs_dir, env, score_study)
    if LAPTOP_TEST in selected and ray_cli:
        laptop_dir = tmp_path_factory.mktemp("laptop")
        launchers["laptop"] = lambda env: runs.laptop(laptop_dir, env)
    if MYPY_TEST in selected:  # last: its test runs at the end, in the unit tier
        launchers["mypy"] = runs.mypy
    # The runs' folders are made here, on the main thread: TempPathFactory is not thread-safe, and a background
    # mktemp racing the main thread's first one made two base folders (CI: "demo is not a normalized and relative
    # path", the demo's tests errored).
    state = runs.Early()
    if launchers:
        # The background runs use the S3 endpoint that no test stops (where one is up; only the multi-node run uses
        # S3): the stage tier's outage tests stop the session's while these runs go on.
        steady = request.getfixturevalue("s3_steady") if "multinode" in launchers else {}
        state.start(launchers, steady)
    yield state
    if state.thread is not None:
        state.thread.join()


# ---- the shared synthetic study (tests/study.py): every stage run once, then again, for the whole session ----
@pytest.fixture(scope="session")
def study(tmp_path_factory, ray_local):
    import study as shared_study

    return shared_study.build(tmp_path_factory.mktemp("study"))


# ---- the scoring study (tests/helpers.py builds the fold models) ----


@pytest.fixture(scope="session")
def score_study(ham_dir, tmp_path_factory):
    """40 real images (4 diagnoses) imported and partitioned; two fold models; the 24-image archive in three forms."""
    from dermray.cli import main

    d = tmp_path_factory.mktemp("score_study")
    labels = pd.read_csv(ham_dir / "labels.csv")
    subset = pd.concat([labels[labels.dx == dx].head(10) for dx in ("nv", "mel", "bkl", "bcc")])
    subset.to_csv(d / "labels.csv", index=False)
    assert main(["import", "ham10000", "--metadata", str(d / "labels.csv"), "--images", str(ham_dir / "images"),
                 "--output", str(d / "in")]) == 0
    assert main(["partition", "--manifest", str(d / "in" / "manifest.parquet"), "--taxonomy",
                 str(d / "in" / "taxonomy.parquet"), "--tasks", str(d / "in" / "tasks.yaml"), "--max-class-size",
                 "8", "--folds", "2", "--output", str(d / "out"), "--run-id", "r1"]) == 0
    classes = pyarrow.parquet.read_table(d / "out" / "partition" / "r1" / "training_classes.parquet")
    for k in (0, 1):
        write_fold(d / "out" / "train" / "r1" / f"fold={k}", classes, seed=k, partition=d / "out" / "partition" / "r1")
    # The archive: 24 of the images, as a manifest with relative URIs, a folder + labels CSV, and two tar shards.
    manifest = pd.read_parquet(d / "in" / "manifest.parquet").sort_values("image_id").head(24)
    arch = d / "archive"
    (arch / "images").mkdir(parents=True)
    samples = []
    for r in manifest.itertuples():
        data = open(r.uri, "rb").read()
        (arch / "images" / f"{r.image_id}.jpg").write_bytes(data)
        samples.append((r.image_id, data, {"label": r.label, "label_source": r.label_source,
                                           "modality": r.modality, "group_id": r.group_id}))
    m = manifest.assign(uri=[f"images/{i}.jpg" for i in manifest.image_id])
    m.to_parquet(arch / "manifest.parquet", index=False)
    m[["image_id", "label", "label_source", "modality", "group_id"]].to_csv(arch / "labels.csv", index=False)
    (arch / "shards").mkdir()
    (arch / "shards" / "shard-000.tar").write_bytes(shard_bytes(samples[:12]))
    (arch / "shards" / "shard-001.tar").write_bytes(shard_bytes(samples[12:]))
    return d


