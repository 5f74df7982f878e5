"""What each fold is trained from and what it left: its lineage (its rows, the classes, the initial weights, every
declared train and transforms value), the check that refuses to resume a fold of another lineage, and the record
of a finished fold."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.formatting import strict_json
from dermray.errors import UserError
from dermray.runtime import artifacts, layout, registry
from dermray.runtime.config import RunConfig
from dermray.stages.train.plan import TrainPlan, plan
from dermray.stages.train.shared import FINAL, FINISHED_FILE, LINEAGE_FILE, STAGE, log
from dermray.store import lineage, storage


def fold_rows(table: pa.Table, fold) -> pa.Table:
    """What a fold's lineage covers of the labels (its ``labels`` input): each image, its class and whether the
    fold holds it out. ``table``: the labels (image_id, class_index, fold) sorted by image_id."""
    is_val = (pc.equal(table.column("fold"), fold) if fold != FINAL else pa.array(np.zeros(table.num_rows, bool)))
    return table.select(["image_id", "class_index"]).append_column("held_out", is_val)


def fold_lineage(fold, p: TrainPlan, cfg: RunConfig) -> lineage.Lineage:
    """What fold ``fold`` is trained from: which images it trains on and which it holds out, their classes and
    URIs, the classes, the initial weights, and the recipe: every train and transforms value the stage declares
    (``registry.declared_values``) but which folds the run trains."""
    rows = fold_rows(p.table, fold)
    inputs = dict(p.inputs) | {"labels": lineage.columns_fingerprint(None, rows, rows.column_names)}
    recipe = registry.declared_values(STAGE, cfg, sections=("train", "transforms"))
    recipe["train"] = {k: v for k, v in recipe["train"].items() if k not in ("folds", "final_model")}
    return lineage.Lineage.of(STAGE, inputs, recipe | {"fold": str(fold)})


def check_fold_lineage(fold, fold_dir: str, now: lineage.Lineage, force: bool) -> bool:
    """Refuse to resume a fold whose checkpoints were made from other inputs, before anything is written; returns
    whether its folder must be cleared first (``force``, or files without a lineage record)."""
    before = lineage.read(storage.join(fold_dir, LINEAGE_FILE))
    changes = now.changes_from(before) if before is not None else []
    if changes:
        if not force:
            raise UserError(f"fold {fold}: {'; '.join(changes)}; use a new run id, or --force to retrain from scratch")
        log.info("train: fold %s: %s: training it afresh (--force)", fold, "; ".join(changes))
        return True
    if before is None and storage.exists(fold_dir) and any(storage.list_files(fold_dir)):
        if not force:
            raise UserError(f"fold {fold}: {storage.redact(fold_dir)} holds files with no lineage record (made by "
                            "an older dermray or by hand); use a new run id, or --force to retrain from scratch")
        return True
    return False


def check_can_run(cfg: RunConfig) -> None:
    """Raise the UserError ``run`` raises before it trains - a fold trained from other rows, classes or recipe,
    unless train.force - and write nothing: the pipeline asks this of a partition built aside before it replaces
    the run's partition."""
    if cfg.train.force:
        return
    p = plan(cfg)
    for fold in p.folds:
        check_fold_lineage(fold, layout.fold_dir(cfg.output, cfg.run_id, fold),
                           fold_lineage(fold, p, cfg), False)


def adopt_older_record(fold_dir: str, now: lineage.Lineage) -> None:
    """A fold recorded by an older dermray (lineage format 1) in which ``check_fold_lineage`` found no change: its
    records take the lineage of now, so that a finished fold is reused rather than trained again after an
    upgrade."""
    uri = storage.join(fold_dir, LINEAGE_FILE)
    before = lineage.read(uri)
    if before is None or before.format >= now.format:
        return
    storage.write_text(uri, json.dumps(now.to_dict(), indent=2))
    record_uri = storage.join(fold_dir, FINISHED_FILE)
    if storage.exists(record_uri):
        record = json.loads(storage.read_text(record_uri))
        if record.get("lineage_id") == before.id:
            storage.write_text(record_uri, strict_json(record | {"lineage_id": now.id}))
    log.info("train: %s: lineage recorded by an older dermray, same inputs and settings: kept",
             storage.redact(fold_dir))


def finished_fold(fold_dir: str, now: lineage.Lineage) -> dict | None:
    """The record a fold finished from the same inputs left ({"row", "images", "quarantined"}), or None when it has
    to go to Ray Train: no record, another lineage, or weights that are missing or not the ones recorded."""
    record_uri, weights = storage.join(fold_dir, FINISHED_FILE), artifacts.weights_uri(fold_dir)
    if not storage.exists(record_uri) or not storage.exists(weights):
        return None
    record = json.loads(storage.read_text(record_uri))
    if record.get("lineage_id") != now.id or record.get("weights_sha256") != artifacts.weights_sha256(weights):
        return None
    return record


def record_fold_lineage(fold_dir: str, now: lineage.Lineage, clear: bool) -> None:
    """Clear a fold's folder when ``check_fold_lineage`` said so, then record the lineage it is trained from."""
    if clear:
        storage.delete(fold_dir)
    storage.write_text(storage.join(fold_dir, LINEAGE_FILE), json.dumps(now.to_dict(), indent=2))


def run_lineage(lineages: dict, p: TrainPlan, cfg: RunConfig) -> lineage.Lineage:
    """The run's lineage: its folds' (each covers the fold's rows, the classes, the initial weights, the recipe) and
    what its locked decisions are chosen from (``decision_lineage``)."""
    folds = {f"fold={f}": lineage.value_fingerprint(lin.id) for f, lin in lineages.items()}
    return registry.stage_lineage(STAGE, cfg, folds | p.decision_inputs)
