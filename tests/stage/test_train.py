"""Real Ray Train runs on the shared synthetic study (tests/study.py: a tiny model, 32 px images, 2 folds). The
study's own training run (two epochs, both folds) is judged here as it was trained; tests that kill, resume, change
a setting or write to S3 train runs of their own from the study's data and partition."""
import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

from dermray.cli import main
from dermray.errors import UserError
from dermray.runtime import artifacts, faults
from dermray.runtime.config import load_config
from dermray.stages import evaluate, train
from dermray.stages.train.data import split_rows
from dermray.stages.train.plan import plan
from dermray.store import models, storage


@pytest.fixture(scope="module")
def small_study(study, tmp_path_factory):
    """The study's inputs at d/in and its partition at d/out/partition/p (a copy: runs of their own go to d/out)."""
    import shutil

    d = tmp_path_factory.mktemp("train_study")
    (d / "in").symlink_to(study["data"], target_is_directory=True)
    shutil.copytree(study["out"] / "partition" / "c", d / "out" / "partition" / "p")
    return d


def config(d, *extra):
    return load_config(None, [
        f"data.manifest={d / 'in' / 'manifest.parquet'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
        f"data.tasks={d / 'in' / 'tasks.yaml'}", f"output={d / 'out'}", "train.arch=mobilenet_v3_small",
        "train.weights=none", "train.image_size=32", "train.batch_size=8", "train.cpus_per_worker=0.5",
        "train.data_cpus=0.5", f"train.partition={d / 'out' / 'partition' / 'p'}", *extra])


def test_two_folds_train_concurrently_and_write_their_outputs(study, tmp_path):
    s = study["runs"]["train"][0]["summary"]
    out = study["out"]
    labels = pd.read_parquet(out / "partition" / "c" / "labels.parquet")
    assert s["folds"] == ["0", "1"] and s["trained_on"] == len(labels) and s["quarantined"] == 0
    f0, f1 = s["per_fold"]
    # The folds ran at the same time: their training windows overlap.
    assert f0["t_start"] < f1["t_end"] and f1["t_start"] < f0["t_end"], (f0, f1)
    run_dir = out / "train" / "c"
    n_classes = len(pd.read_parquet(out / "partition" / "c" / "training_classes.parquet"))
    for fold in ("fold=0", "fold=1"):
        metrics = pd.read_parquet(run_dir / fold / "metrics.parquet")
        assert set(metrics["epoch"]) == {1, 2}  # numbered from 1
        assert {"loss", "top1", "acc_melanoma_vs_nevus", "acc_three_class"} <= set(
            metrics.loc[metrics.split == "select", "metric"])
        card = json.loads((run_dir / fold / "model_card.json").read_text())
        assert card["architecture"] == "mobilenet_v3_small" and card["input_size"] == 32
        assert len(card["training_classes"]) == n_classes and card["epochs_trained"] == 2
        assert {"torch", "ray", "dermray"} <= set(card["versions"])
        model = models.build_model("mobilenet_v3_small", n_classes, weights=str(run_dir / fold / "best" / "model.pt"))
        assert model.classifier[3].out_features == n_classes
        preds = pd.read_parquet(run_dir / fold / "val_predictions.parquet")
        assert len(preds) == (labels["fold"] == int(fold[-1])).sum()
        assert len(preds["probs"].iloc[0]) == n_classes
        assert {"label", "label_source", "group_id", "model_id"} <= set(preds.columns)
    summary = pd.read_parquet(run_dir / "train_summary.parquet")
    row = summary.set_index("metric").loc["val_acc_three_class"]
    assert row["folds"] == 2 and 0 <= row["mean"] <= 1
    # The cross-validation predictions feed the evaluation stage (the paper's first round).
    all_preds = pd.concat([pd.read_parquet(run_dir / f / "val_predictions.parquet") for f in ("fold=0", "fold=1")])
    all_preds["model_id"] = "cv"
    all_preds.to_parquet(tmp_path / "cv_predictions.parquet")
    data = study["data"]
    ev = evaluate.run(load_config(None, [f"evaluate.predictions={tmp_path / 'cv_predictions.parquet'}",
                                         f"data.tasks={data / 'tasks.yaml'}",
                                         f"data.taxonomy={data / 'taxonomy.parquet'}",
                                         f"evaluate.partition={out / 'partition' / 'c'}",
                                         f"output={tmp_path / 'out'}", "run_id=cv", "evaluate.n_bootstrap=50"]))
    assert any(h["metric"] == "auc" and h["task"] == "melanoma_vs_nevus" for h in ev["headline"])


def test_a_rerun_of_finished_folds_starts_no_training_and_reports_what_they_recorded(study, tmp_path, monkeypatch,
                                                                                     caplog):
    """A fold finished from the same inputs is not handed to Ray Train again (it used to start a TorchTrainer per
    fold, restore the last checkpoint and stop at once: ~20 s on 2 cores for nothing); its recorded row is reported.
    A fold whose weights are gone is trained again."""
    import shutil

    import ray.train.torch

    import study as shared_study

    shutil.copytree(study["out"], tmp_path / "out", symlinks=True)
    cfg = load_config(str(study["config"]), [f"output={tmp_path / 'out'}"])

    def no_fit(self):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(ray.train.torch.TorchTrainer, "fit", no_fit)
    with caplog.at_level(logging.INFO, logger="dermray"):
        s = train.run(cfg)
    first = study["runs"]["train"][0]["summary"]
    assert [r | {"seconds": 0} for r in s["per_fold"]] == [r | {"seconds": 0} for r in first["per_fold"]]
    assert (s["trained_on"], s["quarantined"]) == (first["trained_on"], first["quarantined"])
    assert s["operating_points"] == first["operating_points"] and s["calibration"] == first["calibration"]
    assert all(f"fold {k}: finished earlier from the same inputs" in caplog.text for k in (0, 1)), caplog.text
    card = artifacts.read_card(str(tmp_path / "out" / "train" / shared_study.RUN / "fold=0" / "model_card.json"))
    assert card == artifacts.read_card(str(study["out"] / "train" / shared_study.RUN / "fold=0" / "model_card.json"))
    # Weights missing: not finished, so it goes to Ray Train (refused here by the patched fit).
    os.remove(tmp_path / "out" / "train" / shared_study.RUN / "fold=1" / "best" / "model.pt")
    with pytest.raises(AssertionError, match="a finished fold was trained again"):
        train.run(cfg)


def _ensemble_mean(out, image_ids: list[str], uris: list[str]) -> np.ndarray:
    """The fold models' mean softmax of the images, computed here with plain torch (no TTA: the study's
    score.tta is none) from the weights files and the decode the scoring stage uses - not dermray's code path."""
    import torch

    from dermray.core.transforms import NO_PREPROCESS
    from dermray.store import archive

    ens = artifacts.load_ensemble([str(out / "train" / "c" / f) for f in ("fold=0", "fold=1")])
    images = np.stack([archive.decode_one(storage.read_bytes(u), ens.size, 10 ** 9, NO_PREPROCESS)[0] for u in uris])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - torch.tensor(ens.mean).view(1, 3, 1, 1) * 255) / (
        torch.tensor(ens.std).view(1, 3, 1, 1) * 255)
    with torch.inference_mode():
        return np.mean([torch.softmax(artifacts.load_member(ens, i)(x), 1).numpy() for i in range(2)], axis=0)


def test_calibration_and_operating_points_are_locked_on_the_ensembles_scores_and_applied_when_scoring(study):
    """Issue 28, finding 1: the points were fitted on one fold model's held-out scores and applied to the mean of
    the fold models' (the demo's melanoma point: specificity 0.16 where it was fitted, 0.01 on test). Now the
    temperature and the thresholds (target sensitivity, Youden) are fitted on the ensemble's predictions - made as
    scoring makes them - of the training images no fold model trained on, written into every model card; scoring
    applies them (calibrated probs beside probs_raw, <task>_positive at the locked threshold); evaluation measures
    them with CIs, apart from the thresholds it picks on the test data itself (marked oracle)."""
    from dermray.core import metrics as M
    from dermray.stages.train.decisions import LOCKING_PREDICTIONS

    out = study["out"]
    s = study["runs"]["train"][0]["summary"]
    card = json.loads((out / "train" / "c" / "fold=0" / "model_card.json").read_text())
    cal, points = card["calibration"], card["operating_points"]
    assert cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"]
    assert "ensemble's predictions (2 fold models, TTA none" in cal["fitted_on"], cal["fitted_on"]
    mvn = {p["name"]: p for p in points if p["task"] == "melanoma_vs_nevus"}
    assert {"sens0.95", "youden"} <= set(mvn) and mvn["sens0.95"]["sensitivity"] >= 0.95
    assert json.loads((out / "train" / "c" / "fold=1" / "model_card.json").read_text())[
        "operating_points"] == points  # one set for the run's ensemble
    # The images they were fitted on: no fold model trained on any of them ...
    locking = pd.read_parquet(out / "train" / "c" / LOCKING_PREDICTIONS)
    cfg = load_config(str(study["config"]), [])
    p = plan(cfg)
    trained_on = {i for fold in p.folds for i in split_rows(fold, p.table, cfg.train)["train"]
                  .column("image_id").to_pylist()}
    assert len(locking) >= 20 and not trained_on & set(locking["image_id"])
    # ... and their probabilities are the ensemble's mean, as computed independently here.
    manifest = pd.read_parquet(study["data"] / "manifest.parquet").set_index("image_id")
    uris = [str(study["data"] / manifest.loc[i, "uri"]) for i in locking["image_id"]]
    np.testing.assert_allclose(np.stack(locking["probs"]), _ensemble_mean(out, list(locking["image_id"]), uris),
                               atol=1e-4)
    t, _, _ = M.fit_temperature(np.stack(locking["probs"]).astype(float), locking["class_index"].to_numpy())
    assert abs(t - cal["temperature"]) < 1e-6 and s["calibration"]["temperature"] == cal["temperature"]
    sc = study["runs"]["score"][0]["summary"]
    preds = pd.read_parquet(out / "predictions" / "c" / "predictions")
    raw = np.stack(preds["probs_raw"]).astype(float)
    np.testing.assert_allclose(np.stack(preds["probs"]), M.apply_temperature(raw, cal["temperature"]), atol=1e-5)
    thr = mvn["sens0.95"]["threshold"]
    inside = preds["melanoma_vs_nevus_score"].notna()
    assert inside.any()
    assert ((preds.loc[inside, "melanoma_vs_nevus_score"] >= thr) == preds.loc[inside, "melanoma_vs_nevus_positive"]
            ).all()
    assert sc["decisions"]["thresholds"]["melanoma_vs_nevus"]["name"] == "sens0.95"
    ev = study["runs"]["evaluate"][0]["summary"]
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


def test_the_ensemble_that_is_scored_has_its_own_card_with_its_test_results(study):
    """Issue 29: the ensemble's test results went into fold 0's card (titled demo/fold=0); cross-validation had no
    AUC. The train run's ensemble_card: titled with the model id scoring uses, its members with their chosen
    epochs (from 1), the out-of-fold AUC of each binary task with its interval, the locked points, and - written
    by evaluate - the test results, which the fold cards no longer receive."""
    out = study["out"]
    card = json.loads((out / "train" / "c" / "ensemble_card.json").read_text())
    sc = study["runs"]["score"][0]["summary"]
    assert card["model_id"] == sc["model_id"] and [m["fold"] for m in card["members"]] == ["0", "1"]
    assert all(1 <= m["best_epoch"] <= m["epochs_trained"] for m in card["members"])
    auc = {r["task"]: r for r in card["out_of_fold_auc"]}
    assert "melanoma_vs_nevus" in auc and auc["melanoma_vs_nevus"]["ci_low"] <= auc["melanoma_vs_nevus"]["auc"]
    assert card["operating_points"] == json.loads((out / "train" / "c" / "fold=0" / "model_card.json").read_text())[
        "operating_points"]
    ev = study["runs"]["evaluate"][0]["summary"]
    # (other tests evaluate the study's predictions into their own folders: each adds its entry)
    assert {t["model_id"] for t in card["test_metrics"]} == {sc["model_id"]}
    assert str(out / "metrics" / "c") in {t["evaluation"] for t in card["test_metrics"]}
    assert ev["model_card"].endswith("ensemble_card.md")
    md = (out / "train" / "c" / "ensemble_card.md").read_text()
    assert md.startswith(f"# Model card: {sc['model_id']}") and "out-of-fold AUC" in md and "Test results" in md
    for fold in ("fold=0", "fold=1"):
        assert json.loads((out / "train" / "c" / fold / "model_card.json").read_text())["test_metrics"] == []


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
    with pytest.raises(UserError, match=r"fold 0: train.epochs 3 -> 4; use a new run id, or --force"):
        train.run(config(d, "run_id=resume", "train.folds=[0]", "train.epochs=4"))
    metrics = pd.read_parquet(d / "out" / "train" / "resume" / "fold=0" / "metrics.parquet")
    assert sorted(set(metrics["epoch"])) == [1, 2, 3]  # numbered from 1
    # The resumed fold's model scores real images.
    from dermray.core.transforms import decode_image, eval_transform
    from dermray.stages.score.actors import Predictor

    ens = artifacts.load_ensemble([str(d / "out" / "train" / "resume")])
    uris = [storage.resolve(u, str(d / "in")) for u in pd.read_parquet(d / "in" / "manifest.parquet")["uri"].head(4)]
    images = np.stack([np.asarray(eval_transform(decode_image(storage.read_bytes(u)), ens.size)) for u in uris])
    probs = Predictor(ens, 2, channels_last=True, tta="none", use_gpu=False)(
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


def test_checkpoints_and_outputs_on_s3_a_final_model_and_a_time_budget(small_study, ray_local, s3_bucket,
                                                                       monkeypatch):
    """One run for three guarantees: checkpoints and outputs on S3, the final model (trained on every fold) beside
    the fold, and the training-time budget (five epochs asked, batches slowed: the budget is spent in the first
    epoch, and each fold stops there, saying so in its metrics)."""
    d = small_study
    out = f"{s3_bucket}/dermray"
    monkeypatch.setenv(faults.ENV, json.dumps({"slow_batch_s": 0.4}))
    s = train.run(config(d, "run_id=s3run", "train.folds=[1]", "train.final_model=true", "train.epochs=5",
                         "train.max_minutes=0.005", f"output={out}"))
    assert s["folds"] == ["1", "all"]
    assert [f["epochs"] for f in s["per_fold"]] == [1, 1]
    run_dir = f"{out}/train/s3run"
    for fold in ("fold=1", "fold=all"):
        card = json.loads(storage.read_text(f"{run_dir}/{fold}/model_card.json"))
        assert card["epochs_trained"] == 1
        assert storage.exists(f"{run_dir}/{fold}/best/model.pt")
        assert any("checkpoint_" in p for p in storage.list_files(f"{run_dir}/{fold}"))
        metrics = storage.read_table(f"{run_dir}/{fold}/metrics.parquet").to_pandas().set_index("metric")
        assert metrics.loc["stopped_by_budget", "value"] == 1.0
    assert card["held_out_fold"] is None  # the final model saw every fold
    assert storage.exists(f"{run_dir}/fold=1/val_predictions.parquet")
    assert not storage.exists(f"{run_dir}/fold=all/val_predictions.parquet")


def test_cli_train_user_error_exits_2(small_study, capsys):
    d = small_study
    code = main(["train", "--manifest", str(d / "in" / "manifest.parquet"), "--output", str(d / "out"),
                 "--arch", "alexnet"])
    err = capsys.readouterr().err
    assert code == 2 and "key 'train.arch'" in err and "'alexnet'" in err and len(err.strip().splitlines()) == 1


def test_the_epoch_is_chosen_on_an_inner_split_and_the_held_out_fold_only_measures(study):
    """train.selection: inner (the default): an inner split of the training lesions picks the epoch; the model
    never trains on it nor on the held-out fold, and the held-out fold's predictions (the cross-validation
    estimate) come from the chosen epoch, measured once. Judged on the study's run, whose first training recorded
    the image ids each fold trained on."""
    cfg = load_config(str(study["config"]))
    s = study["runs"]["train"][0]["summary"]
    rows = plan(cfg).table
    groups = dict(zip(rows.column("image_id").to_pylist(), rows.column("group").to_pylist()))
    for k in (0, 1):
        fold_dir = study["out"] / "train" / "c" / f"fold={k}"
        metrics = pd.read_parquet(fold_dir / "metrics.parquet")
        select_loss = metrics[(metrics.split == "select") & (metrics.metric == "loss")].set_index("epoch")["value"]
        assert len(select_loss) == 2 and s["per_fold"][k]["best_epoch"] == int(select_loss.idxmin())
        assert not (metrics.split == "val").any()  # the held-out fold is not measured per epoch
        preds = pd.read_parquet(fold_dir / "val_predictions.parquet")
        assert set(preds["epoch"]) == {s["per_fold"][k]["best_epoch"]}
        split = split_rows(k, rows, cfg.train)
        consumed = set((study["dir"] / f"consumed-{k}").read_text().split())
        select_ids = set(split["select"].column("image_id").to_pylist())
        val_ids = set(split["val"].column("image_id").to_pylist())
        assert select_ids and consumed == set(split["train"].column("image_id").to_pylist())
        assert not consumed & (select_ids | val_ids)
        assert set(preds["image_id"]) == val_ids
        # Lesion-grouped: no lesion has images both in the selection split and in training.
        assert not {groups[i] for i in select_ids} & {groups[i] for i in consumed}
        card = json.loads((fold_dir / "model_card.json").read_text())
        assert "inner split" in card["selection"] and card["validation"]["val_images"] == len(val_ids)


