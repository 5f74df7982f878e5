"""Training stage: the paper's transfer learning (an ImageNet CNN, a new final layer with one output per training
class, fine-tuned), one Ray Train ``TorchTrainer`` per cross-validation fold, the folds running concurrently.

Data: the manifest joined with the partition stage's labels; each fold's training rows are decoded and augmented
in Ray Data tasks (the paper's random rotation, inscribed-rectangle crop and vertical flip) and streamed to the
worker (``dermray/runtime/trainloop.py``); the held-out fold is the validation set. Images that cannot be decoded
are found first and quarantined.

Model selection never sees the held-out fold: with ``train.selection: inner`` (the default) an inner split of the
fold's training lesions (grouped as the partition grouped them, near-duplicate merges included) picks the epoch,
and the held-out fold only measures the chosen model, once, after
training (``measure_held_out``); its predictions are the cross-validation estimate.

Per fold, under ``<output>/train/<run_id>/fold=<k>/``: Ray Train's checkpoints, ``lineage.json`` (what the fold is
trained from: its rows, the classes, the recipe), ``metrics.parquet``, ``best/model.pt``, ``model_card.json`` and
``val_predictions.parquet``. Re-running the same run resumes each fold from its last checkpoint when its lineage is
unchanged, and stops with one line saying what changed otherwise (``--force`` trains those folds afresh).
Across folds: ``train_summary.parquet`` with mean and sd of each validation metric.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.formatting import duration, fmt, strict_json
from dermray.core.ids import lesion_keys
from dermray.errors import UserError
from dermray.runtime import artifacts, faults, layout, progress, registry
from dermray.runtime.config import RunConfig, TrainConfig
from dermray.runtime.raysession import blocks_of
from dermray.runtime.trainloop import FoldJob, train_loop_per_worker, worker_threads
from dermray.store import definitions, lineage, schemas, storage

log = logging.getLogger("dermray.train")
STAGE = "train"
FINAL = layout.FINAL_FOLD
LINEAGE_FILE = "lineage.json"
# A fold's summary row, written last: a fold that has it (from the same lineage, its weights as recorded) is finished.
FINISHED_FILE = "fold_result.json"
# What a fold's weights depend on; the rest of TrainConfig (CPUs, threads, retries, which folds) does not.


# ---- inputs ------------------------------------------------------------------------------------------------------
@dataclass
class TrainPlan:
    """What the driver decided before Ray starts: the labelled rows, the classes, the tasks and the folds."""
    table: pa.Table  # image_id, class_index, fold, uri, label, group[, task_truth] sorted by image_id
    classes: pa.Table
    classes_hash: str
    partition: str
    matrices: dict
    task_names: list[str]
    positives: dict  # binary task -> index of its positive class
    folds: list
    run_dir: str
    inputs: dict  # name -> lineage.Fingerprint shared by every fold
    # What the locked decisions are chosen from besides the folds (decision_lineage): fingerprints and settings
    decision_inputs: dict = dataclasses.field(default_factory=dict)


def read_rows(cfg: RunConfig, part: str) -> tuple[pa.Table, pa.Table, dict]:
    """(labels joined with the manifest's image_id, uri, label; training classes; their fingerprints)."""
    if not cfg.data.manifest:
        raise UserError("no manifest given: set data.manifest")
    outputs = layout.partition_outputs(part)
    labels = storage.read_table(outputs["labels"])
    classes = storage.read_table(outputs["training_classes"])
    schemas.check_table(labels, schemas.LABELS, storage.redact(outputs["labels"]))
    present = storage.parquet_file(cfg.data.manifest).schema_arrow.names
    manifest = storage.read_table(cfg.data.manifest, columns=["image_id", "uri", "label"] +
                                  [c for c in ("group_id", "source", "modality") if c in present])
    manifest = manifest.set_column(1, "uri", storage.resolve_column(manifest.column("uri"),
                                                                    storage.parent(cfg.data.manifest)))
    # The lesion (or patient) of each image; an image without one is a group of its own. Its key is its bare
    # image id, as before the shared rule: the inner split hashes these keys, and another key would move images
    # between the selection split and training in a run being resumed.
    groups = manifest.column("group_id") if "group_id" in manifest.column_names else None
    manifest = manifest.append_column("group", lesion_keys(manifest.column("image_id"), groups, alone_prefix=""))
    manifest = manifest.drop_columns([c for c in ("group_id",) if c in manifest.column_names])
    table = labels.join(manifest, "image_id", join_type="inner")
    if table.num_rows != labels.num_rows:
        raise UserError(f"{labels.num_rows - table.num_rows} labelled images are not in the manifest "
                        f"{storage.redact(cfg.data.manifest)}: the partition was built from another manifest")
    table = table.sort_by("image_id")
    table = table.set_column(table.column_names.index("group"), "group",
                             merged_groups(table, outputs["near_duplicates"]))
    fingerprints = {"images": lineage.columns_fingerprint(cfg.data.manifest, table, ["image_id", "uri", "label"]),
                    "training_classes": lineage.Fingerprint(uri=storage.redact(outputs["training_classes"]),
                                                            method="value", content=artifacts.classes_hash(classes))}
    if cfg.train.selection == "inner":  # the groups decide which images choose the epoch
        fingerprints["selection_groups"] = lineage.columns_fingerprint(outputs["labels"], table, ["image_id", "group"])
    return table, classes, fingerprints


def merged_groups(table: pa.Table, near_duplicates_uri: str) -> pa.ChunkedArray:
    """The ``group`` column with the partition's near-duplicate merges applied: the lesions of a pair the partition
    merged (near_duplicates.parquet, merged = true) become one group, named by its smallest key, as the partition
    grouped them for the folds; every other image keeps its key (a run being resumed keeps its inner split).
    Columnar: only the merged pairs' groups are handled one by one (a partition from before the near-duplicate
    step has no such table: nothing is merged)."""
    from dermray.core import neardup

    groups = table.column("group")
    if not storage.exists(near_duplicates_uri):
        return groups
    near = storage.read_table(near_duplicates_uri, columns=["image_a", "image_b", "merged"])
    near = near.filter(pc.fill_null(near.column("merged"), False))
    if near.num_rows == 0:
        return groups
    ids = table.column("image_id")
    pos_a = pc.index_in(near.column("image_a"), value_set=ids).to_numpy(zero_copy_only=False)
    pos_b = pc.index_in(near.column("image_b"), value_set=ids).to_numpy(zero_copy_only=False)
    both = ~(np.isnan(pos_a.astype(float)) | np.isnan(pos_b.astype(float)))  # pairs whose images are both here
    if not both.any():
        return groups
    rows = np.unique(np.r_[pos_a[both], pos_b[both]].astype(np.int64))
    local = {int(r): k for k, r in enumerate(rows)}
    keys = np.asarray(pc.take(groups, pa.array(rows)).to_pylist(), dtype=object)
    pairs = [(local[int(a)], local[int(b)]) for a, b in zip(pos_a[both], pos_b[both])]
    merged, _ = neardup.merge_groups(keys, pairs, max_groups=len(keys) + 1)
    renamed = {old: new for old, new in zip(keys, merged) if old != new}
    if not renamed:
        return groups
    old = pa.array(list(renamed), pa.string())
    at = pc.index_in(groups, value_set=old)
    return pc.if_else(pc.is_valid(at), pc.take(pa.array(list(renamed.values()), pa.string()), pc.fill_null(at, 0)),
                      groups)


def add_task_truth(table: pa.Table, cfg: RunConfig, part: str, n_classes: int
                   ) -> tuple[pa.Table, dict, list[str], dict]:
    """The table with each image's task classes (``task_truth``, int32 per task, -1 outside a task), the
    membership matrices, the task names and the binary tasks' positive class; unchanged without tasks."""
    from dermray.core import inference
    from dermray.store.definitions import load_tasks, load_taxonomy

    if not (cfg.data.tasks and cfg.data.taxonomy):
        return table, {}, [], {}
    tax = load_taxonomy(cfg.data.taxonomy)
    tasks = load_tasks(cfg.data.tasks, tax)
    membership = storage.read_table(layout.partition_outputs(part)["task_membership"]).to_pandas()
    labels = table.column("label").to_numpy(zero_copy_only=False)
    truth = np.stack([inference.truth_for_task(tax, t, labels) for t in tasks], axis=1).astype(np.int32)
    # One list of len(tasks) per image, built from the flat matrix (no Python object per row).
    offsets = pa.array(np.arange(0, truth.size + 1, len(tasks), dtype=np.int32))
    table = table.append_column("task_truth", pa.ListArray.from_arrays(offsets, pa.array(truth.ravel())))
    # parse_tasks sets every binary task's positive class.
    positives = {t.name: t.class_names.index(cast(str, t.positive)) for t in tasks if t.is_binary}
    return table, inference.membership_matrices(membership, tasks, n_classes), [t.name for t in tasks], positives


def fold_names(table: pa.Table, tcfg: TrainConfig) -> list:
    present = sorted(pc.unique(table.column("fold")).to_pylist())
    folds = list(tcfg.folds) or present
    unknown = [f for f in folds if f not in present]
    if unknown:
        raise UserError(f"train.folds {unknown} are not in the labels (folds present: {present})")
    return folds + ([FINAL] if tcfg.final_model else [])


def weights_fingerprint(tcfg: TrainConfig) -> lineage.Fingerprint:
    if tcfg.weights in ("imagenet", "none"):
        return lineage.value_fingerprint(f"{tcfg.weights}:{tcfg.arch}")
    return lineage.file_fingerprint(tcfg.weights)


def plan(cfg: RunConfig) -> TrainPlan:
    """Read and check everything the run needs, before Ray starts."""
    from dermray.store.models import spec

    spec(cfg.train.arch)
    part = cfg.train.partition or layout.partition_dir(cfg.output, cfg.run_id)
    table, classes, inputs = read_rows(cfg, part)
    if classes.num_rows < 2:
        raise UserError(f"the partition has {classes.num_rows} training class: nothing to classify "
                        "(lower partition.max_class_size)")
    table, matrices, task_names, positives = add_task_truth(table, cfg, part, classes.num_rows)
    metric = cfg.train.checkpoint_metric
    if metric.startswith("acc_") and metric[len("acc_"):] not in task_names:
        raise UserError(f"train.checkpoint_metric {metric!r} names no task (tasks: {', '.join(task_names) or 'none'})")
    inputs["initial_weights"] = weights_fingerprint(cfg.train)
    if metric.startswith("acc_") and cfg.train.selection == "inner":
        inputs["tasks"] = lineage.value_fingerprint(sorted(matrices[metric[len("acc_"):]].nonzero()[0].tolist()))
    p = TrainPlan(table, classes, artifacts.classes_hash(classes), part, matrices, task_names, positives,
                  fold_names(table, cfg.train), layout.train_dir(cfg.output, cfg.run_id), inputs)
    p.decision_inputs = decision_lineage(cfg, p)
    return p


def uses_readers(cfg: RunConfig, p: TrainPlan) -> bool:
    """Whether a readers' operating point is locked: readers, a test manifest with their images' labels, and a
    binary task."""
    return bool(cfg.evaluate.readers and cfg.pipeline.test_manifest and p.positives)


def decision_lineage(cfg: RunConfig, p: TrainPlan) -> dict:
    """The inputs of the run's locked decisions beyond the folds' models: the tasks and taxonomy (which tasks are
    binary, their positive class, each image's task truth), the partition's task membership, the readers'
    decisions with the test manifest's labels (evaluate.target_sensitivity is a declared value: in the run's
    lineage). A change to any of them re-locks the decisions; the folds' models stay (their own lineage does not
    include these)."""
    inputs = definitions.fingerprints(cfg.data.tasks, cfg.data.taxonomy)
    if inputs:
        uri = layout.partition_outputs(p.partition)["task_membership"]
        table = storage.read_table(uri)
        inputs["task_membership"] = lineage.columns_fingerprint(uri, table, table.column_names)
    if uses_readers(cfg, p):
        assert cfg.evaluate.readers is not None and cfg.pipeline.test_manifest is not None  # uses_readers
        inputs["readers"] = lineage.file_fingerprint(cfg.evaluate.readers)
        labels = storage.read_table(cfg.pipeline.test_manifest, columns=["image_id", "label"])
        inputs["test_labels"] = lineage.columns_fingerprint(cfg.pipeline.test_manifest, labels, labels.column_names)
    return inputs


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


# ---- Ray Data transforms ------------------------------------------------------------------------------------------
def find_undecodable(batch: dict, max_pixels: int, retry: storage.Retry = storage.DEFAULT_RETRY) -> dict:
    """Ray Data batch fn: the rows whose image cannot be read or decoded, with the reason."""
    from dermray.core.transforms import ImageDecodeError, decode_image

    bad_ids, bad_uris, reasons = [], [], []
    for image_id, uri in zip(batch["image_id"], batch["uri"]):
        try:
            decode_image(storage.read_bytes(uri, retry), max_pixels)
        except (ImageDecodeError, UserError) as e:
            bad_ids.append(image_id)
            bad_uris.append(uri)
            reasons.append(str(e))
    return {"image_id": np.array(bad_ids, dtype=object), "uri": np.array(bad_uris, dtype=object),
            "reason": np.array(reasons, dtype=object)}


def decode_transform(batch: dict, size: int, train: bool, max_pixels: int, pre=None, photometric=None,
                     retry: storage.Retry = storage.DEFAULT_RETRY) -> dict:
    """Ray Data batch fn: read, decode and transform images -> uint8 [B, S, S, 3] (normalised on the worker:
    a quarter of the bytes of float32 through the object store). Augmentation draws fresh randomness every call,
    so every epoch sees new rotations and flips."""
    from dermray.core.transforms import NO_PREPROCESS, decode_image, eval_transform, train_transform

    rng = np.random.default_rng()
    pre = pre or NO_PREPROCESS
    images = []
    for uri in batch["uri"]:
        img = decode_image(storage.read_bytes(uri, retry), max_pixels)
        img = train_transform(img, size, rng, pre, photometric) if train else eval_transform(img, size, pre)
        images.append(np.asarray(img, dtype=np.uint8))
    out = {"image": np.stack(images), "label": batch["class_index"].astype(np.int64), "image_id": batch["image_id"]}
    if "task_truth" in batch:
        out["task_truth"] = np.stack(batch["task_truth"]).astype(np.int64)
    return out


@dataclass(frozen=True)
class TrainingRows:
    """The rows the folds trained from (unreadable images set aside) and how many were set aside."""
    table: pa.Table
    quarantined: int


def quarantine_unreadable(table: pa.Table, cfg: RunConfig, run_dir: str) -> TrainingRows:
    """Decode every image once in Ray Data tasks; those that fail go to ``quarantine.parquet`` and out of the
    table."""
    import ray.data

    bad = ray.data.from_arrow(blocks_of(table.select(["image_id", "uri"]), 512)).map_batches(
        find_undecodable,  # type: ignore[arg-type]  # Ray's stubs: a batch-only fn (fn_kwargs pass the rest)
        fn_kwargs={"max_pixels": cfg.train.max_pixels, "retry": cfg.storage.retry()}, batch_size=256).take_all()
    storage.write_table(pa.Table.from_pylist([{"stage": STAGE, "image_id": b["image_id"], "row": None,
                                               "uri": b["uri"], "reason": b["reason"]} for b in bad],
                                             schema=schemas.QUARANTINE.arrow()),
                        storage.join(run_dir, "quarantine.parquet"))
    if not bad:
        return TrainingRows(table, 0)
    bad_ids = pa.array([b["image_id"] for b in bad], pa.string())
    return TrainingRows(table.filter(pc.invert(pc.is_in(table.column("image_id"), bad_ids))), len(bad))


def inner_selection(rows: pa.Table, fraction: float, seed: int) -> np.ndarray:
    """bool [n]: the rows of the inner selection split - the images of about ``fraction`` of the lesions (a seeded
    hash of the group), never split from their lesion; at least one lesion when there are two or more."""
    from dermray.core.partitioning import hash_strings

    groups = rows.column("group").to_numpy(zero_copy_only=False)
    u = (hash_strings(groups, seed ^ 0x5E1EC7) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    chosen = u < fraction
    if not chosen.any() and len(np.unique(groups)) >= 2:
        chosen = groups == groups[int(np.argmin(u))]
    return chosen


def split_rows(fold, table: pa.Table, tcfg: TrainConfig) -> dict[str, pa.Table]:
    """The fold's rows: "train" (what it learns from), "select" (the inner split that picks the epoch, with
    train.selection: inner) and "val" (the held-out fold, measured after training; none for the final model)."""
    if fold == FINAL:
        rest, val = table, None
    else:
        is_val = pc.equal(table.column("fold"), fold)
        rest, val = table.filter(pc.invert(is_val)), table.filter(is_val)
    out = {}
    if tcfg.selection == "inner":
        chosen = inner_selection(rest, tcfg.selection_fraction, tcfg.seed)
        out["select"] = rest.filter(pa.array(chosen))
        rest = rest.filter(pa.array(~chosen))
    out["train"] = rest
    if val is not None and val.num_rows:
        out["val"] = val
    return {k: v for k, v in out.items() if v.num_rows}


def image_pipeline(rows: pa.Table, train: bool, cfg: RunConfig, size: int):
    """Ray Data: blocks of a few batches, decoded, preprocessed (and augmented when ``train``) in tasks that spread
    over the cluster's free CPUs while the worker trains."""
    import ray.data

    tcfg = cfg.train
    kwargs = {"size": size, "max_pixels": tcfg.max_pixels, "train": train, "pre": cfg.transforms.preprocess(),
              "photometric": cfg.transforms.augmentation() if train else None, "retry": cfg.storage.retry()}
    return ray.data.from_arrow(blocks_of(rows, 4 * tcfg.batch_size)).map_batches(
        decode_transform,  # type: ignore[arg-type]  # Ray's stubs: a batch-only fn (fn_kwargs pass the rest)
        fn_kwargs=kwargs, batch_size=tcfg.batch_size, num_cpus=tcfg.data_cpus)


def balanced(rows: pa.Table, by: str, seed: int) -> pa.Table:
    """``rows`` with every value of column ``by`` (source or modality) repeated up to the largest one's count, so
    that each weighs the same in an epoch (whole repeats, then a seeded sample of the remainder)."""
    if by not in rows.column_names:
        return rows
    values = np.asarray(pc.fill_null(rows.column(by), "unspecified").to_numpy(zero_copy_only=False)).astype(str)
    kinds, counts = np.unique(values, return_counts=True)
    rng = np.random.default_rng([seed, 0xBA1])
    take = []
    for kind, n in zip(kinds, counts):
        idx = np.flatnonzero(values == kind)
        reps, rest = divmod(int(counts.max()), int(n))
        take += [np.tile(idx, reps), rng.choice(idx, rest, replace=False)]
    return rows.take(pa.array(np.sort(np.concatenate(take))))


def datasets_for(fold, rows: dict[str, pa.Table], cfg: RunConfig, size: int) -> dict:
    """The worker's datasets: "train" and, with an inner split, "select" (the held-out fold is not among them)."""
    tcfg = cfg.train
    train_rows = rows["train"]
    if tcfg.balance != "none":
        train_rows = balanced(train_rows, tcfg.balance, tcfg.seed)
    # The table is sorted by image_id, which in real archives follows upload batches (and so diagnoses): training
    # blocks get a seeded random order of rows, mixed again per epoch by the worker's shuffle buffer.
    order = np.random.default_rng([tcfg.seed, zlib.crc32(str(fold).encode())]).permutation(train_rows.num_rows)
    out = {"train": image_pipeline(train_rows.take(pa.array(order)), True, cfg, size)}
    if "select" in rows:
        out["select"] = image_pipeline(rows["select"], False, cfg, size)
    return out


def held_out_batches(rows: pa.Table, job: FoldJob, pre, retry: storage.Retry):
    """The held-out rows decoded here, batch by batch, as torch tensors (no Ray Data: a task that holds CPUs while
    waiting for decode tasks deadlocks a full cluster)."""
    import torch

    for start in range(0, rows.num_rows, job.train.batch_size):
        part = rows.slice(start, job.train.batch_size).to_pydict()
        batch = {k: np.array(v, dtype=object if k in ("image_id", "uri") else None) for k, v in part.items()
                 if k in ("image_id", "uri", "class_index", "task_truth")}
        out = decode_transform(batch, job.image_size, False, job.train.max_pixels, pre, None, retry)
        item = {"image": torch.from_numpy(out["image"]), "label": torch.from_numpy(out["label"]),
                "image_id": list(out["image_id"])}
        if "task_truth" in out:
            item["task_truth"] = torch.from_numpy(out["task_truth"])
        yield item


def measure_held_out(job: FoldJob, weights: bytes, rows: pa.Table, pre, retry: storage.Retry
                     ) -> tuple[dict, dict]:
    """Ray task: the chosen model on the held-out fold, once - (loss, top-1, task accuracies; probabilities)."""
    import io

    import torch

    from dermray.runtime.trainloop import validate
    from dermray.store.models import build_model, state_dict_from_bytes

    torch.set_num_threads(worker_threads(job.train.torch_threads, job.train.cpus_per_worker))
    device = torch.device("cuda" if job.train.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(job.train.arch, job.n_classes, state_dict_from_bytes(io.BytesIO(weights), job.fold_dir))
    model = model.to(device)
    if job.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    metrics, preds = validate(model, held_out_batches(rows, job, pre, retry), job, device)
    return {f"val_{k}": v for k, v in metrics.items()}, preds


# ---- one fold -----------------------------------------------------------------------------------------------------
def fold_job(fold, p: TrainPlan, cfg: RunConfig, has_select: bool, lineage_id: str, hooks: faults.Faults,
             relay=None) -> FoldJob:
    from dermray.store.models import spec

    s = spec(cfg.train.arch)
    return FoldJob(train=cfg.train, n_classes=p.classes.num_rows, image_size=cfg.train.image_size or s.input_size,
                   mean=cast(tuple[float, float, float], tuple(s.mean)),
                   std=cast(tuple[float, float, float], tuple(s.std)), fold=str(fold),
                   fold_dir=layout.fold_dir(cfg.output, cfg.run_id, fold), model_id=f"{cfg.run_id}/fold={fold}",
                   lineage_id=lineage_id, has_select=has_select, matrices=p.matrices, task_names=tuple(p.task_names),
                   faults=hooks.for_fold(fold), progress=relay)


@dataclass(frozen=True)
class FittedFold:
    """A fold as its TorchTrainer left it: the epochs' history, the chosen epoch's entry, that checkpoint's weights
    (model.pt bytes), its measurement on the held-out fold ((metrics, predictions), or None for the final model) and
    the seconds it took."""
    job: FoldJob
    history: list[dict]
    best: dict
    weights: bytes
    measured: tuple[dict, Any] | None
    seconds: float


def fit_fold(job: FoldJob, datasets: dict, val, run_dir: str, cfg: RunConfig) -> FittedFold:
    """Train one fold with a TorchTrainer, then measure the chosen checkpoint on the held-out fold ``val`` (its
    rows, or None)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    tcfg = job.train
    fs, path = storage.arrow_filesystem(run_dir)
    threads = str(worker_threads(tcfg.torch_threads, tcfg.cpus_per_worker))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=tcfg.use_gpu,
                                     resources_per_worker={"CPU": tcfg.cpus_per_worker, **tcfg.worker_resources}),
        run_config=TrainRunConfig(  # type: ignore[call-arg]  # mypy sees Train V1's RunConfig: no worker_runtime_env
            name=f"fold={job.fold}", storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints,
                                               checkpoint_score_attribute=job.score_key,
                                               checkpoint_score_order=job.score_order),
            # Ray starts workers with OMP_NUM_THREADS=1 unless told; torch.set_num_threads alone left the worker's
            # intra-op pools narrower than a plain process's (measured in benchmarks/train_throughput.py).
            worker_runtime_env={"env_vars": {v: threads for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}},
        ),
        datasets=datasets,
        # One worker per fold: a split would only put a coordinator actor between Ray Data and the worker.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"fold {job.fold} failed: {result.error}") from result.error
    history = read_history(result)
    checkpoint, chosen = best_checkpoint(result, history, job)
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, "model.pt"), "rb") as f:
            weights = f.read()
    measured = None
    if val is not None:
        # The held-out fold is measured in the precision the fold trained in (the worker resolved "auto").
        precision: Any = history[-1].get("precision")
        trained_in = {"fp32": "off"}.get(precision, precision or tcfg.amp)
        as_trained = dataclasses.replace(job, train=tcfg.model_copy(update={"amp": trained_in}), progress=None)
        # num_gpus=None: Ray's default (its stubs want a number).
        task = ray.remote(num_cpus=tcfg.cpus_per_worker,
                          num_gpus=1 if tcfg.use_gpu else None)(measure_held_out)  # type: ignore[arg-type]
        measured = ray.get(task.remote(as_trained, weights, val, cfg.transforms.preprocess(), cfg.storage.retry()))
    return FittedFold(job, history, chosen, weights, measured, time.time() - t0)


def read_history(result) -> list[dict]:
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "history.json")) as f:
            return json.load(f)


def metrics_rows(history: list[dict]) -> list[dict]:
    """The history as long-form rows (epoch, split, metric, value) for metrics.parquet."""
    rows = []
    for h in history:
        for key, value in h.items():
            if key in ("epoch", "t_start", "t_end") or not isinstance(value, (int, float)):
                continue
            split, _, metric = key.partition("_") if key.startswith(("train_", "select_")) else ("", "", key)
            rows.append({"epoch": h["epoch"], "split": split or "train", "metric": metric or key,
                         "value": float(value)})
    return rows


def best_checkpoint(result, history: list[dict], job: FoldJob):
    """(checkpoint, its epoch's history entry): the best kept checkpoint by the job's ranking key (the latest for
    train.selection: last)."""
    if job.score_key == "epoch" or not result.best_checkpoints:
        return result.checkpoint, history[-1]
    sign = 1 if job.score_order == "min" else -1
    ckpt, metrics = sorted(result.best_checkpoints, key=lambda cm: sign * cm[1].get(job.score_key, math.inf))[0]
    return ckpt, next(h for h in history if h["epoch"] == metrics["epoch"])


def write_val_predictions(job: FoldJob, preds: dict, cfg: RunConfig, table: pa.Table, epoch: int) -> str:
    """The held-out fold's probabilities under the chosen model, with the manifest's label columns: the input of
    ``dermray evaluate`` for the paper's first round."""
    assert cfg.data.manifest is not None  # plan() required it
    present = storage.parquet_file(cfg.data.manifest).schema_arrow.names
    carry = table.select(["image_id", "label", "class_index"]).to_pandas().merge(
        storage.read_table(cfg.data.manifest, columns=[c for c in ("image_id", "label_source", "modality", "group_id")
                                                       if c in present]).to_pandas(),
        on="image_id", how="left")
    ids = pd.DataFrame({"image_id": preds["image_id"]})
    if len(ids) and ids["image_id"].duplicated().any():
        raise RuntimeError(f"fold {job.fold}: the held-out measurement returned an image twice")
    merged = ids.assign(order=np.arange(len(ids))).merge(carry, on="image_id", how="left", validate="one_to_one")
    merged = merged.sort_values("image_id")
    probs = np.asarray(preds["probs"], np.float32)[merged.pop("order").to_numpy()] if len(ids) else \
        np.zeros((0, job.n_classes), np.float32)
    out = pa.Table.from_pandas(merged, preserve_index=False)
    out = out.add_column(1, "model_id", pa.array([job.model_id] * len(merged), pa.string()))
    out = out.add_column(2, "probs", pa.array(list(probs), pa.list_(pa.float32())))
    out = out.append_column("epoch", pa.array([epoch] * len(merged), pa.int32()))
    uri = storage.join(job.fold_dir, "val_predictions.parquet")
    storage.write_table(out, uri)
    return uri


def accuracy_by(job: FoldJob, preds: dict, table: pa.Table) -> dict:
    """Held-out task accuracy per source and per modality (``val_acc_<task>[source=X]``): a model trained on
    several sources is judged on each."""
    from dermray.core.metrics import predicted_class

    if not job.task_names or not len(preds["image_id"]):
        return {}
    rows = table.select([c for c in ("image_id", "task_truth", "source", "modality") if c in table.column_names]
                        ).to_pandas().set_index("image_id").loc[preds["image_id"]]
    probs = np.asarray(preds["probs"], np.float64)
    truth = np.stack(rows["task_truth"].to_numpy())
    out = {}
    for column in ("source", "modality"):
        if column not in rows.columns or rows[column].nunique() < 2:
            continue
        for value in sorted(rows[column].dropna().astype(str).unique()):
            sel = (rows[column].astype(str) == value).to_numpy()
            for j, name in enumerate(job.task_names):
                keep = sel & (truth[:, j] >= 0)
                if keep.any():
                    pred = predicted_class(probs[keep] @ job.matrices[name])
                    out[f"val_acc_{name}[{column}={value}]"] = float((pred == truth[keep, j]).mean())
    return out


def selection_text(job: FoldJob, epoch: int) -> str:
    tc = job.train
    if job.score_key == "epoch":
        return f"the last epoch ({epoch})"
    where = (f"an inner split of {tc.selection_fraction:.0%} of the fold's training lesions (not trained on)"
             if job.has_select else "the training data")
    return f"the best {job.score_key} on {where}: epoch {epoch}; the held-out fold only measured it"


def data_description(p: TrainPlan, table: pa.Table) -> dict:
    """Who a reviewer should credit and what the model saw: the data sources (the manifest's ``source`` column)
    with their licences, and the training data in numbers."""
    import datetime as dt

    sources = (table.column("source").to_pandas().fillna("unspecified").value_counts()
               if "source" in table.column_names else pd.Series({"unspecified": table.num_rows}))
    return {"intended_use": artifacts.INTENDED_USE,
            "data_sources": [{"name": str(k), "images": int(v),
                              "licence": artifacts.LICENCES.get(str(k), "as its provider states")}
                             for k, v in sources.items()],
            "training_data": {"images": table.num_rows, "lesions": pc.count_distinct(table.column("group")).as_py(),
                              "classes": p.classes.num_rows, "folds": pc.count_distinct(table.column("fold")).as_py()},
            "limitations": list(artifacts.LIMITATIONS), "version": 1,
            "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def model_card(fitted: FittedFold, p: TrainPlan, fold_lin: lineage.Lineage, measured: dict, table: pa.Table,
               cfg_transforms) -> artifacts.ModelCard:
    """The fold's model card; ``measured``: its held-out metrics (empty for the final model)."""
    job, history, best, weights = fitted.job, fitted.history, fitted.best, fitted.weights
    tcfg = job.train
    description = data_description(p, table)
    redacted = tcfg.weights if tcfg.weights in ("imagenet", "none") else storage.redact(tcfg.weights)
    config = tcfg.model_dump(mode="json") | {"weights": redacted}
    return artifacts.ModelCard(
        precision=history[-1].get("precision"),
        preprocess=cfg_transforms.preprocess().as_dict(),
        augmentation=dataclasses.asdict(cfg_transforms.augmentation()),
        model_id=job.model_id, architecture=tcfg.arch, input_size=job.image_size,
        normalisation={"mean": list(job.mean), "std": list(job.std)},
        training_classes=p.classes.select(["class_index", "node_id", "name", "scope", "n_images"]).to_pylist(),
        classes_hash=p.classes_hash, weights_sha256=artifacts.sha256_hex(weights), weights_source=redacted,
        freeze=tcfg.freeze, fold=job.fold, held_out_fold=None if job.fold == FINAL else int(job.fold),
        config=config, config_hash=fold_lin.config_hash, versions=fold_lin.versions,
        epochs_trained=len(history), best_epoch=int(best["epoch"]), selection=selection_text(job, int(best["epoch"])),
        validation=measured,
        checkpoint=artifacts.weights_uri(job.fold_dir), data_hash=fold_lin.inputs["labels"].content[:16],
        lineage=fold_lin.to_dict() | {"partition": storage.redact(p.partition)}, description=description,
        changelog=[{"when": description["trained_at"], "what": f"trained: {job.model_id}, {len(history)} epochs, "
                    f"{selection_text(job, int(best['epoch']))}"}])


def finish_fold(fitted: FittedFold, cfg: RunConfig, p: TrainPlan, rows: TrainingRows,
                fold_lin: lineage.Lineage) -> dict:
    """metrics.parquet, best/model.pt, val_predictions.parquet and model_card.json for one fold, then the record
    that says it is finished (FINISHED_FILE). Returns the fold's summary row."""
    job, history, best, weights, table = fitted.job, fitted.history, fitted.best, fitted.weights, rows.table
    storage.write_table(pa.Table.from_pylist(metrics_rows(history)), storage.join(job.fold_dir, "metrics.parquet"))
    storage.write_bytes(artifacts.weights_uri(job.fold_dir), weights)
    val_metrics: dict = {}
    if fitted.measured is not None:
        val_metrics, preds = fitted.measured
        write_val_predictions(job, preds, cfg, table, int(best["epoch"]))
        val_metrics |= accuracy_by(job, preds, table)
    artifacts.write_card(model_card(fitted, p, fold_lin, val_metrics, table, cfg.transforms), job.fold_dir)
    row = {"fold": job.fold, "epochs": len(history), "best_epoch": int(best["epoch"]),
           "seconds": round(fitted.seconds, 1),
           "t_start": history[0].get("t_start"), "t_end": history[-1].get("t_end"), "lineage_id": fold_lin.id,
           **val_metrics}
    record = {"lineage_id": fold_lin.id, "weights_sha256": artifacts.sha256_hex(weights), "row": row,
              "images": table.num_rows + rows.quarantined, "quarantined": rows.quarantined}
    storage.write_text(storage.join(job.fold_dir, FINISHED_FILE), strict_json(record))
    return row


# ---- decisions locked with the model -------------------------------------------------------------------------------
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


def lock_decisions(cfg: RunConfig, p: TrainPlan, fold_rows: list[dict]) -> tuple[dict | None, list[dict], str]:
    """Calibration and operating points chosen on the cross-validation folds' held-out predictions, written into
    every fold's model card: (calibration, operating points, what they were chosen on)."""
    from dermray.core import decisions

    cv = [r["fold"] for r in fold_rows if r["fold"] != FINAL]
    frames = [storage.read_table(storage.join(layout.fold_dir(cfg.output, cfg.run_id, f), "val_predictions.parquet"))
              .to_pandas() for f in cv if storage.exists(storage.join(layout.fold_dir(cfg.output, cfg.run_id, f),
                                                                      "val_predictions.parquet"))]
    oof = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(oof) < 2:
        return None, [], "no held-out predictions"
    truth_cols = p.table.select(["image_id", "task_truth"]).to_pandas() if p.task_names else None
    task_truth = (np.stack(oof[["image_id"]].merge(truth_cols, on="image_id", how="left")["task_truth"])
                  if truth_cols is not None else None)
    binary = [(name, p.task_names.index(name), pos, p.matrices[name].astype(np.float64))
              for name, pos in p.positives.items()]
    chosen_on = f"out-of-fold predictions of folds {', '.join(cv)} ({len(oof)} images)"
    calibration, points = decisions.lock(np.stack(oof["probs"]).astype(np.float64), oof["class_index"].to_numpy(),
                                         task_truth, binary, cfg.evaluate.target_sensitivity,
                                         readers_targets(cfg, p))
    return calibration | {"fitted_on": chosen_on}, [pt | {"chosen_on": chosen_on} for pt in points], chosen_on


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


# ---- the stage ----------------------------------------------------------------------------------------------------
def train_folds(p: TrainPlan, folds: list, table: pa.Table, cfg: RunConfig, lineages: dict) -> list[FittedFold]:
    """The TorchTrainers of ``folds``, all at once (threads: each fit() blocks while its worker trains)."""
    from dermray.store.models import spec

    size = cfg.train.image_size or spec(cfg.train.arch).input_size
    hooks = faults.from_env()
    with progress.Relay() as lines, concurrent.futures.ThreadPoolExecutor(max_workers=len(folds)) as pool:
        futures = []
        for fold in folds:
            rows = split_rows(fold, table, cfg.train)
            progress.say("train: fold %s: %s images to train on, %s to select the epoch, %s held out", fold,
                         f"{rows['train'].num_rows:,}", f"{rows['select'].num_rows:,}" if "select" in rows else "no",
                         f"{rows['val'].num_rows:,}" if "val" in rows else "none")
            job = fold_job(fold, p, cfg, "select" in rows, lineages[str(fold)].id, hooks, lines.queue)
            futures.append(pool.submit(fit_fold, job, datasets_for(fold, rows, cfg, size), rows.get("val"), p.run_dir,
                                       cfg))
        return [f.result() for f in futures]


def run(cfg: RunConfig) -> dict:
    """Train every requested fold (concurrently) and write the per-fold and summary outputs."""
    from dermray.runtime.raysession import check_shared_storage, ray_session

    t_start = time.perf_counter()
    p = plan(cfg)
    lineages = {str(fold): fold_lineage(fold, p, cfg) for fold in p.folds}
    clear = {str(fold): check_fold_lineage(fold, layout.fold_dir(cfg.output, cfg.run_id, fold), lineages[str(fold)],
                                           cfg.train.force) for fold in p.folds}
    for fold in p.folds:
        if not clear[str(fold)]:
            adopt_older_record(layout.fold_dir(cfg.output, cfg.run_id, fold), lineages[str(fold)])
    finished = {str(fold): None if clear[str(fold)] else
                finished_fold(layout.fold_dir(cfg.output, cfg.run_id, fold), lineages[str(fold)]) for fold in p.folds}
    for fold, record in finished.items():
        if record is not None:
            progress.say("train: fold %s: finished earlier from the same inputs (lineage %s): not trained again",
                         fold, record["lineage_id"][:8])
    todo = [fold for fold in p.folds if finished[str(fold)] is None]
    rows: dict[str, dict] = {}
    if todo:
        with ray_session(cfg.ray.address, cfg.ray.num_cpus):
            first_local = storage.first_local(p.table.column("uri"))
            check_shared_storage(cfg.storage, {"output": cfg.output, "image URI (in the manifest)": first_local})
            for fold in todo:  # written only once the run is known to be possible
                record_fold_lineage(layout.fold_dir(cfg.output, cfg.run_id, fold), lineages[str(fold)],
                                    clear[str(fold)])
            training = quarantine_unreadable(p.table, cfg, p.run_dir)
            results = train_folds(p, todo, training.table, cfg, lineages)
        rows = {fitted.job.fold: finish_fold(fitted, cfg, p, training, lineages[fitted.job.fold]) for fitted in results}
        used, n_bad = training.table.num_rows, training.quarantined
    else:  # every fold finished: the counts they recorded (the same inputs, so the same images)
        record = finished[str(p.folds[0])]
        assert record is not None  # nothing to do: every fold finished
        used, n_bad = record["images"] - record["quarantined"], record["quarantined"]
    # A fold not trained now finished earlier.
    fold_rows = [rows.get(str(fold)) or cast(dict, finished[str(fold)])["row"] for fold in p.folds]
    calibration, points, _ = lock_decisions(cfg, p, fold_rows)
    write_decisions(cfg, p.folds, calibration, points, cv_summary(fold_rows, p.task_names), not_estimable_tasks(cfg, p))
    summary = summarise(cfg, p, fold_rows, used, n_bad, lineages, time.perf_counter() - t_start,
                        {"calibration": calibration, "operating_points": points})
    return summary


def cv_summary(fold_rows: list[dict], task_names: list[str]) -> pd.DataFrame:
    """Mean and sd over the cross-validation folds of each validation metric (Extended Data Table 2 form)."""
    cv = [r for r in fold_rows if r["fold"] != FINAL]
    keys = ["val_top1", "val_loss"] + [f"val_acc_{t}" for t in task_names]
    rows = []
    for k in keys:
        vals = np.array([r[k] for r in cv if k in r], dtype=float)
        if len(vals):
            rows.append({"metric": k, "mean": float(np.nanmean(vals)),
                         "sd": float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else float("nan"), "folds": len(vals)})
    return pd.DataFrame(rows, columns=["metric", "mean", "sd", "folds"])


def run_lineage(lineages: dict, p: TrainPlan, cfg: RunConfig) -> lineage.Lineage:
    """The run's lineage: its folds' (each covers the fold's rows, the classes, the initial weights, the recipe) and
    what its locked decisions are chosen from (``decision_lineage``)."""
    folds = {f"fold={f}": lineage.value_fingerprint(lin.id) for f, lin in lineages.items()}
    return registry.stage_lineage(STAGE, cfg, folds | p.decision_inputs)


def lineage_now(cfg: RunConfig, recorded: lineage.Lineage | None = None) -> lineage.Lineage:
    p = plan(cfg)
    return run_lineage({str(fold): fold_lineage(fold, p, cfg) for fold in p.folds}, p, cfg)


def summarise(cfg: RunConfig, p: TrainPlan, fold_rows: list[dict], used: int, n_bad: int, lineages: dict,
              seconds: float, decided: dict) -> dict:
    table = cv_summary(fold_rows, p.task_names)
    storage.write_table(pa.Table.from_pandas(table, preserve_index=False),
                        storage.join(p.run_dir, "train_summary.parquet"))
    summary = {"stage": STAGE, "run_id": cfg.run_id, "arch": cfg.train.arch, "folds": [str(f) for f in p.folds],
               "images": used + n_bad, "trained_on": used, "quarantined": n_bad, "per_fold": fold_rows,
               "summary": table.to_dict(orient="records"), "partition": storage.redact(p.partition), **decided,
               "lineage": run_lineage(lineages, p, cfg).to_dict(),
               "outputs": {"run": p.run_dir, "summary": storage.join(p.run_dir, "train_summary.parquet")},
               "seconds": round(seconds, 1)}
    storage.write_text(layout.summary_uri(cfg.output, STAGE, cfg.run_id), strict_json(summary))
    return summary


def counts(s: dict) -> dict:
    return {"in": s["images"], "out": s["trained_on"], "quarantined": s["quarantined"], "seconds": s["seconds"]}


def format_summary(s: dict) -> str:
    lines = [f"train: {s['arch']}, run {s['run_id']}, folds {', '.join(s['folds'])}: {s['images']} images = "
             f"{s['trained_on']} used + {s['quarantined']} quarantined ({duration(s['seconds'])})"]
    for r in s["per_fold"]:
        lines.append(f"  fold {r['fold']}: {r['epochs']} epochs, best epoch {r['best_epoch']}, "
                     + ", ".join(f"{k}={v:.3f}" for k, v in r.items() if k.startswith("val_")))
    for r in s["summary"]:
        lines.append(f"  {r['metric']:<32} {fmt(r['mean'])} +- {fmt(r['sd'])} over {r['folds']} folds")
    if s.get("calibration"):
        lines.append(f"  calibration: temperature {s['calibration']['temperature']:.2f} (NLL "
                     f"{s['calibration']['nll_before']:.3f} -> {s['calibration']['nll_after']:.3f}, out of fold)")
    for pt in s.get("operating_points", []):
        lines.append(f"  locked {pt['task']} {pt['name']}: threshold {pt['threshold']:.3f} (out of fold: sensitivity "
                     f"{pt['sensitivity']:.3f}, specificity {pt['specificity']:.3f})")
    lines.append(f"  outputs: {s['outputs']['run']}")
    return "\n".join(lines)
