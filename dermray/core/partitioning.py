"""The paper's disease-partitioning algorithm, the image -> class lookup, the training class -> task class
membership, and deterministic grouped, stratified fold assignment. Pure logic: numpy only, no Ray, no I/O.

Partitioning rule (Esteva et al. 2017, with nothing dropped). Walk the taxonomy top-down from the root:
- a node whose subtree holds fewer than ``max_class_size`` images (and at least one) becomes one training class
  covering its whole subtree (``scope = "subtree"``);
- otherwise, if it is a leaf, it still becomes its own class (the paper's pseudo-code drops such a big leaf);
- otherwise, the images labelled exactly at this internal node form a class of their own (``scope = "node"``;
  the paper's pseudo-code drops them once the recursion passes the node), and the walk recurses into each child.
Nodes with no images at or below them give no class. Classes are numbered in depth-first order (children sorted
by node_id), so the numbering is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dermray.core.evaluation_tasks import Task
from dermray.core.taxonomy import Taxonomy

SUBTREE = "subtree"
NODE = "node"


@dataclass(frozen=True)
class TrainingClass:
    class_index: int
    node: int  # taxonomy node index
    node_id: str
    name: str
    n_images: int
    scope: str  # SUBTREE or NODE


def partition_classes(tax: Taxonomy, own_counts: np.ndarray, max_class_size: int) -> list[TrainingClass]:
    """Training classes from per-node image counts (``own_counts[i]`` = images labelled exactly node i)."""
    if max_class_size < 1:
        raise ValueError("max_class_size must be at least 1")
    own = np.asarray(own_counts, dtype=np.int64)
    total = tax.subtree_sizes(own)
    out: list[TrainingClass] = []

    def add(node: int, n: int, scope: str) -> None:
        name = tax.names[node] if scope == SUBTREE else f"{tax.names[node]} (node only)"
        out.append(TrainingClass(len(out), node, tax.node_ids[node], name, int(n), scope))

    stack = [tax.root]
    while stack:
        i = stack.pop()
        if total[i] == 0:
            continue
        if total[i] < max_class_size or tax.is_leaf(i):
            add(i, total[i], SUBTREE)
            continue
        if own[i] > 0:
            add(i, own[i], NODE)
        stack.extend(reversed(tax.children[i]))
    return out


def node_to_class(tax: Taxonomy, classes: list[TrainingClass]) -> np.ndarray:
    """For each taxonomy node, the class an image labelled with it belongs to (int32; -1: none, which happens
    only for nodes that had no images when the classes were built)."""
    lookup = np.full(len(tax), -1, dtype=np.int32)
    for c in classes:
        if c.scope == SUBTREE:
            for j in tax.descendants(c.node):
                lookup[j] = c.class_index
    for c in classes:
        if c.scope == NODE:
            lookup[c.node] = c.class_index
    return lookup


@dataclass(frozen=True)
class Unattributable:
    task: str
    class_index: int
    class_name: str
    task_classes: tuple[str, ...]  # the task classes whose boundary its images straddle


def task_membership(tax: Taxonomy, classes: list[TrainingClass], tasks: list[Task], own_counts: np.ndarray
                    ) -> tuple[list[tuple[str, str, int]], list[Unattributable]]:
    """(task, task class, class_index) rows: the training classes whose probabilities sum to each task class (the
    paper's inference algorithm), and the training classes that cannot be attributed.

    A training class belongs to a task class when every taxonomy node it holds images of lies at or below that
    task class's nodes. It cannot be attributed when its images straddle the boundary (some inside a task class,
    some outside it), e.g. a merged class "melanocytic lesions" holding both nevi and melanomas.
    """
    own = np.asarray(own_counts)
    rows, bad = [], []
    for c in classes:
        held = [j for j in (tax.descendants(c.node) if c.scope == SUBTREE else [c.node]) if own[j] > 0]
        for task in tasks:
            inside = {k.name: sum(any(tax.is_ancestor(t, j) for t in k.nodes) for j in held)
                      for k in task.classes}
            full = [name for name, n in inside.items() if n == len(held) and held]
            partial = [name for name, n in inside.items() if 0 < n < len(held)]
            if full:
                rows.append((task.name, full[0], c.class_index))
            elif partial:
                bad.append(Unattributable(task.name, c.class_index, c.name, tuple(partial)))
    rows.sort(key=lambda r: ([t.name for t in tasks].index(r[0]), r[2]))
    return rows, bad


# ---- folds ------------------------------------------------------------------------------------------------------
HASH_BUCKETS = 4096  # fold resolution: a class is cut into folds at bucket granularity (< 0.03 % of its images)
MIXED_STRATUM = -1  # groups whose images fall in more than one class share this stratum


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_strings(values, seed: int = 0) -> np.ndarray:
    """Deterministic 64-bit hashes of strings (same in every process and run), mixed with ``seed``."""
    arr = np.asarray(values, dtype=object)
    h = pd.util.hash_array(arr, categorize=False)
    with np.errstate(over="ignore"):
        return _splitmix64(h ^ _splitmix64(np.array([seed], dtype=np.uint64))[0])


def hash_bucket(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(64 - 12)).astype(np.int32)  # top 12 bits: HASH_BUCKETS = 4096


def fold_table(hist: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each (stratum, bucket): int8 [strata, HASH_BUCKETS].

    ``hist[s, b]`` counts images of stratum s whose group hashes to bucket b. A stratum's buckets, in order, are
    laid on a circle of circumference 1 by their share of its mass, rotated by a seeded offset drawn per stratum,
    and the circle is cut into ``folds`` equal arcs; a bucket goes to the arc holding its mass midpoint. So every
    stratum is spread over the folds as evenly as its groups allow (a large one to within a bucket), a group,
    hashing to one bucket, never spans two folds, and a small stratum's few groups land in folds that change with
    the seed: without the rotation a class of one group would always fall in the middle fold and a class of two
    in the same two folds, starving the first and last folds of small classes (a biased validation).
    """
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum(axis=1, keepdims=True)
    mid = np.cumsum(hist, axis=1) - hist / 2.0
    offset = np.random.default_rng([seed, 0xF01D]).random((hist.shape[0], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, mid / np.maximum(total, 1), 0.0)
    return np.clip(np.floor(((frac + offset) % 1.0) * folds), 0, folds - 1).astype(np.int8)
