"""The decisions locked with the model: the temperature, and the operating points (the target sensitivity,
Youden's, the readers' specificity), fitted on the ensemble's predictions of the images no fold model trained on
(``lock_decisions``), written into every fold's model card and the ensemble's."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dermray.runtime import artifacts, faults, layout
from dermray.runtime.config import RunConfig
from dermray.stages.train.plan import TrainPlan, uses_readers
from dermray.stages.train.shared import FINAL
from dermray.store import schemas, storage


def readers_targets(cfg: RunConfig, p: TrainPlan) -> dict:
    """The readers' mean specificity per binary task, from the readers' own decisions and the test manifest's
    labels (when evaluate.readers and pipeline.test_manifest are set): an operating point to lock."""
    from dermray.core import decisions, inference
    from dermray.store.definitions import load_tasks, load_taxonomy

    if not uses_readers(cfg, p):
        return {}
    assert cfg.evaluate.readers is not None and cfg.pipeline.test_manifest is not None  # uses_readers
    # A binary task (p.positives) means add_task_truth loaded the tasks and the taxonomy.
    assert cfg.data.tasks is not None and cfg.data.taxonomy is not None
    readers = storage.read_table_any(cfg.evaluate.readers).to_pandas()
    test = storage.read_table(cfg.pipeline.test_manifest, columns=["image_id", "label"]).to_pandas()
    tax = load_taxonomy(cfg.data.taxonomy)
    truth = {}
    for task in load_tasks(cfg.data.tasks, tax):
        if task.name in p.positives:
            t = inference.truth_for_task(tax, task, test["label"].to_numpy())
            inside = t >= 0
            truth[task.name] = pd.Series((t[inside] == p.positives[task.name]).astype(int),
                                         index=test["image_id"].to_numpy()[inside])
    return decisions.readers_specificity(readers, truth)


@dataclass(frozen=True)
class Locked:
    """The decisions chosen on the cross-validation folds' held-out predictions, and what they measure there."""
    calibration: dict | None
    points: list[dict]
    chosen_on: str
    readers: dict  # task -> {point name: the readers' mean specificity it targets}
    out_of_fold_auc: list[dict]  # per binary task: AUC with its lesion-bootstrap interval (decisions.task_aucs)


LOCKING_PREDICTIONS = "locking_predictions.parquet"  # in the train run's folder
MIN_LOCKING_IMAGES = 20  # fewer images no model trained on: the points are locked out of fold instead
# A task's points are locked on its biopsy-proven images when they hold at least this many of each class (else on
# all its images): evaluation reports the biopsy-proven ones, and a lesion that was not cut out is an easier one.
MIN_BIOPSY_PER_CLASS = 10


def lock_decisions(cfg: RunConfig, p: TrainPlan, fold_rows: list[dict]) -> Locked:
    """Calibration and operating points, written into every fold's model card, with the out-of-fold AUC of each
    binary task (for the ensemble's card).

    Issue 28: points fitted on one fold model's scores and applied to the mean of several models' did not carry
    over (averaging narrows each class's scores: a threshold in a class's tail moves its rate; the demo's melanoma
    point fell from specificity 0.16 out of fold to 0.01 on test). So they are fitted on the scores they are applied
    to: the ensemble's predictions, made as scoring makes them (every fold model, the score.tta views), of the
    training images that no fold model trained on (``data.never_trained``; with one fold, its held-out images
    too). Those images picked the epoch of the folds that did not hold them out; nothing else of theirs was learnt
    from. With too few such images, the held-out folds' predictions are used, as the cards say."""
    from dermray.core import decisions
    from dermray.core import metrics as M

    cv = [r["fold"] for r in fold_rows if r["fold"] != FINAL]
    frames = [storage.read_table(storage.join(layout.fold_dir(cfg.output, cfg.run_id, f), "val_predictions.parquet"))
              .to_pandas() for f in cv if storage.exists(storage.join(layout.fold_dir(cfg.output, cfg.run_id, f),
                                                                      "val_predictions.parquet"))]
    oof = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(oof) < 2:
        return Locked(None, [], "no held-out predictions", {}, [])
    binary = [(name, p.task_names.index(name), pos, p.matrices[name].astype(np.float64))
              for name, pos in p.positives.items()]
    out_of_fold = f"out-of-fold predictions of folds {', '.join(cv)} ({len(oof)} images)"
    readers = readers_targets(cfg, p)
    locking = locking_predictions(cfg, p, cv)
    model = (f"the ensemble's predictions ({len(cv)} fold models, " if len(cv) > 1 else
             f"fold {cv[0]}'s predictions (")
    frame, chosen_on = (locking, f"{model}TTA {cfg.score.tta}, as scoring makes them) of the {len(locking)} "
                        f"training images no fold model trained on") if locking is not None else (oof, out_of_fold)
    calibration, points = decisions.lock(np.stack(frame["probs"]).astype(np.float64), frame["class_index"].to_numpy(),
                                         _task_truth(p, frame), binary, cfg.evaluate.target_sensitivity, readers)
    points = [pt | {"chosen_on": chosen_on} for pt in points]
    points = _on_biopsy_proven(p, frame, points, temperature=calibration["temperature"], binary=binary,
                               target_sensitivity=cfg.evaluate.target_sensitivity, readers=readers)
    oof_calibrated = M.apply_temperature(np.stack(oof["probs"]).astype(np.float64), calibration["temperature"])
    oof_truth = _task_truth(p, oof)
    missing = [b for b in binary if b[0] not in {pt["task"] for pt in points}]
    if locking is not None and missing:  # a task without positives or negatives there: its points out of fold
        _, more = decisions.lock(oof_calibrated, oof["class_index"].to_numpy(), oof_truth, missing,
                                 cfg.evaluate.target_sensitivity, readers, fit_temperature=False)
        points += [pt | {"chosen_on": f"{out_of_fold}, calibrated as above: the images no fold model trained on "
                                      "hold no positive or no negative of this task"} for pt in more]
    lesion = (oof["group_id"].fillna(oof["image_id"]) if "group_id" in oof.columns else oof["image_id"]).to_numpy()
    aucs = decisions.task_aucs(oof_calibrated, oof_truth, binary, pd.factorize(lesion)[0], seed=0)
    return Locked(calibration | {"fitted_on": chosen_on}, points, chosen_on, readers, aucs)


def _on_biopsy_proven(p: TrainPlan, frame: pd.DataFrame, points: list[dict], *, temperature: float, binary: list,
                      target_sensitivity: float, readers: dict) -> list[dict]:
    """``points`` with each binary task's points locked again on the biopsy-proven images of ``frame`` when those
    hold MIN_BIOPSY_PER_CLASS of each class (the temperature stays the one fitted on every image).

    Issue 28: on HAM10000 the melanoma point locked at sensitivity 0.95 on every image no model trained on gave
    sensitivity 0.954 and specificity 0.736 there, and 0.855 and 0.476 on the biopsy-proven test split that
    evaluation reports (pipeline.biopsy_only): the nevi that were followed up or judged by consensus are the easy
    ones, and a threshold set among them calls more of the excised nevi melanoma."""
    from dermray.core import decisions
    from dermray.core import metrics as M

    if "label_source" not in p.table.column_names or not binary or not len(frame):
        return points
    sources = p.table.select(["image_id", "label_source"]).to_pandas()
    biopsy = (frame[["image_id"]].merge(sources, on="image_id", how="left")["label_source"] == "biopsy").to_numpy()
    truth = _task_truth(p, frame)
    if truth is None or not biopsy.any():
        return points
    truth = np.where(biopsy[:, None], truth, -1)  # the other images are outside every task here
    eligible = [b for b in binary if min(int((truth[:, b[1]] == b[2]).sum()),
                                         int(((truth[:, b[1]] >= 0) & (truth[:, b[1]] != b[2])).sum()))
                >= MIN_BIOPSY_PER_CLASS]
    if not eligible:
        return points
    calibrated = M.apply_temperature(np.stack(frame["probs"]).astype(np.float64), temperature)
    _, on_biopsy = decisions.lock(calibrated, frame["class_index"].to_numpy(), truth, eligible,
                                  target_sensitivity, readers, fit_temperature=False)
    chosen = {pt["task"]: pt["chosen_on"] for pt in points}
    relocked = {b[0] for b in eligible}
    out = []
    for name, *_ in binary:  # in the tasks' order, as before
        if name in relocked:
            out += [pt | {"chosen_on": f"{chosen[name]}: the {int(biopsy.sum())} biopsy-proven of them"}
                    for pt in on_biopsy if pt["task"] == name]
        else:
            out += [pt for pt in points if pt["task"] == name]
    return out


def _task_truth(p: TrainPlan, frame: pd.DataFrame) -> np.ndarray | None:
    if not p.task_names:
        return None
    truth = p.table.select(["image_id", "task_truth"]).to_pandas()
    return np.stack(frame[["image_id"]].merge(truth, on="image_id", how="left")["task_truth"])


def locking_predictions(cfg: RunConfig, p: TrainPlan, cv: list[str]) -> pd.DataFrame | None:
    """The ensemble's predictions of the training images no fold model trained on (image_id, class_index, probs),
    kept in the run's LOCKING_PREDICTIONS; made again only when the models or the views changed. None with fewer
    than MIN_LOCKING_IMAGES such images. (One fold: its model, with the scoring views, on its held-out images.)"""
    import dataclasses

    from dermray.runtime.raysession import ray_session
    from dermray.stages.train.data import ensemble_probabilities, never_trained
    from dermray.stages.train.fold import fold_job

    if not cv:
        return None
    rows = p.table.filter(pa.array(never_trained(p.table, cfg.train, cv)))
    quarantine = storage.join(p.run_dir, "quarantine.parquet")
    if storage.exists(quarantine):  # images that could not be decoded: not in any fold's data either
        bad = storage.read_table(quarantine, columns=["image_id"]).column("image_id")
        rows = rows.filter(pc.invert(pc.is_in(rows.column("image_id"), value_set=bad)))
    if rows.num_rows < MIN_LOCKING_IMAGES:
        return None
    ens = artifacts.load_ensemble([layout.fold_dir(cfg.output, cfg.run_id, f) for f in cv])
    # The images by a digest of their ids: a tenth of a large archive's ids would bloat the file's metadata.
    ids_digest = hashlib.sha256("\n".join(rows.column("image_id").to_pylist()).encode()).hexdigest()
    made_by = json.dumps({"weights_sha256": list(ens.weights_sha256), "tta": cfg.score.tta, "images": ids_digest})
    uri = storage.join(p.run_dir, LOCKING_PREDICTIONS)
    if storage.exists(uri):
        kept = storage.read_table(uri)
        if (kept.schema.metadata or {}).get(b"dermray.made_by", b"").decode() == made_by:
            return kept.to_pandas()
    job = dataclasses.replace(fold_job(cv[0], p, cfg, True, "", faults.NONE), progress=None)
    weights = [storage.read_bytes(w) for w in ens.weights]
    with ray_session(cfg.ray.address, cfg.ray.num_cpus) as ray:
        # num_gpus=None: Ray's default (its stubs want a number). One task per fold model's worth of CPUs.
        task = ray.remote(num_cpus=cfg.train.cpus_per_worker,
                          num_gpus=1 if cfg.train.use_gpu else None)(ensemble_probabilities)
        weights_ref = ray.put(weights)
        step = -(-rows.num_rows // len(cv))
        parts = ray.get([task.remote(job, weights_ref, rows.slice(i, step), cfg.transforms.preprocess(),
                                     cfg.storage.retry(), cfg.score.tta) for i in range(0, rows.num_rows, step)])
    probs = np.concatenate([part["probs"] for part in parts]).astype(np.float32)
    ids = [i for part in parts for i in part["image_id"]]
    at = {image_id: k for k, image_id in enumerate(ids)}
    table = rows.select(["image_id", "class_index", "group", "label"]).sort_by("image_id")
    order = [at[i] for i in table.column("image_id").to_pylist()]
    table = table.append_column("probs", pa.array(list(probs[order]), pa.list_(pa.float32())))
    table = table.cast(schemas.LOCKING_PREDICTIONS.arrow()).replace_schema_metadata({"dermray.made_by": made_by})
    storage.write_table(table, uri)
    return table.to_pandas()


def not_estimable_tasks(cfg: RunConfig, p: TrainPlan) -> dict[str, str]:
    """Binary task -> why it cannot be scored by these models (a task class with no training class under it:
    inference.not_estimable); such a task gets no locked operating point, and its cards say why."""
    from dermray.core import inference
    from dermray.store.definitions import load_tasks, load_taxonomy

    if not p.positives:
        return {}
    assert cfg.data.tasks is not None and cfg.data.taxonomy is not None  # binary tasks come from them
    tasks = load_tasks(cfg.data.tasks, load_taxonomy(cfg.data.taxonomy))
    reasons = {t.name: inference.not_estimable(p.matrices[t.name], t) for t in tasks if t.name in p.positives}
    return {name: why for name, why in reasons.items() if why}


def write_decisions(cfg: RunConfig, folds: list, calibration: dict | None, points: list[dict],
                    cv: pd.DataFrame, not_estimable: dict[str, str] | None = None) -> None:
    """Every fold's card gets the run's decisions, the tasks it cannot score with the reason, and its
    cross-validation summary (a card that holds them already is left as it is: a re-run adds no changelog
    entry)."""
    for fold in folds:
        d = layout.fold_dir(cfg.output, cfg.run_id, fold)
        card = artifacts.read_card(storage.join(d, artifacts.CARD_FILE))
        description = card.description | {"cross_validation": cv.to_dict(orient="records")}
        if not_estimable:
            description["not_estimable"] = dict(not_estimable)
        else:
            description.pop("not_estimable", None)
        decided = {"calibration": artifacts.Calibration(**calibration).model_dump(mode="json") if calibration else None,
                   "operating_points": [artifacts.OperatingPoint(**pt).model_dump(mode="json") for pt in points],
                   "cross_validation": description["cross_validation"],
                   "not_estimable": description.get("not_estimable")}
        held = {"calibration": card.calibration.model_dump(mode="json") if card.calibration else None,
                "operating_points": [pt.model_dump(mode="json") for pt in card.operating_points],
                "cross_validation": card.description.get("cross_validation"),
                "not_estimable": card.description.get("not_estimable")}
        if _same_json(decided, held):
            continue
        changelog = card.changelog + ([{"when": description.get("trained_at"), "what": "calibration and "
                                        f"{len(points)} operating points locked out of fold"}] if points else [])
        card = card.model_copy(update={
            "calibration": artifacts.Calibration(**calibration) if calibration else None,
            "operating_points": [artifacts.OperatingPoint(**pt) for pt in points], "description": description,
            "changelog": changelog})
        artifacts.write_card(artifacts.ModelCard.model_validate(card.model_dump()), d)


def _same_json(a, b) -> bool:
    """Equal as written to JSON (NaN equals NaN, tuples equal lists)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def write_ensemble_card(cfg: RunConfig, p: TrainPlan, fold_rows: list[dict], cv: list[dict], locked: Locked) -> None:
    """The card of the model scoring runs on this train run - the mean of its cross-validation folds - when it has
    two or more (``runtime/ensemble_card.py``); the test results evaluation wrote into an earlier card of the same
    ensemble are kept."""
    import datetime as dt

    from dermray.runtime import ensemble_card

    folds = [str(r["fold"]) for r in fold_rows if r["fold"] != FINAL]
    if len(folds) < 2:
        return
    ens = artifacts.load_ensemble([p.run_dir])
    members = [ensemble_card.Member(fold=str(c.fold), model_id=c.model_id, weights_sha256=sha,
                                    best_epoch=c.best_epoch,
                                    epochs_trained=c.epochs_trained)
               for c, sha in zip(ens.cards, ens.weights_sha256)]
    before = ensemble_card.read(p.run_dir)
    kept = before.test_metrics if before is not None and before.model_id == ens.model_id else []
    card = ensemble_card.EnsembleCard(
        model_id=ens.model_id, run_id=cfg.run_id, architecture=ens.first.architecture, input_size=ens.size,
        classes_hash=ens.classes_hash, members=members,
        cross_validation=cv, out_of_fold_auc=locked.out_of_fold_auc,
        operating_points=[artifacts.OperatingPoint(**pt) for pt in locked.points],
        calibration=artifacts.Calibration(**locked.calibration) if locked.calibration else None,
        readers=locked.readers, test_metrics=kept,
        changelog=(before.changelog if before is not None and before.model_id == ens.model_id else []) or [
            {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "what": f"ensemble of folds {', '.join(folds)} with decisions locked on {locked.chosen_on}"}])
    if before is not None and _same_json(before.model_dump(mode="json"), card.model_dump(mode="json")):
        return  # a re-run changes nothing
    ensemble_card.write(card, p.run_dir)
