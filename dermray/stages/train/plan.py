"""What a training run reads and decides before Ray starts: the labelled rows joined with the manifest, the
classes, the tasks' truth per image, the folds, the initial weights, and the inputs of the decisions it locks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.ids import lesion_keys
from dermray.errors import UserError
from dermray.runtime import artifacts, layout
from dermray.runtime.config import RunConfig, TrainConfig
from dermray.stages.train.shared import FINAL
from dermray.store import definitions, lineage, schemas, storage


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
                                  [c for c in ("group_id", "source", "modality", "label_source") if c in present])
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
    decisions with the test manifest's labels, the manifest's label sources (the points are locked on the
    biopsy-proven images: decisions._on_biopsy_proven; evaluate.target_sensitivity is a declared value: in the run's
    lineage). A change to any of them re-locks the decisions; the folds' models stay (their own lineage does not
    include these)."""
    inputs = definitions.fingerprints(cfg.data.tasks, cfg.data.taxonomy)
    if "label_source" in p.table.column_names and cfg.data.manifest:
        inputs["label_sources"] = lineage.columns_fingerprint(cfg.data.manifest, p.table, ["image_id", "label_source"])
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
