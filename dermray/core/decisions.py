"""The decisions a model ships with, chosen on out-of-fold predictions (never on a test set): one calibration
temperature and, per binary task, locked operating points. Pure numpy: the training stage feeds it the
cross-validation folds' held-out predictions and writes the result into every fold's model card; scoring applies
it; evaluation measures it on the test set, where it was not chosen.

Order: the temperature is fitted first (on the training classes), then the thresholds are chosen on the binary
scores of the *calibrated* probabilities - the scores that scoring writes - so a locked threshold means the same
number at training and at scoring time.
"""
from __future__ import annotations

import numpy as np

from dermray.core import metrics as M
from dermray.core.inference import binary_task_score


def lock(probs: np.ndarray, classes: np.ndarray, task_truth: np.ndarray | None, binary_tasks: list[tuple],
         target_sensitivity: float, specificities: dict[str, dict[str, float]] | None = None,
         fit_temperature: bool = True) -> tuple[dict, list[dict]]:
    """(calibration, operating points) from out-of-fold predictions.

    ``probs`` [n, C] training-class probabilities; ``classes`` [n] their true training class; ``task_truth``
    [n, n_tasks] task classes (-1 outside a task) in the order of the tasks YAML; ``binary_tasks``: (name, column in
    task_truth, positive class index, membership matrix [C, 2]); ``specificities``: task -> {point name: target
    specificity} (e.g. the readers' mean). Operating points are chosen per task on the images inside it.
    ``fit_temperature=False``: ``probs`` are calibrated already (temperature 1 here)."""
    temperature, before, after = M.fit_temperature(probs, classes) if fit_temperature else (1.0, None, None)
    calibration = {"method": "temperature", "temperature": temperature, "n": int(len(classes)),
                   "nll_before": before, "nll_after": after}
    calibrated = M.apply_temperature(probs, temperature)
    points = []
    for name, y, score, _ in binary_outcomes(calibrated, task_truth, binary_tasks):
        for p in M.operating_points(y, score, target_sensitivity, (specificities or {}).get(name)):
            points.append({"task": name, **p})
    return calibration, points


def binary_outcomes(calibrated: np.ndarray, task_truth: np.ndarray | None, binary_tasks: list[tuple]):
    """Per binary task with positives and negatives: (name, y [m] 0/1, binary score [m], inside [n] the images it
    covers) on the images inside the task whose score is defined (NaN: not estimable). A task without positives
    or negatives is left out: nothing to choose a threshold on or to measure."""
    for name, column, pos, matrix in binary_tasks:
        assert task_truth is not None  # binary tasks come with their truth
        truth = task_truth[:, column]
        score = binary_task_score(calibrated, matrix, pos)
        inside = (truth >= 0) & np.isfinite(score)
        y = (truth[inside] == pos).astype(int)
        if 0 < y.sum() < len(y):
            yield name, y, score[inside], inside


def readers_specificity(readers, truth_by_task: dict) -> dict[str, dict[str, float]]:
    """task -> {"readers_specificity": the readers' mean specificity} from the readers' own decisions on images
    whose truth is known (no model output involved). ``readers``: DataFrame reader_id, image_id, task, decision or
    score (>= 0.5 is a positive call); ``truth_by_task``: task -> pandas Series image_id -> 0/1."""
    out = {}
    for task, truth in truth_by_task.items():
        r = readers[(readers["task"] == task) & readers["image_id"].isin(truth.index)]
        if r.empty:
            continue
        called = (r["decision"] if "decision" in r and r["decision"].notna().all() else r["score"] >= 0.5)
        negative = truth.loc[r["image_id"]].to_numpy() == 0
        specs = r.assign(spec=1 - called.astype(float))[negative].groupby("reader_id")["spec"].mean()
        if len(specs):
            out[task] = {"readers_specificity": float(specs.mean())}
    return out


def task_aucs(calibrated: np.ndarray, task_truth: np.ndarray | None, binary_tasks: list[tuple],
              groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per binary task, the AUC of the scores scoring writes (``calibrated`` [n, C] probabilities) on the images
    inside the task, with its lesion-bootstrap 95 % interval (``groups`` [n]: the resampling unit):
    [{"task", "auc", "ci_low", "ci_high", "n", "n_positive"}]. A task without positives or negatives is left out.
    ``task_truth`` and ``binary_tasks`` as for ``lock``."""
    out = []
    for name, y, score, inside in binary_outcomes(calibrated, task_truth, binary_tasks):
        b = M.bootstrap_auc(y, score, None if groups is None else groups[inside], n_boot=n_boot, seed=seed)
        out.append({"task": name, "auc": b.estimate, "ci_low": b.ci_low, "ci_high": b.ci_high, "n": int(len(y)),
                    "n_positive": int(y.sum())})
    return out
