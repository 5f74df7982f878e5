"""Real S3 outages are ridden out by ``storage.Retry`` (the classification and the backoff as pure functions:
tests/unit/test_retry_policy.py). A dedicated moto S3 server on a fixed
port holds the images and is stopped and restarted (moto keeps its objects in this process) while ``dermray score``
and ``dermray train`` read them. Those stages run in subprocesses with their own environment (their own Ray and
AWS_ENDPOINT_URL pointing at the dedicated server): the session's in-process Ray workers inherited the session
server's endpoint, and stopping that server would break other tests.

botocore's own retries are turned off in the subprocesses (AWS_MAX_ATTEMPTS=1) and s3fs does not retry a refused
connection, so what rides out the outage is dermray's Retry, nothing below it.
"""
import json
import os
import subprocess
import sys
import time

import boto3
import pandas as pd
import psutil
import pytest

from dermray import faults, storage
from dermray.errors import UserError

from helpers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- a real S3 server, stopped and restarted -------------------------------------------------------------------
class FlakyServer:
    """A moto server on a fixed port that can be stopped (connections refused) and started again."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.outages: list[list[float]] = []
        self.start()

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        if self.outages and len(self.outages[-1]) == 1:
            self.outages[-1].append(time.time())

    def stop(self) -> None:
        self.server.stop()
        self.server = None
        self.outages.append([time.time()])

    @property
    def up(self) -> bool:
        return self.server is not None

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def env(self, **extra) -> dict:
        """The environment of a subprocess that uses this server (and its own in-process Ray)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", faults.ENV)}
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1", **extra)
        return env


@pytest.fixture(scope="module")
def flaky():
    import logging

    requests_log = logging.getLogger("werkzeug")  # moto's request lines: hundreds per run
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    server = FlakyServer()
    server.client().create_bucket(Bucket="flaky-images")
    yield server
    if server.up:
        server.server.stop()
    requests_log.setLevel(level)


@pytest.fixture(scope="module")
def flaky_study(score_study, flaky):
    """score_study's 40 images on the dedicated server, and its manifests with s3:// URIs (local files: only the
    image reads go to S3, so an outage of the server is an outage of the image reads alone)."""
    d = score_study
    client = flaky.client()
    manifest = pd.read_parquet(d / "in" / "manifest.parquet")
    for r in manifest.itertuples():
        with open(r.uri, "rb") as f:
            client.put_object(Bucket="flaky-images", Key=f"images/{r.image_id}.jpg", Body=f.read())
    out = d / "flaky"
    out.mkdir(exist_ok=True)
    s3 = manifest.assign(uri=[f"s3://flaky-images/images/{i}.jpg" for i in manifest.image_id])
    s3.to_parquet(out / "train_manifest.parquet", index=False)
    archive = pd.read_parquet(d / "archive" / "manifest.parquet")
    score_rows = s3[s3.image_id.isin(archive.image_id)].sort_values("image_id")
    missing = score_rows.head(1).assign(image_id="ISIC_missing", uri="s3://flaky-images/images/ISIC_missing.jpg")
    pd.concat([score_rows, missing]).to_parquet(out / "score_manifest.parquet", index=False)
    return {"dir": d, "train_manifest": out / "train_manifest.parquet",
            "score_manifest": out / "score_manifest.parquet", "score_images": len(score_rows)}


def test_a_read_during_an_outage_is_transient_and_a_missing_object_is_permanent(flaky, flaky_study, monkeypatch):
    for k, v in flaky.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    uri = f"s3://flaky-images/images/{pd.read_parquet(flaky_study['train_manifest']).image_id[0]}.jpg"
    data = storage.read_bytes(uri)
    flaky.stop()
    try:
        t0 = time.time()
        with pytest.raises(storage.TransientReadError, match="after 3 attempts"):
            storage.read_bytes(uri, storage.Retry(retries=2, base_s=0.05))
        assert time.time() - t0 < 30
    finally:
        flaky.start()
    assert storage.read_bytes(uri) == data
    t0 = time.time()
    with pytest.raises(UserError, match="no such file or object") as e:
        storage.read_bytes("s3://flaky-images/images/nope.jpg")
    assert not isinstance(e.value, storage.TransientReadError) and time.time() - t0 < 5  # not retried


def _titles(pids: dict) -> set:
    out = set()
    for p in list(pids.values()):
        try:
            out.add(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return out


def run_with_outage(args: list[str], env: dict, server: FlakyServer, log_path, until, timeout_s: float = 300,
                    during=None) -> tuple[int, str, str]:
    """Run ``args`` with ``server`` stopped from the start until ``until(titles)`` is true for the subprocess's
    process titles (e.g. an image-decoding Ray task is running: its reads are failing right now), then started
    again. ``during(titles)``, when given, is called on every poll after that (a second outage). Every process the
    subprocess started is killed at the end (by PID). Returns (exit code, stdout, stderr)."""
    seen: dict[int, psutil.Process] = {}
    server.outages.clear()
    with open(log_path, "w") as log, open(f"{log_path}.out", "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=log, cwd=REPO)
        server.stop()
        try:
            deadline = time.time() + timeout_s
            while proc.poll() is None and time.time() < deadline:
                try:
                    for c in psutil.Process(proc.pid).children(recursive=True):
                        seen.setdefault(c.pid, c)
                except psutil.NoSuchProcess:
                    pass
                titles = _titles({k: v for k, v in seen.items() if v.is_running()})
                if not server.up and len(server.outages) == 1 and until(titles):
                    server.start()
                elif during is not None and len(server.outages[0]) == 2:  # the first outage is over
                    during(titles)
                time.sleep(0.1)
            rc = proc.poll()
            if rc is None:
                proc.kill()
                rc = proc.wait(30)
        finally:
            if not server.up:
                server.start()
            for p in [psutil.Process(proc.pid)] if proc.poll() is None else []:
                p.kill()
            for p in seen.values():  # the subprocess's own Ray, by PID (only what is still that process)
                try:
                    if p.is_running():
                        p.kill()
                except psutil.Error:
                    pass
    print(f"\n{os.path.basename(str(log_path))}: S3 down for " + ", ".join(
        f"{o[1] - o[0]:.1f} s" for o in server.outages if len(o) == 2) + f"; exit {rc}")
    with open(log_path) as f, open(f"{log_path}.out") as out:
        return rc, out.read(), f.read()


def decoding(*names):
    """until(): a Ray task whose name holds one of ``names`` has been running for 2 s (its reads are retrying)."""
    first = {}

    def check(titles: set) -> bool:
        if any(n in t for t in titles for n in names):
            first.setdefault("t", time.time())
        return "t" in first and time.time() - first["t"] > 2.0
    return check


def score_args(study: dict, out, run_id: str, *sets) -> list[str]:
    d = study["dir"]
    args = [sys.executable, "-m", "dermray.cli", "score", "--input", str(study["score_manifest"]),
            "--checkpoint", str(d / "out" / "train" / "r1"), "--output", str(out), "--run-id", run_id, "--json"]
    for s in ("ray.num_cpus=2", "score.batch_size=4", "score.rows_per_file=4", "score.decode_cpus=0.5",
              "score.cpus_per_actor=0.5", *sets):
        args += ["--set", s]
    return args


def summary_of(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def test_an_s3_outage_while_score_reads_images_is_ridden_out_by_the_retries(flaky, flaky_study, tmp_path):
    """The server is down from the start until a decode task has been failing to read for 2 s; the default
    retries (5, from 0.25 s) carry every read over the restart: nothing quarantined but the missing object, every
    image scored exactly once."""
    env = flaky.env(**{faults.ENV: json.dumps({"slow_batch_s": 0.3})})
    rc, output, log = run_with_outage(score_args(flaky_study, tmp_path, "outage"), env, flaky, tmp_path / "score.log",
                                 until=decoding("decode_rows"))
    assert rc == 0, log[-4000:]
    (start, end), = flaky.outages[-1:]
    assert end - start > 2.0
    s = summary_of(output)
    n = flaky_study["score_images"]
    assert (s["input"], s["scored"], s["quarantined"], s["already_done"]) == (n + 1, n, 1, 0), s
    preds = pd.read_parquet(tmp_path / "predictions" / "outage" / "predictions")
    assert len(preds) == n and preds["image_id"].is_unique and "ISIC_missing" not in set(preds["image_id"])
    q = pd.read_parquet(tmp_path / "predictions" / "outage" / "quarantine.parquet")
    assert q["image_id"].tolist() == ["ISIC_missing"], q
    reason = q["reason"].iloc[0]
    assert "no such file or object" in reason and not reason.startswith("transient: "), reason


@pytest.fixture(scope="module")
def no_retry_run(flaky, flaky_study, tmp_path_factory):
    """The control: the same outage with storage.retries=0, held until the first part is written (so the reads of
    that part certainly failed): (summary, quarantine)."""
    out = tmp_path_factory.mktemp("no_retry")
    state = out / "predictions" / "noretry" / "_state"
    env = flaky.env(**{faults.ENV: json.dumps({"slow_batch_s": 0.3})})
    rc, output, log = run_with_outage(
        score_args(flaky_study, out, "noretry", "storage.retries=0"), env, flaky, out / "score.log",
        until=lambda titles: state.exists() and any(state.glob("quarantine-b*.parquet")))
    assert rc == 0, log[-4000:]
    return summary_of(output), pd.read_parquet(out / "predictions" / "noretry" / "quarantine.parquet"), out


def test_without_retries_the_same_outage_quarantines_the_images_it_hit(no_retry_run, flaky_study):
    s, q, _ = no_retry_run
    n = flaky_study["score_images"]
    assert s["input"] == s["scored"] + s["quarantined"] == n + 1
    hit = q[q.image_id != "ISIC_missing"]
    assert len(hit) >= 4, q  # at least the first part's images: their reads met the stopped server
    assert hit["reason"].str.contains("cannot read s3://flaky-images/").all(), hit["reason"].tolist()


def test_without_retries_images_hit_by_the_outage_are_marked_transient_for_a_rerun(no_retry_run):
    _, q, _ = no_retry_run
    hit = q[q.image_id != "ISIC_missing"]
    assert len(hit) and hit["reason"].str.startswith("transient: ").all(), hit["reason"].tolist()


def test_a_rerun_with_the_server_up_scores_the_images_the_outage_hit_and_only_those(no_retry_run, flaky,
                                                                                   flaky_study):
    """The re-run after the outage (same command, same run id, S3 up): what was quarantined as transient is scored
    now, what was scored is not scored again, and only the missing object stays in quarantine."""
    first, q, out = no_retry_run
    transient = set(q.loc[q.image_id != "ISIC_missing", "image_id"])
    args = score_args(flaky_study, out, "noretry", "storage.retries=0")
    rerun = subprocess.run(args, env=flaky.env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    s = summary_of(rerun.stdout)
    n = flaky_study["score_images"]
    assert s["scored"] == len(transient) and s["already_done"] == first["scored"], s
    preds = pd.read_parquet(out / "predictions" / "noretry" / "predictions")
    assert len(preds) == n and preds["image_id"].is_unique and transient <= set(preds["image_id"])
    q2 = pd.read_parquet(out / "predictions" / "noretry" / "quarantine.parquet")
    assert q2["image_id"].tolist() == ["ISIC_missing"], q2


def test_s3_outages_while_train_reads_images_are_ridden_out_and_the_fold_finishes(flaky, flaky_study, tmp_path):
    """Two outages: from the start until the undecodable-image scan (find_undecodable) has been failing for 2 s,
    and again from the start of epoch 1 until an epoch's decoding (decode_transform: epoch 1's selection pass or
    epoch 2's prefetch) has been failing for 2 s. The fold trains both epochs with nothing quarantined."""
    d = flaky_study["dir"]
    events = tmp_path / "events-{fold}"
    env = flaky.env(**{faults.ENV: json.dumps({"slow_batch_s": 0.3, "events_file": str(events)})})
    args = [sys.executable, "-m", "dermray.cli", "train", "--manifest", str(flaky_study["train_manifest"]),
            "--output", str(tmp_path / "out"), "--run-id", "outage", "--json"]
    for s in ("ray.num_cpus=2", f"train.partition={d / 'out' / 'partition' / 'r1'}", "train.arch=mobilenet_v3_small",
              "train.weights=none", "train.image_size=32", "train.batch_size=8", "train.epochs=2", "train.folds=[0]",
              "train.cpus_per_worker=0.5", "train.data_cpus=0.5", f"data.tasks={d / 'in' / 'tasks.yaml'}",
              f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}"):
        args += ["--set", s]
    second = {"until": None}

    def during(titles):
        if len(flaky.outages) == 1 and "1" in _read(str(events).format(fold=0)).split():
            flaky.stop()  # epoch 1 has begun
            second["until"] = decoding("decode_transform")
        elif len(flaky.outages) == 2 and not flaky.up and second["until"](titles):
            flaky.start()

    rc, output, log = run_with_outage(args, env, flaky, tmp_path / "train.log", until=decoding("find_undecodable"),
                                 during=during)
    assert rc == 0, log[-4000:]
    assert len(flaky.outages) >= 2 and all(len(o) == 2 and o[1] - o[0] > 2.0 for o in flaky.outages[-2:]), \
        flaky.outages
    s = summary_of(output)
    assert s["quarantined"] == 0 and s["trained_on"] == s["images"], s
    assert s["per_fold"][0]["epochs"] == 2
    assert _read(str(events).format(fold=0)).split() == ["0", "1"]  # no restart: the reads rode the outage out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
