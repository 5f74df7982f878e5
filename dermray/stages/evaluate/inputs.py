"""What an evaluation reads, checked before any metric: the tasks and taxonomy, the task membership of the
partition the predictions were scored through, the readers' table, and other runs' predictions (compare,
reference) with their own membership."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermray.core.evaluation_tasks import Task
from dermray.core.taxonomy import Taxonomy
from dermray.errors import UserError
from dermray.runtime import layout
from dermray.runtime.config import EvaluateConfig, RunConfig
from dermray.stages.evaluate.shared import log
from dermray.store import lineage, schemas, storage
from dermray.store.definitions import load_tasks, load_taxonomy
from dermray.store.predictions import load_predictions


def score_summary_of(predictions: str) -> dict:
    """The summary of the score run that wrote ``predictions`` (beside its predictions folder), or {}."""
    pred = predictions.rstrip("/")
    for candidate in (storage.join(storage.parent(pred), layout.SUMMARY_FILES["score"]),
                      storage.join(pred, layout.SUMMARY_FILES["score"])):
        if storage.exists(candidate):
            return json.loads(storage.read_text(candidate))
    return {}


def default_partition(cfg: RunConfig, scored: dict) -> str:
    """evaluate.partition, else the partition the predictions' score run recorded, else this run's."""
    return cfg.evaluate.partition or scored.get("partition") or layout.partition_dir(cfg.output, cfg.run_id)


def locked_points(scored: dict) -> dict:
    """The operating points locked in the scoring model's card (out of fold), per binary task."""
    out: dict = {}
    for pt in scored.get("operating_points", []):
        out.setdefault(pt["task"], []).append((pt["name"], float(pt["threshold"])))
    return out


def load_readers(uri: str | None) -> pd.DataFrame | None:
    if not uri:
        return None
    table = storage.read_table_any(uri)
    schemas.check_table(table, schemas.READERS, storage.redact(uri))
    df = table.to_pandas()
    if "decision" not in df.columns and "score" not in df.columns:
        raise UserError(f"{storage.redact(uri)}: readers need a 'decision' (0/1) or a 'score' column")
    if "decision" in df.columns:
        bad = df["decision"].notna() & ~df["decision"].isin([0, 1])
        if bad.any():
            raise UserError(f"{storage.redact(uri)}: column 'decision' must be 0 or 1 "
                            f"(row {int(np.flatnonzero(bad)[0])})")
    return df


@dataclass
class EvalInputs:
    """Everything the numbers are computed from (read before any is computed)."""
    tax: Taxonomy
    tasks: list[Task]
    membership: pd.DataFrame
    partition: str
    fingerprints: dict  # name -> lineage.Fingerprint
    locked: dict  # binary task -> [(operating point name, threshold)] the model card locked
    scored: dict  # the summary of the score run that wrote the predictions ({} when unknown)
    train_hashes: pd.DataFrame | None = None  # the partition's image_hashes (evaluate.train_overlap; None: absent)
    # fold name -> its training history (metrics.parquet: epoch, split, metric, value), for the report's curves
    histories: dict = field(default_factory=dict)


def read_definitions(cfg: RunConfig) -> EvalInputs:
    if not cfg.evaluate.predictions:
        raise UserError("no predictions given: set evaluate.predictions (or --predictions)")
    if not cfg.data.tasks or not cfg.data.taxonomy:
        raise UserError("evaluation needs the tasks YAML and the taxonomy: set data.tasks and data.taxonomy")
    tax = load_taxonomy(cfg.data.taxonomy)
    tasks = load_tasks(cfg.data.tasks, tax)
    scored = score_summary_of(cfg.evaluate.predictions)
    partition = default_partition(cfg, scored)
    tm_uri = layout.partition_outputs(partition)["task_membership"]
    table = storage.read_table(tm_uri)
    fps = {"tasks": lineage.file_fingerprint(cfg.data.tasks), "taxonomy": lineage.file_fingerprint(cfg.data.taxonomy),
           "task_membership": lineage.columns_fingerprint(tm_uri, table, table.column_names)}
    locked = locked_points(scored)
    if locked:
        fps["operating_points"] = lineage.value_fingerprint(locked)
    hashes_uri = layout.partition_outputs(partition)["image_hashes"]
    hashes = None
    if cfg.evaluate.train_overlap and storage.exists(hashes_uri):
        hashes_table = storage.read_table(hashes_uri)
        fps["image_hashes"] = lineage.columns_fingerprint(hashes_uri, hashes_table, hashes_table.column_names)
        hashes = hashes_table.to_pandas()
    histories = training_histories(scored)
    if histories:
        fps["training_histories"] = lineage.value_fingerprint(
            {fold: lineage.config_hash(h.to_dict(orient="list")) for fold, h in sorted(histories.items())})
    return EvalInputs(tax, tasks, table.to_pandas(), partition, fps, locked, scored, hashes, histories)


def training_histories(scored: dict) -> dict[str, pd.DataFrame]:
    """The training history of each fold model that scored the predictions (the score summary names their folders),
    by fold folder name; {} when none is found (predictions from elsewhere)."""
    out = {}
    for fold_dir in scored.get("checkpoints", []):
        uri = storage.join(fold_dir, "metrics.parquet")
        if storage.exists(uri):
            out[fold_dir.rstrip("/").rsplit("/", 1)[-1]] = storage.read_table(uri).to_pandas()
    return out


def predictions_columns(ecfg: EvaluateConfig) -> tuple[str, ...]:
    """The prediction columns beyond ``USED_COLUMNS`` that the evaluation reads: the source, the subgroup columns,
    the cohort column and (evaluate.train_overlap) the image URIs. Only these are loaded, and the predictions'
    fingerprint covers them."""
    subgroups = tuple(spec.partition(":")[0] for spec in ecfg.subgroups)
    return (("source",) + subgroups + ((ecfg.cohort,) if ecfg.cohort else ())
            + (("uri",) if ecfg.train_overlap else ()))


def other_run_membership(uri: str) -> tuple[pd.DataFrame | None, lineage.Fingerprint | None]:
    """The task membership of the partition the run that wrote the predictions at ``uri`` was trained on (its score
    summary beside them names it), with its fingerprint; (None, None) when no summary or partition is there."""
    part = score_summary_of(uri).get("partition")
    tm_uri = layout.partition_outputs(part)["task_membership"] if part else None
    if not tm_uri or not storage.exists(tm_uri):
        return None, None
    table = storage.read_table(tm_uri)
    return table.to_pandas(), lineage.columns_fingerprint(tm_uri, table, table.column_names)


def load_other_run(uri: str, columns: tuple[str, ...], own_classes: int, inp: EvalInputs) -> pd.DataFrame:
    """Another run's predictions (evaluate.compare, evaluate.reference) with the membership their probabilities are
    scored through as ``df.attrs["membership"]``: that of the other run's own partition - its columns are its own
    training classes. Without one, this run's, when the other run has as many classes; else a UserError (issue 28:
    mapping another run's classes through this run's membership gave another task score)."""
    df = load_predictions(uri, None, columns)
    theirs = df.attrs["probs"].shape[1]
    membership, _ = other_run_membership(uri)
    if membership is None:
        if theirs != own_classes:
            raise UserError(f"{storage.redact(uri)}: its predictions are over {theirs} training classes, this "
                            f"run's over {own_classes}, and no score summary beside them names their partition: the "
                            "two cannot be compared through one class membership (compare predictions written by "
                            "dermray score)")
        log.warning("evaluate: %s names no partition of its own: its %d training classes are taken to be this "
                    "run's", storage.redact(uri), theirs)
        membership = inp.membership
    elif len(membership) and int(membership["class_index"].max()) >= theirs:
        raise UserError(f"{storage.redact(uri)}: its predictions are over {theirs} training classes, fewer than its "
                        "partition's task membership names: they are not that partition's predictions")
    df.attrs["membership"] = membership
    return df
