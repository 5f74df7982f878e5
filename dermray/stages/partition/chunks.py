"""Per-chunk logic, pure numpy and Arrow (Ray only calls it): validate a chunk's rows, count images per taxonomy
node and group bucket, find duplicate ids and groups that span classes, assign each row its class and fold."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.ids import SEEDS as ID_SEEDS
from dermray.core.ids import lesion_keys
from dermray.core.partitioning import (
    HASH_BUCKETS,
    MIXED_STRATUM,
    hash_bucket,
    hash_strings,
)
from dermray.stages.partition.shared import STAGE
from dermray.store import schemas


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


def group_keys(table: pa.Table, remap: pa.Table | None = None) -> pa.Array:
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
    groups = group_keys(table, remap).filter(pa.array(ok)).to_numpy(zero_copy_only=False)
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
    # params: pass 2's task arguments, handed on as Ray resolved them (the shared ones travel as object refs)
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
    g = hash_strings(group_keys(table, remap).filter(okm).to_numpy(zero_copy_only=False), seed)
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
