"""Partition stage: manifest + taxonomy -> training_classes, labels (image_id, class_index, fold), quarantine.

Distributed on Ray as map-side partial aggregation over the manifest's Parquet row groups, so the driver holds
per-node and per-bucket counts, never per-image rows:

1. map (one task per chunk of row groups): validate rows; count valid images per taxonomy node and per
   (node, group-hash bucket); hash-partition compact (image hash, row) and (group hash, node) pairs;
2. reduce (one task per hash partition): find duplicate image_ids (keep the first row) and groups whose images
   carry more than one label; return only those (few) rows;
3. driver: the partitioning algorithm on the per-node counts, then a fold table per stratum (training class, or
   the shared "mixed" stratum for groups spanning classes) from the per-bucket counts;
4. map again: assign class and fold to each row, quarantine bad rows with a reason; the driver streams the
   chunks into single Parquet files, written atomically.

Rows are numbered from 0 in manifest order; quarantine reasons name the row.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dermray.core.formatting import duration, strict_json
from dermray.core.ids import SEEDS as ID_SEEDS
from dermray.core.ids import lesion_keys
from dermray.core.partitioning import (
    HASH_BUCKETS,
    MIXED_STRATUM,
    TrainingClass,
    fold_table,
    hash_bucket,
    hash_strings,
    node_to_class,
    partition_classes,
    task_membership,
)
from dermray.core.tasks import Task
from dermray.core.taxonomy import Taxonomy
from dermray.errors import UserError
from dermray.runtime import layout, progress, registry
from dermray.runtime.config import RunConfig
from dermray.store import lineage, schemas, storage
from dermray.store.definitions import load_tasks, load_taxonomy

log = logging.getLogger("dermray.partition")

STAGE = "partition"
CHUNK_ROWS = 500_000  # target rows per map task (row groups are never split)


# ---- per-chunk logic (pure numpy/arrow; Ray only calls it) ---------------------------------------------------
def manifest_columns(schema: pa.Schema) -> list[str]:
    cols = ["image_id", "uri", "label"]
    return cols + [c for c in ("group_id", "label_source", "modality") if c in schema.names]


def validate_chunk(table: pa.Table, node_ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(reason per row: object array of str or None, taxonomy node index per row: int32, -1 when invalid)."""
    n = table.num_rows
    reason = np.full(n, None, dtype=object)

    def blank(col: str) -> np.ndarray:
        arr = table.column(col)
        return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(arr), ""), True).to_numpy(zero_copy_only=False)

    label_idx = pc.fill_null(pc.index_in(table.column("label"), value_set=node_ids), -1).to_numpy(
        zero_copy_only=False).astype(np.int32)
    checks = [
        (blank("image_id"), "image_id is null or empty"),
        (blank("label"), "label is null or empty"),
        (blank("uri"), "uri is null or empty"),
        (label_idx < 0, None),  # message built per row below
    ]
    for col in ("label_source", "modality"):
        if col in table.column_names:
            allowed = schemas.MANIFEST.column(col).allowed
            assert allowed is not None  # label_source and modality are enumerations
            arr = table.column(col)
            bad = pc.and_(pc.is_valid(arr), pc.invert(pc.is_in(arr, pa.array(allowed))))
            checks.append((bad.to_numpy(zero_copy_only=False), f"{col} must be one of {', '.join(allowed)}"))
    labels = None
    for mask, message in checks:
        todo = mask & (reason == None)  # noqa: E711 - elementwise on an object array
        if not todo.any():
            continue
        if message is None:
            labels = labels if labels is not None else table.column("label").to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(todo):
                reason[i] = f"label {labels[i]!r} is not a taxonomy node"
        else:
            reason[todo] = message
    label_idx[reason != None] = -1  # noqa: E711
    return reason, label_idx


def _group_keys(table: pa.Table, remap: pa.Table | None = None) -> pa.Array:
    """Each row's group: its group_id (an image without one is a group of its own), or, for an image the
    near-duplicate step merged into another group, that group (``remap``: image_id, group)."""
    ids = table.column("image_id")
    if "group_id" not in table.column_names:
        keys = ids  # no group column: the bare ids, as always (fold hashing reads these keys; another key would
        #             move every image of such a manifest to another fold)
    else:
        keys = lesion_keys(ids, table.column("group_id"))
    if remap is None or remap.num_rows == 0:
        return keys
    pos = pc.index_in(ids, value_set=remap.column("image_id"))
    return pc.if_else(pc.is_valid(pos), pc.take(remap.column("group"), pc.fill_null(pos, 0)), keys)


@dataclass
class ChunkStats:
    """What a map task returns in pass 1 (all small except the hash partitions, which go to reducers)."""
    node_counts: np.ndarray  # int64 [n_nodes]
    hist_keys: np.ndarray  # int64 node * HASH_BUCKETS + bucket
    hist_counts: np.ndarray  # int64


def count_chunk(table: pa.Table, row_offset: int, node_ids: pa.Array, seed: int, partitions: int,
                remap: pa.Table | None = None):
    """Pass 1 on one chunk: (ChunkStats, [image-hash partitions], [group-hash partitions])."""
    n_nodes = len(node_ids)
    _, label_idx = validate_chunk(table, node_ids)
    ok = label_idx >= 0
    rows = np.flatnonzero(ok).astype(np.int64) + row_offset
    labels = label_idx[ok]
    ids = table.column("image_id").filter(pa.array(ok)).to_numpy(zero_copy_only=False)
    groups = _group_keys(table, remap).filter(pa.array(ok)).to_numpy(zero_copy_only=False)
    h1, h2 = (hash_strings(ids, s) for s in ID_SEEDS)
    g = hash_strings(groups, seed)
    buckets = hash_bucket(g)
    node_counts = np.bincount(labels, minlength=n_nodes).astype(np.int64)
    keys, counts = np.unique(labels.astype(np.int64) * HASH_BUCKETS + buckets, return_counts=True)
    part_img = (h1 % np.uint64(partitions)).astype(np.int64)
    part_grp = (g % np.uint64(partitions)).astype(np.int64)
    img_parts, grp_parts = [], []
    for p in range(partitions):
        m = part_img == p
        img_parts.append((h1[m], h2[m], rows[m], labels[m], buckets[m]))
        m = part_grp == p
        grp_parts.append((g[m], labels[m], rows[m]))
    return ChunkStats(node_counts, keys, counts.astype(np.int64)), img_parts, grp_parts


def _sparse_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k, c = np.unique(keys.astype(np.int64), return_counts=True)
    return k, c.astype(np.int64)


@dataclass
class Duplicates:
    """Rows repeating an earlier image_id (sorted by row), and where the first one was."""
    rows: np.ndarray  # int64
    first: np.ndarray  # int64

    @staticmethod
    def merge(parts: "list[Duplicates]") -> "Duplicates":
        rows = np.concatenate([p.rows for p in parts]) if parts else np.zeros(0, np.int64)
        first = np.concatenate([p.first for p in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(rows, kind="stable")
        return Duplicates(rows[order], first[order])


def find_duplicates(parts, n_nodes: int):
    """Reduce: duplicate image_ids within one hash partition (the first row in manifest order is kept).

    Returns (small summary for the driver: per-node counts and sparse (node, bucket) counts of the duplicate rows,
    to take out of the class counts; Duplicates, which stays in the object store for the tasks that need it)."""
    h1 = np.concatenate([p[0] for p in parts])
    h2 = np.concatenate([p[1] for p in parts])
    rows = np.concatenate([p[2] for p in parts])
    labels = np.concatenate([p[3] for p in parts]).astype(np.int64)
    buckets = np.concatenate([p[4] for p in parts])
    order = np.lexsort((rows, h2, h1))
    h1, h2, rows, labels, buckets = h1[order], h2[order], rows[order], labels[order], buckets[order]
    same = np.zeros(len(rows), dtype=bool)
    same[1:] = (h1[1:] == h1[:-1]) & (h2[1:] == h2[:-1])
    start = np.flatnonzero(~same)
    first_of = np.repeat(rows[start], np.diff(np.append(start, len(rows))))
    summary = (np.bincount(labels[same], minlength=n_nodes).astype(np.int64),
               _sparse_counts(labels[same] * HASH_BUCKETS + buckets[same]))
    return summary, Duplicates.merge([Duplicates(rows[same], first_of[same])])


def find_mixed_groups(parts, lookup: np.ndarray, duplicates: Duplicates, n_classes: int):
    """Reduce (after the classes are known): groups whose images fall in more than one training class.

    Returns (small summary for the driver: sparse (stratum, bucket) count changes that move those groups' images
    from their classes' strata to the mixed stratum, row ``n_classes``, and the number of mixed groups; the sorted
    uint64 hashes of the mixed groups, which stay in the object store for pass 2)."""
    g = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    rows = np.concatenate([p[2] for p in parts])
    keep = ~np.isin(rows, duplicates.rows)
    g, cls = g[keep], lookup[labels[keep]].astype(np.int64)
    pairs = np.unique(np.stack([g.view(np.int64), cls], axis=1), axis=0)
    gs, n_cls = np.unique(pairs[:, 0], return_counts=True)
    mixed = np.sort(gs[n_cls > 1].view(np.uint64))
    moving = np.isin(g, mixed)
    b = hash_bucket(g[moving]).astype(np.int64)
    out_k, out_c = _sparse_counts(cls[moving] * HASH_BUCKETS + b)
    in_k, in_c = _sparse_counts(n_classes * HASH_BUCKETS + b)
    return (np.concatenate([out_k, in_k]), np.concatenate([-out_c, in_c]), len(mixed)), mixed


@dataclass
class AssignPlan:
    """What the driver decided after pass 1, shipped to every pass-2 task."""
    lookup: np.ndarray  # int32 [n_nodes]: training class of an image labelled with each node
    folds_by_stratum: np.ndarray  # int8 [n_classes + 1, HASH_BUCKETS]; the last row is the mixed stratum
    n_classes: int
    folds: int


def assign_chunk(table: pa.Table, row_offset: int, node_ids: pa.Array, seed: int, plan: AssignPlan,
                 mixed_groups: np.ndarray, duplicates: Duplicates, remap: pa.Table | None = None
                 ) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """Pass 2 on one chunk: (labels rows, quarantine rows, int64 [n_classes, folds] images per class and fold)."""
    lookup, folds_by_stratum = plan.lookup, plan.folds_by_stratum
    dup_rows, dup_first = duplicates.rows, duplicates.first
    reason, label_idx = validate_chunk(table, node_ids)
    n = table.num_rows
    rows = np.arange(row_offset, row_offset + n, dtype=np.int64)
    if len(dup_rows):
        pos = np.searchsorted(dup_rows, rows)
        pos_ok = pos < len(dup_rows)
        is_dup = np.zeros(n, dtype=bool)
        is_dup[pos_ok] = dup_rows[pos[pos_ok]] == rows[pos_ok]
        for i in np.flatnonzero(is_dup & (reason == None)):  # noqa: E711
            reason[i] = f"duplicate image_id (first seen at row {int(dup_first[pos[i]])})"
    ok = reason == None  # noqa: E711
    cls = np.full(n, -1, dtype=np.int32)
    cls[ok] = lookup[label_idx[ok]]
    unassigned = ok & (cls < 0)
    if unassigned.any():  # cannot happen: every counted node has a class
        raise RuntimeError(f"rows {rows[unassigned][:5].tolist()} got no training class")
    okm = pa.array(ok)
    g = hash_strings(_group_keys(table, remap).filter(okm).to_numpy(zero_copy_only=False), seed)
    stratum = cls[ok].astype(np.int64)
    if len(mixed_groups):
        pos = np.clip(np.searchsorted(mixed_groups, g), 0, len(mixed_groups) - 1)
        stratum[mixed_groups[pos] == g] = MIXED_STRATUM
    # The mixed stratum is the table's last row.
    fold = folds_by_stratum[np.where(stratum < 0, folds_by_stratum.shape[0] - 1, stratum), hash_bucket(g)]
    labels_out = pa.table({
        "image_id": table.column("image_id").filter(okm),
        "class_index": pa.array(cls[ok], pa.int32()),
        "fold": pa.array(fold.astype(np.int32), pa.int32()),
    })
    bad = ~ok
    quarantine = pa.table({
        "stage": pa.array([STAGE] * int(bad.sum()), pa.string()),
        "image_id": table.column("image_id").filter(pa.array(bad)),
        "row": pa.array(rows[bad], pa.int64()),
        "uri": table.column("uri").filter(pa.array(bad)),
        "reason": pa.array(reason[bad].tolist(), pa.string()),
    })
    counts = np.zeros((plan.n_classes, plan.folds), dtype=np.int64)
    np.add.at(counts, (cls[ok], fold.astype(np.int64)), 1)
    return labels_out, quarantine, counts


# ---- the stage ----------------------------------------------------------------------------------------------
def read_chunk(uri: str, row_groups: list[int], columns: list[str]) -> pa.Table:
    table = storage.parquet_file(uri).read_row_groups(row_groups, columns=columns)
    # Dictionary-encoded strings compare and hash as plain strings.
    return pa.table({c: (pc.cast(table.column(c), pa.string()) if pa.types.is_dictionary(table.column(c).type)
                         else table.column(c)) for c in table.column_names})


# Ray tasks (module level: defined once, shipped by reference). Each hash partition of pass 1 is its own object,
# so a reducer fetches only its share of every chunk.
def pass1(uri, row_groups, offset, columns, node_ids, seed, partitions, remap):
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


# ---- near-duplicate images (dermray/core/neardup.py), before the folds are cut --------------------------------------
def describe_chunk(uri, row_groups, offset, columns, node_ids, max_pixels):
    """Ray task: the valid rows of a chunk with their image's sha256 and perceptual hashes (unreadable images are
    left out: training quarantines them)."""
    from dermray.core import neardup
    from dermray.core.transforms import ImageDecodeError

    table = read_chunk(uri, row_groups, columns)
    _, label_idx = validate_chunk(table, node_ids)
    ok = np.flatnonzero(label_idx >= 0)
    base = storage.parent(uri)
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    uris = table.column("uri").to_numpy(zero_copy_only=False)
    groups = _group_keys(table).to_numpy(zero_copy_only=False)
    rows, shas, hashes, unreadable = [], [], [], 0
    for i in ok:
        try:
            sha, h = neardup.describe(storage.read_bytes(storage.resolve(uris[i], base)), max_pixels)
        except (UserError, ImageDecodeError):
            unreadable += 1
            continue
        rows.append(i)
        shas.append(sha)
        hashes.append(h)
    rows = np.array(rows, np.int64)
    return {"image_id": ids[rows], "uri": np.array([storage.resolve(u, base) for u in uris[rows]], dtype=object),
            "group": groups[rows], "sha": np.array(shas, dtype=object),
            "hashes": np.array(hashes, np.uint64).reshape(-1, 3), "unreadable": unreadable}


def verify_pairs(uris_a, uris_b, max_pixels):
    """Ray task: the aligned pixel similarity of each candidate pair (NaN where an image cannot be read)."""
    from dermray.core import neardup

    return neardup.similarities(uris_a, uris_b, storage.read_bytes, max_pixels)


def near_duplicates(ray, inp: Inputs, chunks, node_ids_ref, pcfg) -> tuple[pa.Table, pa.Table, dict, pa.Table]:
    """(remap: image_id -> merged group, the accepted pairs, counts, every image's hashes): images whose bytes are
    equal, or whose perceptual hashes are close and whose pixels align (neardup.similarity >=
    partition.near_duplicate_similarity), join one group, so that the folds never split them."""
    from dermray.core import neardup

    t0 = time.perf_counter()
    max_pixels = 50_000_000
    described = ray.get([ray.remote(describe_chunk).remote(inp.manifest, rg, off, inp.columns, node_ids_ref,
                                                           max_pixels) for rg, off, _ in chunks])
    cat = {k: np.concatenate([d[k] for d in described]) for k in ("image_id", "uri", "group", "sha")}
    hashes = np.concatenate([d["hashes"] for d in described]) if described else np.zeros((0, 3), np.uint64)
    meter_n = len(hashes)
    cand, skipped = neardup.candidates(hashes, pcfg.near_duplicate_hamming)
    # Exact copies: the same bytes.
    order = np.argsort(cat["sha"], kind="stable")
    same = np.flatnonzero(cat["sha"][order][1:] == cat["sha"][order][:-1])
    exact = np.stack([order[same], order[same + 1]], axis=1) if len(same) else np.zeros((0, 2), np.int64)
    exact = np.sort(exact, axis=1)
    batches = [cand[i:i + 256] for i in range(0, len(cand), 256)]
    sims = np.concatenate(ray.get([ray.remote(verify_pairs).remote(cat["uri"][b[:, 0]], cat["uri"][b[:, 1]],
                                                                   max_pixels) for b in batches])) \
        if batches else np.zeros(0)
    keep = sims >= pcfg.near_duplicate_similarity
    pairs = {(int(a), int(b)): (int(d), float(s), False) for (a, b, d), s in zip(cand[keep], sims[keep])}
    for a, b in exact:
        pairs[(int(a), int(b))] = (0, 1.0, True)
    ordered = sorted(pairs)
    merged_groups, merged = neardup.merge_groups(cat["group"], ordered, pcfg.near_duplicate_max_groups)
    changed = merged_groups != cat["group"]
    remap = pa.table({"image_id": pa.array(cat["image_id"][changed].tolist(), pa.string()),
                      "group": pa.array(merged_groups[changed].tolist(), pa.string())})
    rows = [{"image_a": cat["image_id"][a], "image_b": cat["image_id"][b], "group_a": str(cat["group"][a]),
             "group_b": str(cat["group"][b]), "hamming": pairs[(a, b)][0], "similarity": pairs[(a, b)][1],
             "exact": pairs[(a, b)][2], "crossed_groups": bool(cat["group"][a] != cat["group"][b]), "merged": m}
            for (a, b), m in zip(ordered, merged)]
    table = pa.Table.from_pylist(rows, schema=schemas.NEAR_DUPLICATES.arrow())
    components = pd.Series(merged_groups).groupby(merged_groups).size() if len(merged_groups) else pd.Series([])
    counts = {"described": meter_n, "unreadable": int(sum(d["unreadable"] for d in described)),
              "candidates": int(len(cand)), "skipped_buckets": skipped, "pairs": len(rows),
              "exact": int(len(exact)), "crossed_groups": int(sum(r["crossed_groups"] for r in rows)),
              "images_regrouped": int(changed.sum()), "refused_merges": int(sum(not m for m in merged)),
              "largest_component_images": int(components.max()) if len(components) else 0,
              "seconds": round(time.perf_counter() - t0, 2)}
    described_table = pa.table({
        "image_id": pa.array(cat["image_id"].tolist(), pa.string()), "uri": pa.array(cat["uri"].tolist(), pa.string()),
        "sha256": pa.array(cat["sha"].tolist(), pa.string()),
        "phash": pa.array([h.tolist() for h in hashes], pa.list_(pa.uint64()))}, schema=schemas.IMAGE_HASHES.arrow())
    return remap, table, counts, described_table


@dataclass
class Inputs:
    """What the stage reads before Ray starts: the manifest's metadata, the taxonomy, the tasks, their
    fingerprints (the manifest's is computed while pass 1 reads it)."""
    manifest: str
    pf: pq.ParquetFile
    columns: list[str]
    tax: Taxonomy
    tasks: list
    fingerprints: dict


def read_inputs(cfg: RunConfig) -> Inputs:
    if not cfg.data.manifest:
        raise UserError("no manifest given: set data.manifest (or --manifest)")
    if not cfg.data.taxonomy:
        raise UserError("no taxonomy given: set data.taxonomy (or --taxonomy)")
    tax = load_taxonomy(cfg.data.taxonomy)
    tasks: list[Task] = load_tasks(cfg.data.tasks, tax) if cfg.data.tasks else []
    pf = storage.parquet_file(cfg.data.manifest)
    schemas.check_columns(pf.schema_arrow, schemas.MANIFEST, storage.redact(cfg.data.manifest))
    fps = {"taxonomy": lineage.file_fingerprint(cfg.data.taxonomy)}
    if cfg.data.tasks:
        fps["tasks"] = lineage.file_fingerprint(cfg.data.tasks)
    return Inputs(cfg.data.manifest, pf, manifest_columns(pf.schema_arrow), tax, tasks, fps)


@dataclass
class Counts:
    """Pass 1's merged counts: images per node (duplicates taken out) and per (node, group bucket)."""
    node_counts: np.ndarray
    node_hist: np.ndarray
    duplicates: int


def count_pass(ray, inp: Inputs, chunks, partitions: int, node_ids_ref, seed: int, remap_ref):
    """Pass 1 and the duplicate reducers: (Counts, the duplicates' object ref, the group partitions' refs,
    the manifest's fingerprint)."""
    n_nodes = len(inp.tax)
    p1 = ray.remote(num_returns=2 + 2 * partitions)(pass1)
    refs = [p1.remote(inp.manifest, rg, off, inp.columns, node_ids_ref, seed, partitions, remap_ref)
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
    return Counts(node_counts, node_hist, n_duplicates), duplicates, group_parts, fingerprint


def fold_plan(ray, counts: Counts, classes, lookup, duplicates, group_parts, folds: int, seed: int):
    """Move groups spanning classes to the mixed stratum, then cut every stratum into folds: (AssignPlan, the
    mixed groups' refs, the number of mixed groups)."""
    n_classes = len(classes)
    # Per-stratum bucket histograms: strata are the classes, plus the mixed stratum as the last row.
    hist = np.zeros((n_classes + 1) * HASH_BUCKETS, np.int64)
    keys = np.flatnonzero(counts.node_hist)
    np.add.at(hist, lookup[keys // HASH_BUCKETS].astype(np.int64) * HASH_BUCKETS + keys % HASH_BUCKETS,
              counts.node_hist[keys])
    lookup_ref = ray.put(lookup)
    grp_refs = [ray.remote(num_returns=2)(group_reduce).remote(lookup_ref, duplicates, n_classes, *parts)
                for parts in group_parts]
    n_mixed = 0
    for move_ref, _ in grp_refs:
        k, c, n = ray.get(move_ref)
        np.add.at(hist, k, c)
        n_mixed += n
    folds_by_stratum = fold_table(hist.reshape(n_classes + 1, HASH_BUCKETS), folds, seed)
    return AssignPlan(lookup, folds_by_stratum, n_classes, folds), [m for _, m in grp_refs], n_mixed


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
    meter = progress.Meter("partition: assigning", inp.pf.metadata.num_rows, unit="rows")
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
        if near_counts:
            progress.say("partition: %d near-duplicate pairs (%d across groups) among %s images; %d images regrouped",
                         near_counts["pairs"], near_counts["crossed_groups"], f"{near_counts['described']:,}",
                         near_counts["images_regrouped"])
        remap_ref = ray.put(remap)
        t0 = time.perf_counter()
        counts, duplicates, group_parts, manifest_fp = count_pass(ray, inp, chunks, partitions, node_ids_ref,
                                                                 pcfg.seed, remap_ref)
        t_pass1 = time.perf_counter() - t0
        classes = partition_classes(inp.tax, counts.node_counts, pcfg.max_class_size)
        if not classes:
            raise UserError(f"{storage.redact(inp.manifest)}: no valid rows to partition "
                            "(see quarantine for each row's reason)" if inp.pf.metadata.num_rows else
                            f"{storage.redact(inp.manifest)}: the manifest has no rows")
        progress.say("partition: %d training classes from %s images", len(classes),
                     f"{int(counts.node_counts.sum()):,}")
        t0 = time.perf_counter()
        lookup = node_to_class(inp.tax, classes)
        plan, mixed_refs, n_mixed = fold_plan(ray, counts, classes, lookup, duplicates, group_parts, pcfg.folds,
                                              pcfg.seed)
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
    summary = summarise(cfg, inp, made, partition_lineage(inp, manifest_fp, cfg), paths)
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
