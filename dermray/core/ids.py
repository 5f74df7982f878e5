"""Image ids at scale without Python objects per row: 128-bit id fingerprints (two independent 64-bit hashes),
repeated ids across chunks, and set membership against a sorted fingerprint array; and the one rule for which
lesion an image belongs to (``lesion_keys``). Pure numpy and pyarrow.

With 10 million ids a single 64-bit hash would collide with probability ~3e-6 (and a collision would silently
skip an image); with 128 bits the probability is ~1e-25.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.partitioning import hash_strings

SEEDS = (0x5EED_0001, 0x5EED_0002)
FINGERPRINT = np.dtype([("h1", np.uint64), ("h2", np.uint64)])


def fingerprints(ids) -> np.ndarray:
    """FINGERPRINT [n] of string ids (the same in every process and run)."""
    ids = np.asarray(ids, dtype=object)
    out = np.empty(len(ids), FINGERPRINT)
    out["h1"], out["h2"] = (hash_strings(ids, s) for s in SEEDS)
    return out


def repeated(fp: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose id appeared at an earlier row, that earlier first row), both int64 sorted by row; ``fp`` and
    ``rows`` may hold one hash partition of a table's ids (every copy of an id lands in the same partition)."""
    order = np.lexsort((rows, fp["h2"], fp["h1"]))
    f, r = fp[order], rows[order]
    same = np.zeros(len(r), dtype=bool)
    same[1:] = (f["h1"][1:] == f["h1"][:-1]) & (f["h2"][1:] == f["h2"][:-1])
    start = np.flatnonzero(~same)
    first = np.repeat(r[start], np.diff(np.append(start, len(r))))
    dup, first = r[same], first[same]
    o = np.argsort(dup, kind="stable")
    return dup[o].astype(np.int64), first[o].astype(np.int64)


def sorted_set(parts: list[np.ndarray]) -> np.ndarray:
    """The distinct fingerprints of ``parts``, sorted: the right operand of ``isin``."""
    if not parts:
        return np.zeros(0, FINGERPRINT)
    return np.unique(np.concatenate(parts))


def isin(fp: np.ndarray, members: np.ndarray) -> np.ndarray:
    """bool [n]: which fingerprints are in the sorted set ``members`` (binary search, no Python loop)."""
    if len(members) == 0 or len(fp) == 0:
        return np.zeros(len(fp), dtype=bool)
    pos = np.clip(np.searchsorted(members, fp), 0, len(members) - 1)
    return members[pos] == fp


def partition_of(fp: np.ndarray, partitions: int) -> np.ndarray:
    return (fp["h1"] % np.uint64(partitions)).astype(np.int64)


def lesion_keys(image_ids, group_ids, alone_prefix: str = "image:") -> pa.Array:
    """Each image's lesion (or patient) key, [n] strings: its ``group_id``, or, where that is null, empty or blank,
    ``alone_prefix + image_id`` - an image without a lesion id is a lesion of its own. The one rule every stage
    uses (partition's groups, train's inner split, evaluate's lesion bootstrap and clustered DeLong); with
    ``group_ids`` None (no such column) every image is alone. The prefix keeps an image's own key from meeting a
    real group id."""
    ids = _strings(image_ids)
    alone = pc.binary_join_element_wise(alone_prefix, ids, "") if alone_prefix else ids
    if group_ids is None:
        return alone
    groups = _strings(group_ids)
    missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(groups), ""), True)
    return pc.if_else(missing, alone, groups)


def _strings(values) -> pa.Array:
    """Arrow strings from an Arrow array, a pandas Series (NaN is null) or a list; numbers become their text."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, from_pandas=True)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    return arr
