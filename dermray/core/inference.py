"""The paper's inference algorithm, in one place: P(task class u) = sum of P(v) over the training classes v that lie
at or below u. Pure numpy / Arrow: no Ray, no I/O.

The link between the two kinds of class is the partition stage's ``task_membership`` table (task, task_class,
class_index): ``membership_matrix`` turns it into a 0/1 matrix [n_training_classes, n_task_classes], and every
stage goes through it - training (validation accuracy per task), scoring (task columns), evaluation and saliency
(the target whose log-probability is explained).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.evaluation_tasks import Task
from dermray.core.taxonomy import Taxonomy
from dermray.errors import UserError

NOT_IN_TASK = -1  # the truth of an image whose label lies in no class of a task


def membership_matrix(membership: pd.DataFrame, task: Task, n_classes: int) -> np.ndarray:
    """float64 [n_classes, len(task.classes)]: 1 where training class i counts towards task class j.

    ``membership``: the task_membership table (columns task, task_class, class_index). A class_index beyond
    ``n_classes`` means the partition and the model disagree: a UserError."""
    m = np.zeros((n_classes, len(task.classes)))
    rows = membership[membership["task"] == task.name]
    col = {c: j for j, c in enumerate(task.class_names)}
    unknown = sorted(set(rows["task_class"]) - set(col))
    if unknown:
        raise UserError(f"task_membership names task class(es) {unknown} that task {task.name!r} does not have: "
                        "the partition was built with other tasks")
    index = rows["class_index"].to_numpy(np.int64)
    if len(index) and (index.max() >= n_classes or index.min() < 0):
        raise UserError(f"task_membership names training class {int(index.max())} but the model has {n_classes} "
                        "training classes: the partition and the model do not match")
    m[index, [col[c] for c in rows["task_class"]]] = 1.0
    return m


def membership_matrices(membership: pd.DataFrame, tasks: list[Task], n_classes: int) -> dict[str, np.ndarray]:
    """``membership_matrix`` of every task, by task name (float32: what the training worker multiplies)."""
    return {t.name: membership_matrix(membership, t, n_classes).astype(np.float32) for t in tasks}


def task_probabilities(probs: np.ndarray, membership: pd.DataFrame, task: Task) -> np.ndarray:
    """[n, K] probability of each task class from [n, C] training-class probabilities."""
    return probs @ membership_matrix(membership, task, probs.shape[1])


def binary_score(task_probs: np.ndarray, positive: int) -> np.ndarray:
    """The binary score P(pos) / (P(pos) + P(neg)) from [n, 2] task-class probabilities; NaN where both are 0."""
    pos = task_probs[:, positive]
    total = task_probs.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, pos / np.where(total > 0, total, 1), np.nan)


def not_estimable(matrix: np.ndarray, task: Task) -> str | None:
    """Why a model cannot score ``task``: the task classes that no training class lies under (``matrix``:
    membership_matrix [C, K], an all-zero column), or None. Their probability is 0 by construction, not by the
    model: a binary score would be 0 everywhere and read as an AUC of 0.5 and a threshold of 0."""
    empty = [name for j, name in enumerate(task.class_names) if not matrix[:, j].any()]
    if not empty:
        return None
    return (f"not estimable: no training class lies under task class {', '.join(empty)} of {task.name} (the "
            "partition made none there: too few training images, or none)")


def binary_task_score(probs: np.ndarray, matrix: np.ndarray, positive: int) -> np.ndarray:
    """The binary score of [n, C] training-class probabilities through ``matrix`` [C, 2] (``binary_score`` of
    ``probs @ matrix``); all NaN when a task class has no training class under it (``not_estimable``)."""
    if not matrix.any(axis=0).all():
        return np.full(len(probs), np.nan)
    return binary_score(probs @ matrix, positive)


def node_task_class(tax: Taxonomy, task: Task) -> np.ndarray:
    """int64 [n_nodes]: the task class an image labelled with each taxonomy node belongs to (NOT_IN_TASK: none)."""
    out = np.full(len(tax), NOT_IN_TASK, dtype=np.int64)
    for k, cls in enumerate(task.classes):
        for node in cls.nodes:
            out[tax.descendants(node)] = k
    return out


def truth_for_task(tax: Taxonomy, task: Task, labels: np.ndarray) -> np.ndarray:
    """int64 [n]: the task class of each image from its taxonomy label (a node_id); NOT_IN_TASK where none applies
    (a label outside every class of the task, or not a taxonomy node)."""
    return task_class_of_labels(list(tax.node_ids), node_task_class(tax, task), labels)


def task_class_of_labels(node_ids: list[str], node_class: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """int64 [n]: ``node_class`` [len(node_ids)] (a node's task class or NOT_IN_TASK) looked up for each label;
    NOT_IN_TASK for a label that is not a node. (What a Ray task needs of the taxonomy: ids and one array.)"""
    idx = pd.Series(np.arange(len(node_ids)), index=node_ids).reindex(labels).to_numpy()
    out = np.full(len(labels), NOT_IN_TASK, dtype=np.int64)
    known = ~np.isnan(idx)
    out[known] = node_class[idx[known].astype(np.int64)]
    return out


def probs_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<float> column of per-image probabilities -> float64 [n, C]; rows of unequal length or nulls are a
    UserError naming the first bad row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 0))
    lengths = np.asarray(pc.list_value_length(arr).fill_null(-1))
    if (lengths != lengths[0]).any() or lengths[0] < 0:
        bad = int(np.flatnonzero(lengths != lengths[0])[0]) if (lengths != lengths[0]).any() else 0
        raise UserError(f"predictions: 'probs' has rows of different lengths (row {bad} has {lengths[bad]}, "
                        f"row 0 has {lengths[0]}) or nulls")
    return np.asarray(arr.flatten(), dtype=np.float64).reshape(len(arr), int(lengths[0]))
