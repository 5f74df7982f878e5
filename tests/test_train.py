"""Real Ray Train runs on a small real subset of HAM10000 (tiny model, small images, 2 folds, 1-3 epochs)."""
import json
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

from dermray import artifacts, evaluate, faults, models, storage, train, trainloop
from dermray.cli import main
from dermray.config import load_config
from dermray.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_study(ham_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("train_study")
    labels = pd.read_csv(ham_dir / "labels.csv")
    subset = pd.concat([labels[labels.dx == dx].head(30) for dx in ("nv", "mel", "bkl", "bcc")])
    subset.to_csv(d / "labels.csv", index=False)
    assert main(["import", "ham10000", "--metadata", str(d / "labels.csv"), "--images", str(ham_dir / "images"),
                 "--output", str(d / "in")]) == 0
    assert main(["partition", "--manifest", str(d / "in" / "manifest.parquet"), "--taxonomy",
                 str(d / "in" / "taxonomy.parquet"), "--tasks", str(d / "in" / "tasks.yaml"), "--max-class-size",
                 "20", "--folds", "2", "--output", str(d / "out"), "--run-id", "p"]) == 0
    return d


def config(d, *extra):
    return load_config(None, [
        f"data.manifest={d / 'in' / 'manifest.parquet'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
        f"data.tasks={d / 'in' / 'tasks.yaml'}", f"output={d / 'out'}", "train.arch=mobilenet_v3_small",
        "train.weights=none", "train.image_size=64", "train.batch_size=16", "train.cpus_per_worker=0.5",
        "train.data_cpus=0.5", f"train.partition={d / 'out' / 'partition' / 'p'}", *extra])


def test_two_folds_train_concurrently_and_write_their_outputs(small_study, ray_local):
    d = small_study
    s = train.run(config(d, "run_id=cv", "train.epochs=2"))
    assert s["folds"] == ["0", "1"] and s["trained_on"] == 120 and s["quarantined"] == 0
    f0, f1 = s["per_fold"]
    # The folds ran at the same time: their training windows overlap.
    assert f0["t_start"] < f1["t_end"] and f1["t_start"] < f0["t_end"], (f0, f1)
    run_dir = d / "out" / "train" / "cv"
    n_classes = len(pd.read_parquet(d / "out" / "partition" / "p" / "training_classes.parquet"))
    for fold in ("fold=0", "fold=1"):
        metrics = pd.read_parquet(run_dir / fold / "metrics.parquet")
        assert set(metrics["epoch"]) == {0, 1}
        assert {"loss", "top1", "acc_melanoma_vs_nevus", "acc_three_class"} <= set(
            metrics.loc[metrics.split == "select", "metric"])
        card = json.loads((run_dir / fold / "model_card.json").read_text())
        assert card["architecture"] == "mobilenet_v3_small" and card["input_size"] == 64
        assert len(card["training_classes"]) == n_classes and card["epochs_trained"] == 2
        assert {"torch", "ray", "dermray"} <= set(card["versions"])
        model = models.build_model("mobilenet_v3_small", n_classes, weights=str(run_dir / fold / "best" / "model.pt"))
        assert model.classifier[3].out_features == n_classes
        preds = pd.read_parquet(run_dir / fold / "val_predictions.parquet")
        assert len(preds) == (pd.read_parquet(d / "out" / "partition" / "p" / "labels.parquet")["fold"]
                              == int(fold[-1])).sum()
        assert len(preds["probs"].iloc[0]) == n_classes
        assert {"label", "label_source", "group_id", "model_id"} <= set(preds.columns)
    summary = pd.read_parquet(run_dir / "train_summary.parquet")
    row = summary.set_index("metric").loc["val_acc_three_class"]
    assert row["folds"] == 2 and 0 <= row["mean"] <= 1
    # The cross-validation predictions feed the evaluation stage (the paper's first round).
    all_preds = pd.concat([pd.read_parquet(run_dir / f / "val_predictions.parquet") for f in ("fold=0", "fold=1")])
    all_preds["model_id"] = "cv"
    all_preds.to_parquet(d / "cv_predictions.parquet")
    ev = evaluate.run(load_config(None, [f"evaluate.predictions={d / 'cv_predictions.parquet'}",
                                         f"data.tasks={d / 'in' / 'tasks.yaml'}",
                                         f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
                                         f"evaluate.partition={d / 'out' / 'partition' / 'p'}",
                                         f"output={d / 'out'}", "run_id=cv", "evaluate.n_bootstrap=50"]))
    assert any(h["metric"] == "auc" and h["task"] == "melanoma_vs_nevus" for h in ev["headline"])


def test_calibration_and_operating_points_are_locked_out_of_fold_and_applied_when_scoring(small_study, ray_local):
    """After training, the folds' held-out predictions fit one temperature and choose per binary task the
    thresholds (target sensitivity, Youden) written into every model card; scoring applies them (calibrated probs
    beside probs_raw, <task>_positive at the locked threshold); evaluation measures them with CIs, apart from the
    thresholds it picks on the test data itself (marked oracle)."""
    from dermray import metrics as M, score

    d = small_study
    s = train.run(config(d, "run_id=locked", "train.epochs=1"))
    card = json.loads((d / "out" / "train" / "locked" / "fold=0" / "model_card.json").read_text())
    cal, points = card["calibration"], card["operating_points"]
    assert cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"] and "folds 0, 1" in cal["fitted_on"]
    mvn = {p["name"]: p for p in points if p["task"] == "melanoma_vs_nevus"}
    assert {"sens0.95", "youden"} <= set(mvn) and mvn["sens0.95"]["sensitivity"] >= 0.95
    assert json.loads((d / "out" / "train" / "locked" / "fold=1" / "model_card.json").read_text())[
        "operating_points"] == points  # one set for the run's ensemble
    # The locked values are what the out-of-fold predictions give (recomputed here from the written files).
    oof = pd.concat([pd.read_parquet(d / "out" / "train" / "locked" / f / "val_predictions.parquet")
                     for f in ("fold=0", "fold=1")])
    t, _, _ = M.fit_temperature(np.stack(oof["probs"]).astype(float), oof["class_index"].to_numpy())
    assert abs(t - cal["temperature"]) < 1e-6 and s["calibration"]["temperature"] == cal["temperature"]
    sc = score.run(load_config(None, [
        f"data.tasks={d / 'in' / 'tasks.yaml'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
        f"score.checkpoints={d / 'out' / 'train' / 'locked'}", f"score.input={d / 'in' / 'manifest.parquet'}",
        f"output={d / 'out'}", "run_id=locked", "score.batch_size=16", "score.cpus_per_actor=0.5"]))
    preds = pd.read_parquet(d / "out" / "predictions" / "locked" / "predictions")
    raw = np.stack(preds["probs_raw"]).astype(float)
    np.testing.assert_allclose(np.stack(preds["probs"]), M.apply_temperature(raw, cal["temperature"]), atol=1e-5)
    thr = mvn["sens0.95"]["threshold"]
    inside = preds["melanoma_vs_nevus_score"].notna()
    assert ((preds.loc[inside, "melanoma_vs_nevus_score"] >= thr) == preds.loc[inside, "melanoma_vs_nevus_positive"]
            ).all()
    assert sc["decisions"]["thresholds"]["melanoma_vs_nevus"]["name"] == "sens0.95"
    ev = evaluate.run(load_config(None, [
        f"evaluate.predictions={d / 'out' / 'predictions' / 'locked' / 'predictions'}",
        f"data.tasks={d / 'in' / 'tasks.yaml'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
        f"output={d / 'out'}", "run_id=locked", "evaluate.n_bootstrap=50"]))
    m = pd.read_parquet(ev["outputs"]["metrics"]).query("task == 'melanoma_vs_nevus' and subset == 'all'")
    m = m.set_index("metric")
    assert m.loc["threshold@locked:sens0.95", "value"] == pytest.approx(thr)
    for rate in ("sensitivity", "specificity", "ppv", "npv"):
        row = m.loc[f"{rate}@locked:sens0.95"]
        if pd.isna(row["value"]):  # e.g. no image called negative: NPV has no denominator
            assert row["note"].startswith("undefined"), rate
        else:
            assert row["ci_low"] <= row["value"] <= row["ci_high"], rate
    assert "sensitivity@oracle:youden" in m.index and "sensitivity@youden" not in m.index
    assert {"ece", "ece_uncalibrated"} <= set(m.index)


def test_a_killed_worker_resumes_from_its_checkpoint_and_a_rerun_continues(small_study, ray_local, tmp_path,
                                                                           monkeypatch):
    d = small_study
    pid_file, events = tmp_path / "pid", tmp_path / "events"

    snapshot = d / "out" / "train" / "resume" / "fold=0" / "checkpoint_manager_snapshot.json"

    def killer():
        # Kill the worker inside epoch 1, once Ray Train has registered epoch 0's checkpoint.
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                registered = len(json.loads(snapshot.read_text())["checkpoint_results"])
            except (OSError, ValueError, KeyError):
                registered = 0
            if registered >= 1 and "1" in events.read_text().split():
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    monkeypatch.setenv(faults.ENV, json.dumps({"pid_file": str(pid_file), "events_file": str(events),
                                               "slow_batch_s": 0.5}))
    s = train.run(config(d, "run_id=resume", "train.folds=[0]", "train.epochs=3", "train.max_failures=2"))
    thread.join(timeout=1)
    started = [int(x) for x in events.read_text().split()]
    # Epoch 0 was not redone; the epoch the kill interrupted was started again; the fold ended at epoch 2.
    assert started.count(0) == 1 and len(started) == 4 and sorted(set(started)) == [0, 1, 2], started
    assert s["per_fold"][0]["epochs"] == 3
    # Re-running the same run resumes nothing new; another epoch count is another recipe: refused in one line,
    # then trained afresh under --force.
    monkeypatch.setenv(faults.ENV, json.dumps({"events_file": str(events)}))
    s = train.run(config(d, "run_id=resume", "train.folds=[0]", "train.epochs=3"))
    assert [int(x) for x in events.read_text().split()][len(started):] == []
    with pytest.raises(UserError, match=r"fold 0: epochs 3 -> 4; use a new run id, or --force"):
        train.run(config(d, "run_id=resume", "train.folds=[0]", "train.epochs=4"))
    metrics = pd.read_parquet(d / "out" / "train" / "resume" / "fold=0" / "metrics.parquet")
    assert sorted(set(metrics["epoch"])) == [0, 1, 2]
    # The resumed fold's model scores real images.
    from dermray import score
    from dermray.transforms import decode_image, eval_transform

    ens = artifacts.load_ensemble([str(d / "out" / "train" / "resume")])
    uris = pd.read_parquet(d / "in" / "manifest.parquet")["uri"].head(4)
    images = np.stack([np.asarray(eval_transform(decode_image(storage.read_bytes(u)), ens.size)) for u in uris])
    probs = score.Predictor(ens, 2, channels_last=True, tta="none", use_gpu=False)(
        {"image": images, "error": np.array([""] * 4, dtype=object)})["probs"]
    assert probs.shape == (4, ens.n_classes) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_a_fold_directory_without_a_lineage_record_is_refused(small_study, tmp_path):
    d = small_study
    run_dir = d / "out" / "train" / "mismatch" / "fold=0"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_000000").mkdir()
    (run_dir / "checkpoint_000000" / "model.pt").write_bytes(b"old")
    with pytest.raises(UserError, match="holds files with no lineage record"):
        train.run(config(d, "run_id=mismatch", "train.folds=[0]", "train.epochs=1"))


def test_bad_train_settings_are_user_errors(small_study):
    d = small_study
    with pytest.raises(UserError, match="key 'train.arch' must be one of"):
        train.run(config(d, "train.arch=vgg16"))
    with pytest.raises(UserError, match="key 'train.optimizer' must be one of 'rmsprop' or 'adamw'"):
        train.run(config(d, "train.optimizer=sgd"))
    with pytest.raises(UserError, match=r"train.folds \[7\] are not in the labels"):
        train.run(config(d, "train.folds=[7]"))
    with pytest.raises(UserError, match="checkpoint_metric 'acc_nope' names no task"):
        train.run(config(d, "train.checkpoint_metric=val_acc_nope"))


def test_checkpoints_and_outputs_on_s3_and_a_final_model(small_study, ray_local, s3_bucket):
    d = small_study
    out = f"{s3_bucket}/dermray"
    s = train.run(config(d, "run_id=s3run", "train.folds=[1]", "train.final_model=true", "train.epochs=1",
                         f"output={out}", f"train.partition={d / 'out' / 'partition' / 'p'}"))
    assert s["folds"] == ["1", "all"]
    run_dir = f"{out}/train/s3run"
    for fold in ("fold=1", "fold=all"):
        card = json.loads(storage.read_text(f"{run_dir}/{fold}/model_card.json"))
        assert card["epochs_trained"] == 1
        assert storage.exists(f"{run_dir}/{fold}/best/model.pt")
        assert any("checkpoint_" in p for p in storage.list_files(f"{run_dir}/{fold}"))
    assert card["held_out_fold"] is None  # the final model saw every fold
    assert storage.exists(f"{run_dir}/fold=1/val_predictions.parquet")
    assert not storage.exists(f"{run_dir}/fold=all/val_predictions.parquet")


def test_cli_train_user_error_exits_2(small_study, capsys):
    d = small_study
    code = main(["train", "--manifest", str(d / "in" / "manifest.parquet"), "--output", str(d / "out"),
                 "--arch", "alexnet"])
    err = capsys.readouterr().err
    assert code == 2 and "key 'train.arch'" in err and "'alexnet'" in err and len(err.strip().splitlines()) == 1


def test_a_training_time_budget_stops_the_fold(small_study, ray_local, monkeypatch):
    d = small_study
    monkeypatch.setenv(faults.ENV, json.dumps({"slow_batch_s": 0.4}))
    s = train.run(config(d, "run_id=budget", "train.folds=[0]", "train.epochs=5", "train.max_minutes=0.005",
                         "train.checkpoint_metric=train_loss"))
    assert s["per_fold"][0]["epochs"] == 1
    metrics = pd.read_parquet(d / "out" / "train" / "budget" / "fold=0" / "metrics.parquet").set_index("metric")
    assert metrics.loc["stopped_by_budget", "value"] == 1.0


def test_a_last_batch_of_one_image_is_skipped_not_fatal():
    """Batch norm cannot train on one image (inception_v3's aux head raised on such a last batch): it is skipped."""
    import torch

    from dermray.config import TrainConfig

    s = models.spec("inception_v3")
    tc = TrainConfig(arch="inception_v3", weights="none")
    job = trainloop.FoldJob(train=tc, n_classes=3, image_size=299, mean=s.mean, std=s.std)
    model = models.build_model("inception_v3", 3, weights="none")
    rng = np.random.default_rng(0)
    batches = [{"image": torch.from_numpy(rng.integers(0, 256, (n, 299, 299, 3), dtype=np.uint8)),
                "label": torch.tensor([0, 1][:n])} for n in (2, 1)]
    r = trainloop.train_one_epoch(model, trainloop.make_optimizer(model.parameters(), tc), batches, job,
                                  torch.device("cpu"))
    assert (r["images"], r["images_skipped"]) == (2, 1) and np.isfinite(r["loss"])


class _Epochs:
    """make_batches for EpochBatches: epoch e yields (e, 0) .. (e, n - 1); records when each epoch was started and
    whether its iterator was closed."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at, self.started, self.closed = n, fail_at, {}, set()

    def __call__(self, epoch: int):
        self.started[epoch] = time.monotonic()
        try:
            for i in range(self.n):
                if epoch == self.fail_at and i == 2:
                    raise OSError(f"cannot read a block of epoch {epoch}")
                yield (epoch, i)
        finally:
            self.closed.add(epoch)


def test_epoch_batches_hand_out_every_epoch_in_order_and_start_the_next_one_early():
    make = _Epochs(10)
    seen, finished = [], {}
    with trainloop.EpochBatches(make, 2, 5, queue_batches=3) as epochs:
        for epoch in range(2, 5):
            for batch in epochs.epoch(epoch):
                time.sleep(0.01)  # a training step
                seen.append(batch)
            finished[epoch] = time.monotonic()
    assert seen == [(e, i) for e in range(2, 5) for i in range(10)]
    # The next epoch's data was started while the current epoch still had queued batches to train.
    assert make.started[3] < finished[2] and make.started[4] < finished[3]
    assert make.closed == {2, 3, 4}


def test_epoch_batches_stopped_mid_epoch_close_the_running_epoch():
    make = _Epochs(1000)
    t0 = time.monotonic()
    with trainloop.EpochBatches(make, 0, 3, queue_batches=2) as epochs:
        got = [b for _, b in zip(range(5), epochs.epoch(0))]  # the time budget ends the epoch after 5 batches
    assert got == [(0, i) for i in range(5)]
    assert make.closed == {0} and 1 not in make.started and time.monotonic() - t0 < 5


def test_epoch_batches_skip_what_an_unfinished_epoch_left_and_raise_errors_in_the_trainer():
    make = _Epochs(6, fail_at=2)
    with trainloop.EpochBatches(make, 0, 3, queue_batches=2) as epochs:
        assert next(epochs.epoch(0)) == (0, 0)
        assert list(epochs.epoch(1)) == [(1, i) for i in range(6)]
        with pytest.raises(OSError, match="epoch 2"):
            list(epochs.epoch(2))


def test_the_epoch_is_chosen_on_an_inner_split_and_the_held_out_fold_only_measures(small_study, ray_local, tmp_path,
                                                                                   monkeypatch):
    """train.selection: inner (the default): an inner split of the training lesions picks the epoch; the model
    never trains on it nor on the held-out fold, and the held-out fold's predictions (the cross-validation
    estimate) come from the chosen epoch, measured once."""
    d = small_study
    monkeypatch.setenv(faults.ENV, json.dumps({"consumed_file": str(tmp_path / "consumed-{fold}")}))
    s = train.run(config(d, "run_id=inner", "train.folds=[1]", "train.epochs=3", "train.selection_fraction=0.25"))
    fold_dir = d / "out" / "train" / "inner" / "fold=1"
    metrics = pd.read_parquet(fold_dir / "metrics.parquet")
    select_loss = metrics[(metrics.split == "select") & (metrics.metric == "loss")].set_index("epoch")["value"]
    assert len(select_loss) == 3 and s["per_fold"][0]["best_epoch"] == int(select_loss.idxmin())
    assert not (metrics.split == "val").any()  # the held-out fold is not measured per epoch
    preds = pd.read_parquet(fold_dir / "val_predictions.parquet")
    assert set(preds["epoch"]) == {s["per_fold"][0]["best_epoch"]}
    rows = train.plan(config(d, "run_id=inner", "train.folds=[1]", "train.selection_fraction=0.25")).table
    split = train.split_rows(1, rows, config(d, "train.selection_fraction=0.25").train)
    consumed = set((tmp_path / "consumed-1").read_text().split())
    select_ids = set(split["select"].column("image_id").to_pylist())
    val_ids = set(split["val"].column("image_id").to_pylist())
    assert select_ids and consumed == set(split["train"].column("image_id").to_pylist())
    assert not consumed & (select_ids | val_ids)
    assert set(preds["image_id"]) == val_ids
    # Lesion-grouped: no lesion has images both in the selection split and in training.
    groups = dict(zip(rows.column("image_id").to_pylist(), rows.column("group").to_pylist()))
    assert not {groups[i] for i in select_ids} & {groups[i] for i in consumed}
    card = json.loads((fold_dir / "model_card.json").read_text())
    assert "inner split" in card["selection"] and card["validation"]["val_images"] == len(val_ids)


def test_reading_a_large_training_manifest_makes_no_python_object_per_row(tmp_path):
    """The driver's training table stays columnar: 300,000 relative URIs resolved and joined with the labels
    with the traced heap (Python objects and numpy buffers) under 25 bytes per image: a few numeric vectors (the
    fingerprint's row hashes) but no Python string per row (the per-row resolve took 222 bytes per image)."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 300_000
    image_ids = pa.array([f"IMG_{i:07d}" for i in range(n)])
    pq.write_table(pa.table({"image_id": image_ids, "uri": pa.array([f"images/IMG_{i:07d}.jpg" for i in range(n)]),
                             "label": pa.array(["nv", "mel"] * (n // 2)),
                             "group_id": pa.array([f"L{i // 3}" if i % 5 else "" for i in range(n)])}),
                   tmp_path / "manifest.parquet")
    part = tmp_path / "partition"
    part.mkdir()
    pq.write_table(pa.table({"image_id": image_ids, "class_index": pa.array([i % 2 for i in range(n)], pa.int32()),
                             "fold": pa.array([i % 3 for i in range(n)], pa.int32())}), part / "labels.parquet")
    pq.write_table(pa.table({"class_index": pa.array([0, 1], pa.int32()), "node_id": ["nv", "mel"],
                             "name": ["nevus", "melanoma"], "n_images": pa.array([n // 2] * 2, pa.int64()),
                             "scope": ["subtree"] * 2}), part / "training_classes.parquet")
    del image_ids
    cfg = load_config(None, [f"data.manifest={tmp_path / 'manifest.parquet'}", f"output={tmp_path / 'out'}"])
    train.read_rows(cfg, str(part))  # imports and caches warmed, so the peak below is the read's own
    tracemalloc.start()
    try:
        table, classes, fingerprints = train.read_rows(cfg, str(part))
        folds = train.fold_names(table, cfg.train)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert table.num_rows == n and folds == [0, 1, 2] + (["final"] if cfg.train.final_model else [])
    assert table.column("uri")[7].as_py() == str(tmp_path / "images" / "IMG_0000007.jpg")
    # An image without a group (empty group_id) is a group of its own.
    assert table.column("group")[0].as_py() == "IMG_0000000" and table.column("group")[1].as_py() == "L0"
    assert peak / n < 25, f"read_rows held {peak / 1e6:.1f} MB of Python objects and numpy buffers for {n:,} rows"
