"""Real S3 outages are ridden out by ``storage.Retry`` (the classification and the backoff as pure functions:
tests/unit/test_retry_policy.py). The session's S3 server (tests/conftest.py: s3_servers) is stopped - connections
refused - and started again on the same port while ``score`` and ``train`` run in this process's Ray and read the
images from it; moto keeps the objects in this process, so they survive the restart.

botocore's own retries are off for the whole session (AWS_MAX_ATTEMPTS=1) and s3fs does not retry a refused
connection, so what rides out an outage is dermray's Retry, nothing below it. The background runs
(tests/early.py) use another server, which is never stopped.
"""
import json
import threading
import time

import pandas as pd
import psutil
import pytest

from dermray.errors import UserError
from dermray.runtime import faults
from dermray.runtime.config import load_config
from dermray.stages import score, train
from dermray.store import storage


@pytest.fixture(scope="module")
def flaky(s3_servers, ray_local):
    """The session's S3 server, which these tests stop and start again (always up again when a test ends)."""
    server = s3_servers["session"]
    yield server
    if not server.up:
        server.start()


@pytest.fixture(scope="module")
def flaky_study(score_study, flaky):
    """score_study's 40 images on S3, and its manifests with s3:// URIs (local files: only the image reads go to S3,
    so an outage of the server is an outage of the image reads alone)."""
    d = score_study
    client = flaky.client()
    client.create_bucket(Bucket="flaky-images")
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


def test_a_read_during_an_outage_is_transient_and_a_missing_object_is_permanent(flaky, flaky_study):
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


def session_worker_titles() -> set[str]:
    """The command lines (process titles: ``ray::<task>``) of this process's Ray workers: the descendants of the
    raylet this process started (the background runs' Rays are not its children)."""
    titles = set()
    for raylet in psutil.Process().children():
        try:
            if "raylet" not in " ".join(raylet.cmdline()[:1]):
                continue
            for worker in raylet.children(recursive=True):
                titles.add(" ".join(worker.cmdline()))
        except psutil.Error:
            pass
    return titles


def run_with_outage(run, server, until, during=None, timeout_s: float = 300):
    """Call ``run()`` (a stage, in this process) with ``server`` stopped from the start until ``until(titles)`` is
    true for the titles of this process's Ray workers (e.g. an image-decoding task is running: its reads are failing
    right now), then started again. ``during(titles)``, when given, is called on every poll after that (a second
    outage). The server is up again when this returns, whatever happened; past ``timeout_s`` it is started again
    and the outage recorded as unfinished. Returns what ``run()`` returned."""
    server.outages.clear()
    done = threading.Event()
    timed_out = []

    def control():
        deadline = time.time() + timeout_s
        while not done.wait(0.1):
            if time.time() > deadline:
                timed_out.append(True)
                break
            titles = session_worker_titles()
            if not server.up and len(server.outages) == 1 and until(titles):
                server.start()
            elif during is not None and len(server.outages[0]) == 2:  # the first outage is over
                during(titles)

    server.stop()
    controller = threading.Thread(target=control, name="s3-outage", daemon=True)
    controller.start()
    try:
        result = run()
    finally:
        done.set()
        controller.join()
        if not server.up:
            server.start()
    print("\nS3 down for " + ", ".join(f"{o[1] - o[0]:.1f} s" for o in server.outages if len(o) == 2))
    assert not timed_out, f"the outage was not over after {timeout_s} s: {server.outages}"
    return result


def decoding(*names):
    """until(): a Ray task whose name holds one of ``names`` has been running for 2 s (its reads are retrying)."""
    first = {}

    def check(titles: set) -> bool:
        if any(n in t for t in titles for n in names):
            first.setdefault("t", time.time())
        return "t" in first and time.time() - first["t"] > 2.0
    return check


def score_config(study: dict, out, run_id: str, *sets):
    d = study["dir"]
    return load_config(None, [
        f"score.input={study['score_manifest']}", f"score.checkpoints={d / 'out' / 'train' / 'r1'}",
        f"output={out}", f"run_id={run_id}", f"data.tasks={d / 'in' / 'tasks.yaml'}",
        f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}", "score.batch_size=4", "score.rows_per_file=4",
        "score.decode_cpus=0.5", "score.cpus_per_actor=0.5", *sets])


def test_an_s3_outage_while_score_reads_images_is_ridden_out_by_the_retries(flaky, flaky_study, tmp_path,
                                                                            monkeypatch):
    """The server is down from the start until a decode task has been failing to read for 2 s; the default
    retries (5, from 0.25 s) carry every read over the restart: nothing quarantined but the missing object, every
    image scored exactly once."""
    monkeypatch.setenv(faults.ENV, json.dumps({"slow_batch_s": 0.3}))
    s = run_with_outage(lambda: score.run(score_config(flaky_study, tmp_path, "outage")), flaky,
                        until=decoding("decode_rows"))
    (start, end), = flaky.outages[-1:]
    assert end - start > 2.0
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
    that part certainly failed): (summary, quarantine, output folder)."""
    out = tmp_path_factory.mktemp("no_retry")
    state = out / "predictions" / "noretry" / "_state"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(faults.ENV, json.dumps({"slow_batch_s": 0.3}))
        s = run_with_outage(lambda: score.run(score_config(flaky_study, out, "noretry", "storage.retries=0")), flaky,
                            until=lambda titles: state.exists() and any(state.glob("quarantine-b*.parquet")))
    return s, pd.read_parquet(out / "predictions" / "noretry" / "quarantine.parquet"), out


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


def test_a_rerun_with_the_server_up_scores_the_images_the_outage_hit_and_only_those(no_retry_run, flaky_study):
    """The re-run after the outage (same config, same run id, S3 up): what was quarantined as transient is scored
    now, what was scored is not scored again, and only the missing object stays in quarantine."""
    first, q, out = no_retry_run
    transient = set(q.loc[q.image_id != "ISIC_missing", "image_id"])
    s = score.run(score_config(flaky_study, out, "noretry", "storage.retries=0"))
    n = flaky_study["score_images"]
    assert s["scored"] == len(transient) and s["already_done"] == first["scored"], s
    preds = pd.read_parquet(out / "predictions" / "noretry" / "predictions")
    assert len(preds) == n and preds["image_id"].is_unique and transient <= set(preds["image_id"])
    q2 = pd.read_parquet(out / "predictions" / "noretry" / "quarantine.parquet")
    assert q2["image_id"].tolist() == ["ISIC_missing"], q2


def test_s3_outages_while_train_reads_images_are_ridden_out_and_the_fold_finishes(flaky, flaky_study, tmp_path,
                                                                                 monkeypatch):
    """Two outages: from the start until the undecodable-image scan (find_undecodable) has been failing for 2 s,
    and again from the start of epoch 1 until an epoch's decoding (decode_transform: epoch 1's selection pass or
    epoch 2's prefetch) has been failing for 2 s. The fold trains both epochs with nothing quarantined."""
    d = flaky_study["dir"]
    events = tmp_path / "events-{fold}"
    monkeypatch.setenv(faults.ENV, json.dumps({"slow_batch_s": 0.3, "events_file": str(events)}))
    cfg = load_config(None, [
        f"data.manifest={flaky_study['train_manifest']}", f"output={tmp_path / 'out'}", "run_id=outage",
        f"train.partition={d / 'out' / 'partition' / 'r1'}", "train.arch=mobilenet_v3_small", "train.weights=none",
        "train.image_size=32", "train.batch_size=8", "train.epochs=2", "train.folds=[0]", "train.cpus_per_worker=0.5",
        "train.data_cpus=0.5", f"data.tasks={d / 'in' / 'tasks.yaml'}",
        f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}"])
    second = {"until": None}

    def during(titles):
        if len(flaky.outages) == 1 and "1" in _read(str(events).format(fold=0)).split():
            flaky.stop()  # epoch 1 has begun
            second["until"] = decoding("decode_transform")
        elif len(flaky.outages) == 2 and not flaky.up and second["until"](titles):
            flaky.start()

    s = run_with_outage(lambda: train.run(cfg), flaky, until=decoding("find_undecodable"), during=during)
    assert len(flaky.outages) >= 2 and all(len(o) == 2 and o[1] - o[0] > 2.0 for o in flaky.outages[-2:]), \
        flaky.outages
    assert s["quarantined"] == 0 and s["trained_on"] == s["images"], s
    assert s["per_fold"][0]["epochs"] == 2
    assert _read(str(events).format(fold=0)).split() == ["0", "1"]  # no restart: the reads rode the outage out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
