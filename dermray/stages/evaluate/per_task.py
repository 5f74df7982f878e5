"""The metrics of one task on each subset: binary (AUC, sensitivity and specificity at the locked and configured
thresholds, the readers' comparison, DeLong against another run) and multiclass (accuracy, balanced accuracy,
per-class recall), each with its lesion-bootstrap interval, into long-form tables."""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd

from dermray.core import metrics as M
from dermray.core.evaluation_tasks import Task
from dermray.core.inference import (
    NOT_IN_TASK,
    binary_task_score,
    membership_matrix,
    not_estimable,
    truth_for_task,
)
from dermray.errors import UserError
from dermray.runtime.config import EvaluateConfig
from dermray.stages.evaluate.inputs import EvalInputs
from dermray.stages.evaluate.tables import At, Tables


@dataclass(frozen=True)
class BinaryScores:
    """A binary task's images in one subset, arrays [n]: truth (1 = the positive class), the score (calibrated
    P(positive | task)), lesion groups, image ids, and the score before the temperature (None without one)."""
    y: np.ndarray
    score: np.ndarray
    groups: np.ndarray
    image_ids: np.ndarray
    score_raw: np.ndarray | None = None


def rates_with_ci(at: At, label: str, data: BinaryScores, threshold: float, cfg: EvaluateConfig) -> None:
    """Sensitivity, specificity, PPV and NPV when calling ``score >= threshold`` positive, each with its
    lesion-bootstrap CI (a rate is a mean over its denominator's images, resampled by lesion)."""
    y, groups = data.y, data.groups
    called = data.score >= threshold
    n = len(y)
    at.add(f"threshold@{label}", threshold, n)
    for metric, among, hit in (("sensitivity", y == 1, called), ("specificity", y == 0, ~called),
                               ("ppv", called, y == 1), ("npv", ~called, y == 0)):
        if not among.any():
            at.add(f"{metric}@{label}", None, 0,
                   note=f"undefined: no {'called ' if metric in ('ppv', 'npv') else ''}images in its denominator")
            continue
        values = hit[among].astype(float)
        lo, hi = _bootstrap_mean(values, groups[among], cfg)
        at.add(f"{metric}@{label}", values.mean(), int(among.sum()), lo, hi)


def subset_seed(seed: int, subset: str) -> int:
    """The bootstrap seed of a subset: the configured one for "all", one of its own (stable across runs) for each
    other subset, so that two subgroups' resamples are independent draws (the subgroup gap compares them)."""
    return seed if subset == "all" else (seed + zlib.crc32(subset.encode())) % 2**32


def evaluate_binary(at: At, data: BinaryScores, cfg: EvaluateConfig, readers: pd.DataFrame | None,
                    locked: Sequence[tuple[str, float]] = ()) -> None:
    """AUC with its CI, the ROC, rates at the fixed thresholds, at the model's locked operating points (chosen
    out of fold, with CIs) and at thresholds chosen on these data themselves (marked oracle: optimistic),
    calibration (before and after the model's temperature) and the readers."""
    y, score, groups, t, subset = data.y, data.score, data.groups, at.tables, at.subset
    n, n_pos = len(y), int(y.sum())
    at.add("n_positive", n_pos, n)
    at.add("n_negative", n - n_pos, n)
    if n_pos == 0 or n_pos == n:
        why = f"undefined: no {'positives' if n_pos == 0 else 'negatives'} in this subset"
        for name in ("auc", "sensitivity@0.5", "specificity@0.5"):
            at.add(name, None, n, note=why)
        return
    alpha = 1 - cfg.ci_level
    boot = M.bootstrap_auc(y, score, groups, n_boot=cfg.n_bootstrap, seed=subset_seed(cfg.seed, subset), alpha=alpha)
    at.add("auc", boot.estimate, n, boot.ci_low, boot.ci_high)
    at.add("n_groups", boot.n_groups, n)
    fpr, tpr, thr = M.roc_curve(y, score)
    for f, tp_, th in zip(*M.thin_curve(fpr, tpr, thr)):
        t.roc.append(at.keys() | {"threshold": float(th), "fpr": float(f), "tpr": float(tp_)})
    for name, thr in locked:
        rates_with_ci(at, f"locked:{name}", data, thr, cfg)
    named = [(f"{x:g}", float(x)) for x in cfg.thresholds]
    named.append(("oracle:youden", M.youden_threshold(y, score)))
    named.append((f"oracle:sens{cfg.target_sensitivity:g}",
                  M.threshold_for_sensitivity(y, score, cfg.target_sensitivity)))
    for name, thr_value in named:
        r = M.rates_at(y, score, thr_value)
        if not name[0].isdigit():
            at.add(f"threshold@{name}", thr_value, n)
        for metric in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
            at.add(f"{metric}@{name}", getattr(r, metric), n)
    ece, curve = M.reliability(y, score, cfg.calibration_bins)
    at.add("ece", ece, n)
    if data.score_raw is not None and np.isfinite(data.score_raw).all():
        at.add("ece_uncalibrated", M.reliability(y, data.score_raw, cfg.calibration_bins)[0], n)
    for row in curve:
        t.calibration.append(at.keys() | row)
    points = []
    if readers is not None and len(readers):
        points = reader_points(at, data, readers, cfg)
    t.curves[(at.task, subset)] = {"fpr": fpr, "tpr": tpr, "auc": boot.estimate, "ci": (boot.ci_low, boot.ci_high),
                                   "readers": points, "n_pos": n_pos, "n_neg": n - n_pos,
                                   "calibration": curve, "replicates": boot.replicates, "n": n,
                                   "locked": [(name, r.sensitivity, r.specificity) for name, r in
                                              sorted(((nm, M.rates_at(y, score, thr)) for nm, thr in locked),
                                                     key=lambda x: (not x[0].startswith("sens"), x[0]))]}


def subgroup_verdict(t: Tables, run_id: str, task: Task, subset_names: list[str], cfg: EvaluateConfig) -> None:
    """Per subgroup column (modality, each of evaluate.subgroups): the worst group's AUC (the note names the group)
    and the largest gap between two groups' AUCs: the best minus the worst group, with the interval of that
    difference over the groups' bootstrap replicates (each group's lesions resampled apart, with resamples of its
    own), simultaneous over every pair of groups (metrics.auc_gap): it contains 0 at its stated rate when no group
    differs."""
    by_column: dict[str, list[str]] = {}
    for name in subset_names:
        if "=" in name:
            by_column.setdefault(name.split("=", 1)[0], []).append(name)
    alpha = 1 - cfg.ci_level
    for column, names in by_column.items():
        groups = [(n, t.curves[(task.name, n)]) for n in names if (task.name, n) in t.curves
                  and "auc" in t.curves[(task.name, n)] and np.isfinite(t.curves[(task.name, n)]["auc"])]
        if len(groups) < 2:
            continue
        aucs = np.array([c["auc"] for _, c in groups])
        worst = int(np.argmin(aucs))
        n = sum(c["n"] for _, c in groups)
        lo_w, hi_w = groups[worst][1]["ci"]
        by = At(t, run_id, task.name, f"by:{column}")
        by.add("worst_group_auc", aucs[worst], n, lo_w, hi_w, note=f"worst group: {groups[worst][0]}")
        gap = M.auc_gap(aucs, np.stack([c["replicates"] for _, c in groups]), alpha)  # [groups, n_boot]
        pairs = len(groups) * (len(groups) - 1) // 2
        level = f"; interval simultaneous over the {pairs} pairs of groups" if pairs > 1 else ""
        by.add("auc_gap", gap.gap, n, gap.ci_low, gap.ci_high,
               note=f"{groups[gap.best][0]} minus {groups[gap.worst][0]}{level}")


def carry_over_verdict(t: Tables, run_id: str, task: Task, subset_names: list[str], scored: dict,
                       cfg: EvaluateConfig) -> None:
    """Per locked operating point, on all images and on the biopsy-proven ones: what it gave out of fold beside
    what it gives here (``sensitivity_oof@locked:<point>``, ``specificity_oof@...`` with their Wilson intervals),
    and ``carries_over@locked:<point>`` = 1 or 0, 0 with the reason when a test rate lies outside its out-of-fold
    interval or below ``evaluate.rate_floor`` (metrics.carries_over)."""
    by = {(r["subset"], r["metric"]): r for r in t.metrics if r["task"] == task.name}
    alpha = 1 - cfg.ci_level
    for pt in [p for p in scored.get("operating_points", []) if p.get("task") == task.name]:
        for subset in [s for s in ("all", "biopsy") if s in subset_names]:
            at, label = At(t, run_id, task.name, subset), f"locked:{pt['name']}"
            verdicts, reasons = [], []
            for rate, among in (("sensitivity", "n_positive"), ("specificity", "n_negative")):
                test = by.get((subset, f"{rate}@{label}"), {}).get("value")
                ok, why, (lo, hi) = M.carries_over(rate, test, pt.get(rate), pt.get(among), cfg.rate_floor, alpha)
                at.add(f"{rate}_oof@{label}", pt.get(rate), pt.get(among) or 0, lo, hi,
                       note=f"out of fold ({pt.get('chosen_on', 'out_of_fold')})")
                verdicts.append(ok)
                if ok is False:
                    reasons.append(why)
            if None in verdicts:
                continue
            n = int(by.get((subset, "n_positive"), {}).get("n") or 0)
            at.add(f"carries_over@{label}", float(all(verdicts)), n,
                   note=("does not carry over: " + "; ".join(reasons)) if reasons else
                   "its test sensitivity and specificity lie within their out-of-fold intervals")


def reader_points(at: At, data: BinaryScores, readers: pd.DataFrame, cfg: EvaluateConfig
                  ) -> list[tuple[str, float, float]]:
    """Each reader's sensitivity/specificity on the images of this task and subset that the reader read; then
    the readers' mean point and the model at it (the paper's comparison), with lesion-bootstrap intervals."""
    y, score = data.y, data.score
    r = readers[readers["task"] == at.task]
    if r.empty:
        return []
    truth = pd.Series(y, index=data.image_ids)
    pts = []
    for reader_id, rr in r.groupby("reader_id", sort=True):
        rr = rr[rr["image_id"].isin(truth.index)]
        if rr.empty:
            continue
        if "decision" in rr.columns and rr["decision"].notna().all():
            called = rr["decision"].astype(int).to_numpy()
        elif "score" in rr.columns and rr["score"].notna().all():
            called = (rr["score"].to_numpy() >= 0.5).astype(int)
        else:
            raise UserError(f"readers: reader {reader_id!r} on task {at.task!r} has rows with neither decision "
                            "nor score")
        yy = truth.loc[rr["image_id"]].to_numpy()
        rates = M.rates_at(yy, called.astype(float), 0.5)
        model = M.sensitivity_at_specificity(y, score, rates.specificity) if not math.isnan(
            rates.specificity) else float("nan")
        below = None if math.isnan(rates.sensitivity) or math.isnan(model) else bool(rates.sensitivity < model - 1e-12)
        at.tables.readers.append(at.keys() | {
            "reader_id": str(reader_id), "n": len(rr), "sensitivity": rates.sensitivity,
            "specificity": rates.specificity, "model_sensitivity_at_specificity": model, "below_model_curve": below})
        pts.append((str(reader_id), rates.sensitivity, rates.specificity))
    if pts:
        summary = M.reader_comparison(y, score, pts)
        n = len(y)
        at.add("readers_n", summary["n_readers"], n)
        at.add("readers_mean_sensitivity", summary["mean_sensitivity"], n)
        at.add("readers_mean_specificity", summary["mean_specificity"], n)
        at.add("readers_below_model_curve", summary["below_curve"], n,
               note=f"{summary['below_curve']} of {summary['n_readers']} readers lie below the model's ROC curve")
        at_mean = M.rates_at_readers_point(y, score, data.groups, summary["mean_sensitivity"],
                                           summary["mean_specificity"], cfg.n_bootstrap,
                                           seed=subset_seed(cfg.seed, at.subset), alpha=1 - cfg.ci_level)
        value, lo, hi = at_mean["sensitivity_at_readers_specificity"]
        at.add("model_sensitivity_at_readers_mean_specificity", value, n, lo, hi)
        value, lo, hi = at_mean["specificity_at_readers_sensitivity"]
        at.add("model_specificity_at_readers_mean_sensitivity", value, n, lo, hi)
    return pts


def evaluate_multiclass(at: At, task: Task, y: np.ndarray, probs: np.ndarray, groups: np.ndarray,
                        cfg: EvaluateConfig) -> None:
    """Accuracy (with its lesion-bootstrap CI), balanced accuracy, per-class rates, the confusion matrix and the
    top class's calibration of a task of several classes: ``y`` int [n] task-class indices, ``probs`` [n, classes]."""
    t = at.tables
    n = len(y)
    if n == 0:
        at.add("accuracy", None, 0, note="undefined: no images of this task")
        return
    s = M.multiclass_summary(y, probs)
    correct = (M.predicted_class(probs) == y).astype(float)
    lo, hi = _bootstrap_mean(correct, groups, cfg)
    at.add("accuracy", s["accuracy"], n, lo, hi)
    at.add("balanced_accuracy", s["balanced_accuracy"], n)
    at.add("undecided", s["undecided"], n)
    for k, name in enumerate(task.class_names):
        pc = s["per_class"][k]
        for metric in ("sensitivity", "specificity"):
            value = pc[metric]
            which = "images" if metric == "sensitivity" else "other images"
            note = None if not math.isnan(value) else f"undefined: no {which} of class {name}"
            at.add(f"{metric}@0.5[{name}]", value, pc["n"] if metric == "sensitivity" else n - pc["n"], note=note)
    cm = s["confusion"]
    names = task.class_names + ["undecided"]
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            t.confusion.append(at.keys() | {"true_class": names[i], "predicted_class": names[j], "n": int(cm[i, j])})
    conf = probs.max(axis=1)
    ece, curve = M.reliability(correct, conf, cfg.calibration_bins)
    at.add("ece_top_class", ece, n)
    t.curves[(at.task, at.subset)] = {"confusion": cm, "names": names, "accuracy": s["accuracy"]}


def _bootstrap_mean(values: np.ndarray, groups: np.ndarray, cfg: EvaluateConfig) -> tuple[float, float]:
    """Group-bootstrap CI of a mean (accuracy): per-group sums and sizes against batches of resample weights."""
    _, g = np.unique(groups, return_inverse=True)
    n_groups = int(g.max()) + 1
    sums = np.bincount(g, weights=values, minlength=n_groups)
    sizes = np.bincount(g, minlength=n_groups).astype(float)
    reps = np.concatenate([(sums @ w) / np.maximum(sizes @ w, 1)
                           for w in M.resample_weight_batches(n_groups, cfg.n_bootstrap, cfg.seed)])
    alpha = 1 - cfg.ci_level
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class EvalData:
    """The predictions evaluated (one row per image, ``attrs["probs"]`` [n, classes]) and what every task reads
    beside them: lesion groups [n], the subsets as (name, bool mask [n]), the readers' table and the compared run's
    predictions (None without them)."""
    df: pd.DataFrame
    groups: np.ndarray
    subset_masks: list[tuple[str, np.ndarray]]
    readers: pd.DataFrame | None
    compare: pd.DataFrame | None


@dataclass(frozen=True)
class TaskTruth:
    """A binary task over the whole test set, arrays [n]: each image's task class (NOT_IN_TASK outside the task),
    the positive class's index, the score, and which images are evaluated (in the task, with a defined score)."""
    y_task: np.ndarray
    pos: int
    score: np.ndarray
    use: np.ndarray


def evaluate_task(t: Tables, run_id: str, task: Task, test: EvalData, inp: EvalInputs,
                  ecfg: EvaluateConfig) -> tuple[dict, np.ndarray]:
    """Every subset's metrics of one task; returns how many images the task left out and why, and which images
    it evaluated."""
    df, groups, subset_masks = test.df, test.groups, test.subset_masks
    probs, labels = df.attrs["probs"], df["label"].to_numpy()
    y_task = truth_for_task(inp.tax, task, labels)
    matrix = membership_matrix(inp.membership, task, probs.shape[1])
    tprobs = probs @ matrix  # task_probabilities, with the matrix the binary score uses too
    in_task = y_task != NOT_IN_TASK
    # a binary task's positive class is always set (parse_tasks); pos and score are None exactly when it is not binary
    pos = task.class_names.index(cast(str, task.positive)) if task.is_binary else None
    why = not_estimable(matrix, task) if pos is not None else None
    if why:  # its score would be 0 by construction: null with the reason in every subset, nothing else
        for subset_name, mask in subset_masks:
            At(t, run_id, task.name, subset_name).add("auc", None, int((in_task & mask).sum()), note=why)
        return {"not_in_task": int((~in_task).sum()), "undefined_score": 0}, np.zeros(len(df), bool)
    score = binary_task_score(probs, matrix, pos) if pos is not None else None
    raw = df.attrs.get("probs_raw")
    score_raw = binary_task_score(raw, matrix, pos) if (pos is not None and raw is not None) else None
    locked = inp.locked.get(task.name, [])
    nan_scores = in_task & np.isnan(score) if score is not None else np.zeros(len(df), bool)
    use = in_task & ~nan_scores
    image_ids = df["image_id"].to_numpy()
    for subset_name, mask in subset_masks:
        m, at = use & mask, At(t, run_id, task.name, subset_name)
        if task.is_binary:
            assert score is not None  # every binary task has one
            data = BinaryScores((y_task[m] == pos).astype(int), score[m], groups[m], image_ids[m],
                                None if score_raw is None else score_raw[m])
            evaluate_binary(at, data, ecfg, test.readers, locked)
        else:
            evaluate_multiclass(at, task, y_task[m], tprobs[m], groups[m], ecfg)
    if task.is_binary:
        subgroup_verdict(t, run_id, task, [n for n, _ in subset_masks], ecfg)
        carry_over_verdict(t, run_id, task, [n for n, _ in subset_masks], inp.scored, ecfg)
    if task.is_binary and nan_scores.any():
        At(t, run_id, task.name, "all").add(
            "excluded_undefined_score", int(nan_scores.sum()), int(in_task.sum()),
            note="P(pos) + P(neg) is 0: the model gives these images no probability in either class")
    if test.compare is not None and score is not None and pos is not None:  # a binary task
        delong_rows(At(t, run_id, task.name, "all"), task, test, TaskTruth(y_task, pos, score, use), ecfg)
    return {"not_in_task": int((~in_task).sum()), "undefined_score": int(nan_scores.sum())}, use


def delong_rows(at: At, task: Task, test: EvalData, truth: TaskTruth, ecfg: EvaluateConfig) -> None:
    """The paired comparison with another run's predictions (``test.compare``, scored with that run's own class
    membership) on the images both scored: the AUC difference with its ``ci_level`` interval and p-value, lesions
    (groups) as clusters (Obuchowski 1997)."""
    compare, df, groups, pos = test.compare, test.df, test.groups, truth.pos
    assert compare is not None  # evaluate_task calls this only with a compared run
    other = compare.set_index("image_id")
    common = df["image_id"].isin(other.index).to_numpy() & truth.use
    if common.sum() < 4:
        at.add("delong_p_value", None, int(common.sum()),
               note="undefined: fewer than 4 images in common with the compared run")
        return
    order = other.index.get_indexer(df["image_id"].to_numpy()[common])
    other_probs = compare.attrs["probs"]
    matrix = membership_matrix(compare.attrs["membership"], task, other_probs.shape[1])
    other_score = binary_task_score(other_probs, matrix, pos)[order]
    y = (truth.y_task[common] == pos).astype(int)
    ok = ~np.isnan(other_score)
    r = M.delong_test(y[ok], truth.score[common][ok], other_score[ok], groups=groups[common][ok],
                      ci_level=ecfg.ci_level)
    n = int(ok.sum())
    at.add("delong_auc_diff", r["diff"], n, r["ci_low"], r["ci_high"])
    at.add("delong_p_value", r["p_value"], n)
    at.add("delong_clusters", r["clusters"], n)
