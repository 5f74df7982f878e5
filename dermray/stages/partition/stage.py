"""The partition stage's ``run``: the passes, the partitioning algorithm on the driver's counts, the tables and
the summary (with the lineage)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dermray.core.formatting import duration, strict_json
from dermray.core.partitioning import (
    TrainingClass,
    node_to_class,
    partition_classes,
    task_membership,
)
from dermray.errors import UserError
from dermray.runtime import layout, progress, registry
from dermray.runtime.config import RunConfig
from dermray.stages.partition.inputs import Inputs, read_inputs
from dermray.stages.partition.neardup import near_duplicates
from dermray.stages.partition.passes import (
    AssignInputs,
    ChunkInputs,
    Counts,
    assign_pass,
    count_pass,
    fold_plan,
    read_chunk,
)
from dermray.stages.partition.shared import CHUNK_ROWS, STAGE
from dermray.store import lineage, schemas, storage
from dermray.store.summaries import PartitionSummary


def partition_lineage(inp: Inputs, manifest_fp: lineage.Fingerprint, cfg: RunConfig) -> lineage.Lineage:
    return registry.stage_lineage(STAGE, cfg, {"manifest": manifest_fp, **inp.fingerprints})


def lineage_now(cfg: RunConfig, recorded: lineage.Lineage | None = None) -> lineage.Lineage:
    inp = read_inputs(cfg)
    uri = inp.manifest

    def content():
        table = pa.concat_tables([read_chunk(uri, rg, inp.columns) for rg, _, _ in
                                  storage.row_group_chunks(inp.pf, CHUNK_ROWS)]) if inp.pf.metadata.num_rows else None
        if table is None:
            return lineage.Fingerprint(uri=storage.redact(uri), method="columns", content="empty", rows=0)
        return lineage.columns_fingerprint(uri, table, inp.columns, identity=storage.identity(uri))

    return partition_lineage(inp, lineage.reuse(recorded, "manifest", uri, content), cfg)


def run(cfg: RunConfig) -> dict:
    """Run the partition stage for ``cfg``; returns the summary (also written as partition_summary.json)."""
    from dermray.runtime.raysession import check_shared_storage, cluster_cpus, ray_session

    t_start = time.perf_counter()
    pcfg = cfg.partition
    inp = read_inputs(cfg)
    node_ids = pa.array(inp.tax.node_ids, pa.string())
    paths = layout.partition_outputs(layout.partition_dir(cfg.output, cfg.run_id))
    with ray_session(cfg.ray.address, cfg.ray.num_cpus) as ray:
        check_shared_storage(cfg.storage, {"output": cfg.output, "data.manifest": inp.manifest})
        cpus = cluster_cpus()
        chunks = storage.row_group_chunks(inp.pf, CHUNK_ROWS, min_chunks=2 * cpus)
        partitions = max(1, min(2 * cpus, len(chunks)))
        node_ids_ref = ray.put(node_ids)
        remap, near, near_counts, hashes = (
            near_duplicates(ray, inp, chunks, node_ids_ref, pcfg) if pcfg.near_duplicates else
            (None, schemas.NEAR_DUPLICATES.arrow().empty_table(), None, schemas.IMAGE_HASHES.arrow().empty_table()))
        storage.write_table(near, paths["near_duplicates"])
        storage.write_table(hashes, paths["image_hashes"])
        near_text = (f"; {near_counts['pairs']:,} near-duplicate pairs ({near_counts['crossed_groups']:,} across "
                     f"groups), {near_counts['images_regrouped']:,} images regrouped" if near_counts else "")
        remap_ref = ray.put(remap)
        t0 = time.perf_counter()
        first = count_pass(ray, inp, chunks, partitions, ChunkInputs(node_ids_ref, pcfg.seed, remap_ref))
        counts, duplicates, manifest_fp = first.counts, first.duplicates, first.fingerprint
        t_pass1 = time.perf_counter() - t0
        classes = partition_classes(inp.tax, counts.node_counts, pcfg.max_class_size)
        if not classes:
            raise UserError(f"{storage.redact(inp.manifest)}: no valid rows to partition "
                            "(see quarantine for each row's reason)" if inp.pf.metadata.num_rows else
                            f"{storage.redact(inp.manifest)}: the manifest has no rows")
        progress.say("partition: %d training classes from %s images%s", len(classes),
                     f"{int(counts.node_counts.sum()):,}", near_text)
        t0 = time.perf_counter()
        lookup = node_to_class(inp.tax, classes)
        plan, mixed_refs, n_mixed = fold_plan(ray, first, classes, lookup, pcfg)
        given = AssignInputs(node_ids_ref, pcfg.seed, plan, duplicates, remap_ref, mixed_refs)
        n_labels, n_quarantined, fold_counts = assign_pass(ray, inp, chunks, cpus, given, paths)
        t_pass2 = time.perf_counter() - t0
    n_input = inp.pf.metadata.num_rows
    if n_labels + n_quarantined != n_input:
        raise RuntimeError(f"partition lost rows: {n_input} in, {n_labels} assigned + {n_quarantined} quarantined")
    unattributable = write_class_tables(inp, classes, counts, fold_counts, paths, pcfg.tasks_required)
    made = Partitioned(classes, counts, fold_counts, n_labels, n_quarantined, n_mixed, near_counts, unattributable,
                       len(chunks), {"pass1": round(t_pass1, 3), "pass2_and_write": round(t_pass2, 3),
                                     "total": round(time.perf_counter() - t_start, 3)})
    summary = PartitionSummary(**summarise(cfg, inp, made, partition_lineage(inp, manifest_fp, cfg), paths)).as_dict()
    storage.write_text(paths["summary"], strict_json(summary))
    return summary


@dataclass(frozen=True)
class Partitioned:
    """What a partition run made, as its summary reports it."""
    classes: list[TrainingClass]
    counts: Counts
    fold_counts: np.ndarray  # int64 [classes, folds]: images per training class and fold
    assigned: int  # rows given a class and a fold
    quarantined: int  # rows set aside, each with its reason
    groups_spanning_classes: int  # lesions whose images fall in more than one training class
    near_counts: dict | None  # the near-duplicate search's counts (None when it is off)
    unattributable: list  # training classes no task can attribute (partition.tasks_required off)
    chunks: int  # row-group chunks the passes read
    seconds: dict  # pass1, pass2_and_write, total


def summarise(cfg: RunConfig, inp: Inputs, made: Partitioned, lin: lineage.Lineage, paths: dict) -> dict:
    pcfg = cfg.partition
    classes = made.classes
    assert cfg.data.taxonomy is not None  # read_inputs required it
    return {
        "stage": STAGE, "run_id": cfg.run_id, "manifest": storage.redact(inp.manifest),
        "taxonomy": storage.redact(cfg.data.taxonomy), "max_class_size": pcfg.max_class_size, "folds": pcfg.folds,
        "seed": pcfg.seed, "input_rows": int(inp.pf.metadata.num_rows), "assigned": int(made.assigned),
        "quarantined": int(made.quarantined), "duplicates": made.counts.duplicates, "training_classes": len(classes),
        "node_only_classes": sum(c.scope == "node" for c in classes),
        "big_leaf_classes": sum(c.scope == "subtree" and inp.tax.is_leaf(c.node) and c.n_images >= pcfg.max_class_size
                                for c in classes),
        "groups_spanning_classes": made.groups_spanning_classes,
        "images_per_fold": made.fold_counts.sum(axis=0).tolist(), "near_duplicates": made.near_counts,
        "unattributable": [u.__dict__ | {"task_classes": list(u.task_classes)} for u in made.unattributable],
        "chunks": made.chunks, "lineage": lin.to_dict(), "seconds": made.seconds, "outputs": paths,
    }


def write_class_tables(inp: Inputs, classes, counts: Counts, fold_counts: np.ndarray, paths: dict,
                       tasks_required: bool) -> list:
    """training_classes, task_membership and fold_counts; returns the classes no task can attribute."""
    membership_rows, unattributable = task_membership(inp.tax, classes, inp.tasks, counts.node_counts)
    if unattributable and tasks_required:
        u = unattributable[0]
        raise UserError(f"training class {u.class_name!r} cannot be attributed to task {u.task!r}: its images "
                        f"straddle task class(es) {', '.join(u.task_classes)}; lower partition.max_class_size or "
                        "change the tasks")
    storage.write_table(_classes_table(classes), paths["training_classes"])
    storage.write_table(pa.table({
        "task": pa.array([r[0] for r in membership_rows], pa.string()),
        "task_class": pa.array([r[1] for r in membership_rows], pa.string()),
        "class_index": pa.array([r[2] for r in membership_rows], pa.int32()),
        "node_id": pa.array([classes[r[2]].node_id for r in membership_rows], pa.string()),
    }, schema=schemas.TASK_MEMBERSHIP.arrow()), paths["task_membership"])
    ci, fi = np.nonzero(fold_counts)
    storage.write_table(pa.table({"class_index": pa.array(ci, pa.int32()), "fold": pa.array(fi, pa.int32()),
                                  "n_images": pa.array(fold_counts[ci, fi], pa.int64())}), paths["fold_counts"])
    return unattributable


def _classes_table(classes: list[TrainingClass]) -> pa.Table:
    return pa.table({
        "class_index": pa.array([c.class_index for c in classes], pa.int32()),
        "node_id": pa.array([c.node_id for c in classes], pa.string()),
        "name": pa.array([c.name for c in classes], pa.string()),
        "n_images": pa.array([c.n_images for c in classes], pa.int64()),
        "scope": pa.array([c.scope for c in classes], pa.string()),
    }, schema=schemas.TRAINING_CLASSES.arrow())


def format_summary(s: dict) -> str:
    lines = [
        f"partition: {s['input_rows']} input rows = {s['assigned']} assigned + {s['quarantined']} quarantined",
        f"  {s['training_classes']} training classes (max_class_size {s['max_class_size']}; "
        f"{s['node_only_classes']} node-only, {s['big_leaf_classes']} big leaves), {s['folds']} folds: "
        f"{s['images_per_fold']} images per fold",
    ]
    if s["groups_spanning_classes"]:
        lines.append(f"  {s['groups_spanning_classes']} groups span several classes (kept whole in one fold)")
    nd = s.get("near_duplicates")
    if nd:
        lines.append(f"  near duplicates: {nd['pairs']} pairs ({nd['exact']} exact, {nd['crossed_groups']} across "
                     f"groups) among {nd['described']} images -> {nd['images_regrouped']} images regrouped, "
                     f"largest group {nd['largest_component_images']} images"
                     + (f", {nd['refused_merges']} merges refused (component cap)" if nd["refused_merges"] else ""))
    for u in s["unattributable"]:
        lines.append(f"  warning: training class {u['class_name']!r} cannot be attributed to task {u['task']!r} "
                     f"(its images straddle {', '.join(u['task_classes'])})")
    lines.append(f"  outputs: {storage.parent(s['outputs']['labels'])}  ({duration(s['seconds']['total'])})")
    return "\n".join(lines)


def counts(s: dict) -> dict:
    return {"in": s["input_rows"], "out": s["assigned"], "quarantined": s["quarantined"],
            "seconds": s["seconds"]["total"]}
