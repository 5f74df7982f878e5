"""Image ids at scale without Python objects per row: 128-bit id fingerprints (two independent 64-bit hashes),
repeated ids across chunks, and set membership against a sorted fingerprint array. Pure numpy.

With 10 million ids a single 64-bit hash would collide with probability ~3e-6 (and a collision would silently
skip an image); with 128 bits the probability is ~1e-25.
"""
from __future__ import annotations

import numpy as np

from dermray.partitioning import hash_strings

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
