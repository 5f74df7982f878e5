"""The passes as Ray tasks over chunks of the manifest's row groups: count (map) and reduce by hash partition, the
fold plan on the driver, then assign (map) with the driver streaming the labels and quarantine to Parquet."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.partitioning import (
    HASH_BUCKETS,
    fold_table,
)
from dermray.runtime import progress
from dermray.runtime.config import PartitionConfig
from dermray.stages.partition.chunks import (
    AssignPlan,
    ChunkStats,
    Duplicates,
    assign_chunk,
    count_chunk,
    find_duplicates,
    find_mixed_groups,
)
from dermray.stages.partition.inputs import Inputs
from dermray.store import lineage, schemas, storage


def read_chunk(uri: str, row_groups: list[int], columns: list[str]) -> pa.Table:
    table = storage.parquet_file(uri).read_row_groups(row_groups, columns=columns)
    # Dictionary-encoded strings compare and hash as plain strings.
    return pa.table({c: (pc.cast(table.column(c), pa.string()) if pa.types.is_dictionary(table.column(c).type)
                         else table.column(c)) for c in table.column_names})


# Ray tasks (module level: defined once, shipped by reference). Each hash partition of pass 1 is its own object,
# so a reducer fetches only its share of every chunk.
def pass1(uri, row_groups, offset, columns, node_ids, seed, partitions, remap):
    # params: a Ray task: the object refs among its arguments are resolved by Ray only at the top level
    table = read_chunk(uri, row_groups, columns)
    stats, img_parts, grp_parts = count_chunk(table, offset, node_ids, seed, partitions, remap)
    hasher = lineage.TableHasher(columns)
    hasher.add(table, offset)
    return (stats, hasher.partial(), *img_parts, *grp_parts)


def dup_reduce(n_nodes, *parts):
    return find_duplicates(parts, n_nodes)


def group_reduce(lookup, duplicates, n_classes, *parts):
    return find_mixed_groups(parts, lookup, duplicates, n_classes)


def merge_duplicates(*parts):
    return Duplicates.merge(list(parts))


def pass2(uri, row_groups, offset, columns, node_ids, seed, plan, duplicates, remap, *mixed_parts):
    # params: a Ray task: the object refs among its arguments are resolved by Ray only at the top level
    table = read_chunk(uri, row_groups, columns)
    mixed = np.sort(np.concatenate(mixed_parts)) if mixed_parts else np.zeros(0, np.uint64)
    return assign_chunk(table, offset, node_ids, seed, plan, mixed, duplicates, remap)


@dataclass
class Counts:
    """Pass 1's merged counts: images per node (duplicates taken out) and per (node, group bucket)."""
    node_counts: np.ndarray
    node_hist: np.ndarray
    duplicates: int


@dataclass(frozen=True)
class ChunkInputs:
    """What every pass-1 task reads besides its chunk: the taxonomy's node ids and the near-duplicate regrouping
    (object refs) and the seed."""
    node_ids: Any  # ObjectRef of pa.Array
    seed: int
    remap: Any  # ObjectRef


@dataclass
class Pass1:
    """What pass 1 and its reducers leave: the merged counts, the duplicates (an object ref), each hash partition's
    group refs, and the manifest's fingerprint (hashed while it was read)."""
    counts: Counts
    duplicates: Any
    group_parts: list
    fingerprint: lineage.Fingerprint


def count_pass(ray, inp: Inputs, chunks, partitions: int, given: ChunkInputs) -> Pass1:
    """Pass 1 and the duplicate reducers."""
    n_nodes = len(inp.tax)
    p1 = ray.remote(num_returns=2 + 2 * partitions)(pass1)
    refs = [p1.remote(inp.manifest, rg, off, inp.columns, given.node_ids, given.seed, partitions, given.remap)
            for rg, off, _ in chunks]
    dup_refs = [ray.remote(num_returns=2)(dup_reduce).remote(n_nodes, *[r[2 + p] for r in refs])
                for p in range(partitions)]
    node_counts = np.zeros(n_nodes, np.int64)
    # Dense (node, bucket) counts: a fixed size whatever the number of rows.
    node_hist = np.zeros(n_nodes * HASH_BUCKETS, np.int64)
    for r in refs:
        stats: ChunkStats = ray.get(r[0])
        node_counts += stats.node_counts
        np.add.at(node_hist, stats.hist_keys, stats.hist_counts)
    content, rows = lineage.TableHasher.merge(ray.get([r[1] for r in refs])) if refs else ("empty", 0)
    fingerprint = lineage.Fingerprint(uri=storage.redact(inp.manifest), method="columns", content=content,
                                      columns=inp.columns, rows=rows, identity=storage.identity(inp.manifest))
    # Quarantined duplicates do not count towards classes.
    n_duplicates = 0
    for summary_ref, _ in dup_refs:
        dup_counts, (k, c) = ray.get(summary_ref)
        node_counts -= dup_counts
        np.add.at(node_hist, k, -c)
        n_duplicates += int(dup_counts.sum())
    duplicates = ray.remote(merge_duplicates).remote(*[d[1] for d in dup_refs])
    group_parts = [[r[2 + partitions + p] for r in refs] for p in range(partitions)]
    return Pass1(Counts(node_counts, node_hist, n_duplicates), duplicates, group_parts, fingerprint)


def fold_plan(ray, first: Pass1, classes, lookup, pcfg: PartitionConfig):
    """Move groups spanning classes to the mixed stratum, then cut every stratum into folds: (AssignPlan, the
    mixed groups' refs, the number of mixed groups)."""
    counts, n_classes = first.counts, len(classes)
    # Per-stratum bucket histograms: strata are the classes, plus the mixed stratum as the last row.
    hist = np.zeros((n_classes + 1) * HASH_BUCKETS, np.int64)
    keys = np.flatnonzero(counts.node_hist)
    np.add.at(hist, lookup[keys // HASH_BUCKETS].astype(np.int64) * HASH_BUCKETS + keys % HASH_BUCKETS,
              counts.node_hist[keys])
    lookup_ref = ray.put(lookup)
    grp_refs = [ray.remote(num_returns=2)(group_reduce).remote(lookup_ref, first.duplicates, n_classes, *parts)
                for parts in first.group_parts]
    n_mixed = 0
    for move_ref, _ in grp_refs:
        k, c, n = ray.get(move_ref)
        np.add.at(hist, k, c)
        n_mixed += n
    folds_by_stratum = fold_table(hist.reshape(n_classes + 1, HASH_BUCKETS), pcfg.folds, pcfg.seed)
    return AssignPlan(lookup, folds_by_stratum, n_classes, pcfg.folds), [m for _, m in grp_refs], n_mixed


@dataclass(frozen=True)
class AssignInputs:
    """What every pass-2 task reads besides its chunk: the taxonomy's node ids, the seed, the fold plan, the
    repeated ids, the near-duplicate regrouping and the lesions that span classes (object refs where shared; Ray
    resolves refs only at the top level of a task's arguments, so ``assign_pass`` hands them on one by one)."""
    node_ids: Any  # ObjectRef of pa.Array
    seed: int
    plan: AssignPlan
    duplicates: Any
    remap: Any  # ObjectRef
    mixed: list  # ObjectRefs of uint64 arrays


def assign_pass(ray, inp: Inputs, chunks, cpus: int, given: AssignInputs, paths: dict) -> tuple[int, int, np.ndarray]:
    """Pass 2, a bounded window of chunks in flight, streamed into labels.parquet and quarantine.parquet in
    manifest order: (labels rows, quarantined rows, images per class and fold)."""
    p2 = ray.remote(num_returns=3)(pass2)
    plan = given.plan
    plan_ref = ray.put(plan)
    pending = iter(chunks)
    window = 2 * cpus  # chunks in flight: bounds the object store (and the driver's mapped pages) at any size

    def submit(n):
        return [p2.remote(inp.manifest, rg, off, inp.columns, given.node_ids, given.seed, plan_ref, given.duplicates,
                          given.remap, *given.mixed) for rg, off, _ in itertools.islice(pending, n)]

    refs = submit(window)
    fold_counts = np.zeros((plan.n_classes, plan.folds), np.int64)
    meter = progress.Meter("partition: assigning", inp.pf.metadata.num_rows, unit="rows", quick_to_log=True)
    with storage.table_sink(paths["labels"], schemas.LABELS.arrow()) as labels_sink, \
            storage.table_sink(paths["quarantine"], schemas.QUARANTINE.arrow()) as quarantine_sink:
        while refs:
            refs += submit(1)
            ref_labels, ref_quarantine, ref_counts = refs.pop(0)
            labels, quarantine = ray.get(ref_labels), ray.get(ref_quarantine)
            labels_sink.write(labels)
            quarantine_sink.write(quarantine)
            fold_counts += ray.get(ref_counts)
            meter.update(labels.num_rows + quarantine.num_rows)
    return labels_sink.rows, quarantine_sink.rows, fold_counts
