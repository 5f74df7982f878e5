"""Which images are explained (pure): the top and bottom of each task, the misclassified ones or listed ids, and
the target matrix that turns training-class outputs into each task's target."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dermray.core.inference import binary_task_score, membership_matrix, task_probabilities, truth_for_task
from dermray.errors import UserError
from dermray.runtime.config import SaliencyConfig
from dermray.stages.saliency.shared import TRAINING_CLASS


def targets_matrix(n_classes: int, tasks, membership: pd.DataFrame) -> tuple[np.ndarray, dict]:
    """[n_classes, n_classes + sum of task classes]: the identity (training classes) then each task's membership;
    and the column offset of each task (TRAINING_CLASS -> 0)."""
    blocks, offsets, col = [np.eye(n_classes)], {TRAINING_CLASS: 0}, n_classes
    for task in tasks:
        offsets[task.name] = col
        blocks.append(membership_matrix(membership, task, n_classes))
        col += len(task.classes)
    return np.concatenate(blocks, axis=1).astype(np.float32), offsets


def select_images(df: pd.DataFrame, probs: np.ndarray, tasks, membership: pd.DataFrame, tax, sc: SaliencyConfig
                  ) -> pd.DataFrame:
    """One row per (image, task) to explain: image_id, uri, label, task, true_class, score, target, target_col
    (column within the task, or the training class with target=training_class), reason."""
    rows = []
    for task in tasks:
        tp = task_probabilities(probs, membership, task)
        truth = truth_for_task(tax, task, df["label"].to_numpy())
        if task.is_binary:
            pos = task.class_names.index(task.positive)
            # NaN when not estimable (a class no training class lies under): nothing of this task is selected
            score = binary_task_score(probs, membership_matrix(membership, task, probs.shape[1]), pos)
            predicted = np.where(score >= 0.5, pos, 1 - pos)
        else:
            score = tp.max(axis=1)
            predicted = tp.argmax(axis=1)
        ok = (truth >= 0) & np.isfinite(score)
        idx = np.flatnonzero(ok)
        if sc.select == "top_bottom":
            order = idx[np.argsort(-score[idx], kind="stable")]
            picks = [(i, "top") for i in order[:sc.k]] + [(i, "bottom") for i in order[::-1][:sc.k]]
        elif sc.select == "misclassified":
            wrong = idx[predicted[idx] != truth[idx]]
            confidence = np.abs(score[wrong] - 0.5) if task.is_binary else score[wrong]
            picks = [(i, "misclassified") for i in wrong[np.argsort(-confidence, kind="stable")][:sc.k]]
        else:  # ids
            wanted = set(sc.image_ids)
            picks = [(i, "listed") for i in idx if df["image_id"].iloc[i] in wanted]
        seen = set()
        for i, reason in picks:
            if i in seen:
                continue
            seen.add(i)
            if sc.target == "positive" and task.is_binary:
                target, col = task.positive, task.class_names.index(task.positive)
            elif sc.target in ("positive", "predicted"):
                target, col = task.class_names[int(predicted[i])], int(predicted[i])
            else:  # training_class
                col = int(probs[i].argmax())
                target = f"training class {col}"
            rows.append({"image_id": df["image_id"].iloc[i], "uri": df["uri"].iloc[i], "label": df["label"].iloc[i],
                         "task": task.name, "true_class": task.class_names[int(truth[i])],
                         "score": float(score[i]), "target": target, "target_col": col, "reason": reason})
    if sc.select == "ids":
        found = {r["image_id"] for r in rows}
        missing = [i for i in sc.image_ids if i not in found]
        if missing:
            raise UserError(f"saliency.image_ids not in the predictions (or in no selected task): {missing[:5]}")
    return pd.DataFrame(rows, columns=["image_id", "uri", "label", "task", "true_class", "score", "target",
                                       "target_col", "reason"])
