"""Evaluation stage: predictions -> the paper's results, as long-form tables for analysts, plots and a report.

For each task (tasks YAML) and subset (all, biopsy-proven, each modality, each value of the configured subgroup
columns) the stage derives the ground truth from each image's taxonomy label and the model's task-class
probabilities from the training-class probabilities (the paper's inference algorithm, ``dermray/core/inference.py``,
through the partition stage's task_membership table). Binary tasks score P(pos) / (P(pos) + P(neg)).

Outputs under ``<output>/metrics/<run_id>/``: metrics.parquet (long form), roc.parquet, confusion.parquet,
readers.parquet, calibration.parquet, plots/*.png, report.html (self-contained), report.md and
evaluate_summary.json (with the lineage: which predictions, model and partition the numbers come from).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd
import pyarrow as pa

from dermray.core import metrics as M
from dermray.core.formatting import duration, flagged_points, fmt, strict_json
from dermray.core.ids import lesion_keys
from dermray.core.inference import (
    NOT_IN_TASK,
    binary_task_score,
    membership_matrix,
    node_task_class,
    not_estimable,
    probs_matrix,
    task_class_of_labels,
    truth_for_task,
)
from dermray.core.report import render_plots, render_report
from dermray.core.tasks import Task
from dermray.core.taxonomy import Taxonomy
from dermray.errors import UserError
from dermray.runtime import layout, progress, registry
from dermray.runtime.config import EvaluateConfig, RunConfig
from dermray.store import lineage, schemas, storage
from dermray.store.definitions import load_tasks, load_taxonomy
from dermray.store.predictions import declared_columns, load_predictions

log = logging.getLogger("dermray.evaluate")
STAGE = "evaluate"


# ---- inputs ------------------------------------------------------------------------------------------------------
def score_summary_of(predictions: str) -> dict:
    """The summary of the score run that wrote ``predictions`` (beside its predictions folder), or {}."""
    pred = predictions.rstrip("/")
    for candidate in (storage.join(storage.parent(pred), layout.SUMMARY_FILES["score"]),
                      storage.join(pred, layout.SUMMARY_FILES["score"])):
        if storage.exists(candidate):
            return json.loads(storage.read_text(candidate))
    return {}


def default_partition(cfg: RunConfig, scored: dict) -> str:
    """evaluate.partition, else the partition the predictions' score run recorded, else this run's."""
    return cfg.evaluate.partition or scored.get("partition") or layout.partition_dir(cfg.output, cfg.run_id)


def locked_points(scored: dict) -> dict:
    """The operating points locked in the scoring model's card (out of fold), per binary task."""
    out: dict = {}
    for pt in scored.get("operating_points", []):
        out.setdefault(pt["task"], []).append((pt["name"], float(pt["threshold"])))
    return out


# ---- subsets -----------------------------------------------------------------------------------------------------
def lesions(df: pd.DataFrame) -> np.ndarray:
    """Each prediction's lesion key, [n] (the lesion bootstrap's and the clustered DeLong's clusters): the shared
    rule of ``ids.lesion_keys`` - a null, empty or blank group_id is the image alone."""
    groups = df["group_id"] if "group_id" in df.columns else None
    return lesion_keys(df["image_id"].astype(str), groups).to_numpy(zero_copy_only=False)


def subsets(df: pd.DataFrame, subgroup_specs: list[str]) -> list[tuple[str, np.ndarray]]:
    """(name, boolean mask) for: all, biopsy-proven, each modality, each value of each subgroup column."""
    out = [("all", np.ones(len(df), dtype=bool))]
    if "label_source" in df.columns:
        out.append(("biopsy", (df["label_source"] == "biopsy").to_numpy()))
    for column in ("modality", "source"):  # several sources in one set: each its own subset
        if column in df.columns and df[column].nunique() > (0 if column == "modality" else 1):
            for value in sorted(df[column].dropna().astype(str).unique()):
                out.append((f"{column}={value}", (df[column].astype(str) == value).to_numpy()))
    for spec in subgroup_specs:
        column, _, edges = spec.partition(":")
        if column not in df.columns:
            raise UserError(f"evaluate.subgroups: column {column!r} is not in the predictions "
                            f"(has: {', '.join(df.columns)})")
        values = df[column]
        if edges:
            try:
                cuts = [float(e) for e in edges.split("/")]
            except ValueError:
                raise UserError(f"evaluate.subgroups: {spec!r}: bin edges must be numbers separated by '/'") from None
            numeric = pd.to_numeric(values, errors="coerce")
            binned = pd.cut(numeric, cuts, right=False)
            for interval in binned.cat.categories:
                name = f"{column}=[{interval.left:g},{interval.right:g})"
                out.append((name, (binned == interval).to_numpy()))
        else:
            for value in sorted(values.dropna().astype(str).unique()):
                out.append((f"{column}={value}", (values.astype(str) == value).to_numpy()))
    return out


# ---- per task and subset ------------------------------------------------------------------------------------------
@dataclass
class Tables:
    metrics: list = dataclasses.field(default_factory=list)
    roc: list = dataclasses.field(default_factory=list)
    confusion: list = dataclasses.field(default_factory=list)
    readers: list = dataclasses.field(default_factory=list)
    calibration: list = dataclasses.field(default_factory=list)
    train_overlap: list = dataclasses.field(default_factory=list)
    curves: dict = dataclasses.field(default_factory=dict)  # (task, subset) -> data for plots


@dataclass(frozen=True)
class At:
    """Where a call's rows go: the tables, and the run, evaluation task and subset that all its rows share."""
    tables: Tables
    run_id: str
    task: str
    subset: str

    def keys(self) -> dict:
        return {"run_id": self.run_id, "task": self.task, "subset": self.subset}

    def add(self, metric: str, value, n, lo=None, hi=None, note: str | None = None) -> None:
        """One row of metrics.parquet; a null value (None or NaN) is noted "undefined" unless a note says why."""
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        if value is None and note is None:
            note = "undefined"
        self.tables.metrics.append(self.keys() | {
            "metric": metric, "value": value, "ci_low": None if lo is None or math.isnan(lo) else float(lo),
            "ci_high": None if hi is None or math.isnan(hi) else float(hi), "n": int(n), "note": note})


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


# ---- the stage ----------------------------------------------------------------------------------------------------
def _load_readers(uri: str | None) -> pd.DataFrame | None:
    if not uri:
        return None
    table = storage.read_table_any(uri)
    schemas.check_table(table, schemas.READERS, storage.redact(uri))
    df = table.to_pandas()
    if "decision" not in df.columns and "score" not in df.columns:
        raise UserError(f"{storage.redact(uri)}: readers need a 'decision' (0/1) or a 'score' column")
    if "decision" in df.columns:
        bad = df["decision"].notna() & ~df["decision"].isin([0, 1])
        if bad.any():
            raise UserError(f"{storage.redact(uri)}: column 'decision' must be 0 or 1 "
                            f"(row {int(np.flatnonzero(bad)[0])})")
    return df


@dataclass
class EvalInputs:
    """Everything the numbers are computed from (read before any is computed)."""
    tax: Taxonomy
    tasks: list[Task]
    membership: pd.DataFrame
    partition: str
    fingerprints: dict  # name -> lineage.Fingerprint
    locked: dict  # binary task -> [(operating point name, threshold)] the model card locked
    scored: dict  # the summary of the score run that wrote the predictions ({} when unknown)
    train_hashes: pd.DataFrame | None = None  # the partition's image_hashes (evaluate.train_overlap; None: absent)


def read_definitions(cfg: RunConfig) -> EvalInputs:
    if not cfg.evaluate.predictions:
        raise UserError("no predictions given: set evaluate.predictions (or --predictions)")
    if not cfg.data.tasks or not cfg.data.taxonomy:
        raise UserError("evaluation needs the tasks YAML and the taxonomy: set data.tasks and data.taxonomy")
    tax = load_taxonomy(cfg.data.taxonomy)
    tasks = load_tasks(cfg.data.tasks, tax)
    scored = score_summary_of(cfg.evaluate.predictions)
    partition = default_partition(cfg, scored)
    tm_uri = layout.partition_outputs(partition)["task_membership"]
    table = storage.read_table(tm_uri)
    fps = {"tasks": lineage.file_fingerprint(cfg.data.tasks), "taxonomy": lineage.file_fingerprint(cfg.data.taxonomy),
           "task_membership": lineage.columns_fingerprint(tm_uri, table, table.column_names)}
    locked = locked_points(scored)
    if locked:
        fps["operating_points"] = lineage.value_fingerprint(locked)
    hashes_uri = layout.partition_outputs(partition)["image_hashes"]
    hashes = None
    if cfg.evaluate.train_overlap and storage.exists(hashes_uri):
        hashes_table = storage.read_table(hashes_uri)
        fps["image_hashes"] = lineage.columns_fingerprint(hashes_uri, hashes_table, hashes_table.column_names)
        hashes = hashes_table.to_pandas()
    return EvalInputs(tax, tasks, table.to_pandas(), partition, fps, locked, scored, hashes)


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


# ---- test images that are copies of training images ----------------------------------------------------------------
@dataclass(frozen=True)
class Overlap:
    """Test images found to be near-duplicates of training images, and the pairs that say so (train_overlap rows);
    ``not_checked`` says why nothing was looked for (None when it was)."""
    images: frozenset
    pairs: list
    unreadable: int = 0
    not_checked: str | None = None

    def summary(self) -> dict:
        return {"checked": self.not_checked is None, "test_images": len(self.images), "pairs": len(self.pairs),
                "unreadable_test_images": self.unreadable, "not_checked": self.not_checked}


def overlap_thresholds(partition: str) -> tuple[int, float]:
    """The Hamming bound and the pixel similarity the partition grouped near-duplicates with (its recorded
    config), so that the test set is checked the way the folds were."""
    from dermray.runtime.config import PartitionConfig

    defaults = PartitionConfig()
    hamming, similarity = defaults.near_duplicate_hamming, defaults.near_duplicate_similarity
    summary_uri = layout.partition_outputs(partition)["summary"]
    if storage.exists(summary_uri):
        recorded = json.loads(storage.read_text(summary_uri)).get("lineage", {}).get("config", {})
        hamming = int(recorded.get("near_duplicate_hamming", hamming))
        similarity = float(recorded.get("near_duplicate_similarity", similarity))
    return hamming, similarity


def train_overlap(df: pd.DataFrame, inp: EvalInputs, ecfg: EvaluateConfig) -> Overlap:
    """The test images (``df``'s ``uri``) that are copies of the partition's training images: equal bytes, or a
    view hash within the partition's Hamming bound of the other's whole-image hash, confirmed by aligned pixel
    correlation at its similarity (neardup: the method the folds were grouped with)."""
    from concurrent.futures import ThreadPoolExecutor

    from dermray.core import neardup
    from dermray.core.transforms import ImageDecodeError

    if not ecfg.train_overlap:
        return Overlap(frozenset(), [], not_checked="evaluate.train_overlap is off")
    if inp.train_hashes is None or inp.train_hashes.empty:
        return Overlap(frozenset(), [], not_checked=(
            f"{storage.redact(inp.partition)} holds no image hashes (a partition run with near_duplicates off, or "
            "by an older dermray)"))
    if "uri" not in df.columns or df["uri"].isna().all():
        return Overlap(frozenset(), [], not_checked="the predictions have no uri column to read the test images by")
    hamming, similarity = overlap_thresholds(inp.partition)

    def describe(uri):
        if not isinstance(uri, str) or not uri:
            return None
        try:
            return neardup.describe(storage.read_bytes(uri))
        except (UserError, ImageDecodeError):
            return None

    ids, uris = df["image_id"].to_numpy(), df["uri"].to_numpy()
    with ThreadPoolExecutor(8) as pool:  # reads (S3 or disk) and decodes overlap; PIL releases the GIL
        described = list(pool.map(describe, uris))
    ok = np.array([d is not None for d in described], bool)
    test_sha = np.array([d[0] for d in described if d is not None], dtype=object)
    test_hashes = np.stack([d[1] for d in described if d is not None]) if ok.any() else np.zeros((0, 3), np.uint64)
    test_ids, test_uris = ids[ok], uris[ok]
    train = inp.train_hashes
    train_hashes = np.array(train["phash"].tolist(), dtype=np.uint64).reshape(-1, 3)
    pairs: dict[tuple[int, int], tuple[int, float, bool]] = {}
    by_sha = pd.Series(np.arange(len(train)), index=train["sha256"].to_numpy())
    for j, sha in enumerate(test_sha):
        if sha in by_sha.index:
            pairs[(int(np.atleast_1d(by_sha[sha])[0]), j)] = (0, 1.0, True)
    cand = [(int(i), int(j), int(d)) for i, j, d in neardup.cross_candidates(train_hashes, test_hashes, hamming)
            if (int(i), int(j)) not in pairs]
    # NaN (an image gone since the partition) is below the threshold: not a pair
    sims = neardup.similarities(train["uri"].to_numpy()[[i for i, _, _ in cand]], test_uris[[j for _, j, _ in cand]],
                                storage.read_bytes)
    for (i, j, d), sim in zip(cand, sims):
        if sim >= similarity:
            pairs[(i, j)] = (d, float(sim), False)
    rows = [{"test_image": str(test_ids[j]), "train_image": str(train["image_id"].iloc[i]), "hamming": h,
             "similarity": sim, "exact": exact}
            for (i, j), (h, sim, exact) in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return Overlap(frozenset(r["test_image"] for r in rows), rows, int((~ok).sum()))


def predictions_columns(ecfg: EvaluateConfig) -> tuple[str, ...]:
    """The prediction columns beyond ``USED_COLUMNS`` that the evaluation reads: the source, the subgroup columns,
    the cohort column and (evaluate.train_overlap) the image URIs. Only these are loaded, and the predictions'
    fingerprint covers them."""
    subgroups = tuple(spec.partition(":")[0] for spec in ecfg.subgroups)
    return (("source",) + subgroups + ((ecfg.cohort,) if ecfg.cohort else ())
            + (("uri",) if ecfg.train_overlap else ()))


def other_run_membership(uri: str) -> tuple[pd.DataFrame | None, lineage.Fingerprint | None]:
    """The task membership of the partition the run that wrote the predictions at ``uri`` was trained on (its score
    summary beside them names it), with its fingerprint; (None, None) when no summary or partition is there."""
    part = score_summary_of(uri).get("partition")
    tm_uri = layout.partition_outputs(part)["task_membership"] if part else None
    if not tm_uri or not storage.exists(tm_uri):
        return None, None
    table = storage.read_table(tm_uri)
    return table.to_pandas(), lineage.columns_fingerprint(tm_uri, table, table.column_names)


def load_other_run(uri: str, columns: tuple[str, ...], own_classes: int, inp: EvalInputs) -> pd.DataFrame:
    """Another run's predictions (evaluate.compare, evaluate.reference) with the membership their probabilities are
    scored through as ``df.attrs["membership"]``: that of the other run's own partition - its columns are its own
    training classes. Without one, this run's, when the other run has as many classes; else a UserError (issue 28:
    mapping another run's classes through this run's membership gave another task score)."""
    df = load_predictions(uri, None, columns)
    theirs = df.attrs["probs"].shape[1]
    membership, _ = other_run_membership(uri)
    if membership is None:
        if theirs != own_classes:
            raise UserError(f"{storage.redact(uri)}: its predictions are over {theirs} training classes, this "
                            f"run's over {own_classes}, and no score summary beside them names their partition: the "
                            "two cannot be compared through one class membership (compare predictions written by "
                            "dermray score)")
        log.warning("evaluate: %s names no partition of its own: its %d training classes are taken to be this "
                    "run's", storage.redact(uri), theirs)
        membership = inp.membership
    elif len(membership) and int(membership["class_index"].max()) >= theirs:
        raise UserError(f"{storage.redact(uri)}: its predictions are over {theirs} training classes, fewer than its "
                        "partition's task membership names: they are not that partition's predictions")
    df.attrs["membership"] = membership
    return df


def evaluation_lineage(inp: EvalInputs, predictions_fp, readers_fp, compare_fp, cfg: RunConfig):
    ecfg = cfg.evaluate
    inputs = dict(inp.fingerprints) | {"predictions": predictions_fp}
    if readers_fp is not None:
        inputs["readers"] = readers_fp
    if compare_fp is not None:
        inputs["compare"] = compare_fp
    if ecfg.reference:
        inputs["reference"] = load_predictions(ecfg.reference, None, predictions_columns(ecfg)).attrs["fingerprint"]
    for name in ("compare", "reference"):  # the other run's probabilities are scored through its own membership
        uri = getattr(ecfg, name)
        fp = other_run_membership(uri)[1] if uri else None
        if fp is not None:
            inputs[f"{name}_task_membership"] = fp
    return registry.stage_lineage(STAGE, cfg, inputs)


def lineage_now(cfg: RunConfig, recorded: lineage.Lineage | None = None) -> lineage.Lineage:
    ecfg = cfg.evaluate
    inp = read_definitions(cfg)
    predictions = ecfg.predictions
    assert predictions is not None  # read_definitions checked it

    columns = predictions_columns(ecfg)
    declared = declared_columns(columns)
    pred = lineage.reuse(recorded, "predictions", predictions, lambda: load_predictions(
        predictions, ecfg.model_id, columns).attrs["fingerprint"], declared)
    compare = lineage.reuse(recorded, "compare", ecfg.compare, lambda: load_predictions(
        ecfg.compare, None, columns).attrs["fingerprint"], declared) if ecfg.compare else None
    readers = lineage.file_fingerprint(ecfg.readers) if ecfg.readers else None
    return evaluation_lineage(inp, pred, readers, compare, cfg)


def write_back(summary: dict, scored: dict) -> str | None:
    """The headline test numbers written into the model cards of the models that scored the predictions (the one
    place outside <output>/metrics/<run_id> this stage writes, by design: a model card carries its test results).
    Returns the first card's markdown, for the report's link."""
    import datetime as dt

    from dermray.runtime import artifacts

    entry = {"evaluation": storage.redact(storage.parent(summary["outputs"]["metrics"])), "run_id": summary["run_id"],
             "model_id": ", ".join(summary["model_ids"]), "headline": summary["headline"],
             "predictions": summary["lineage"]["inputs"]["predictions"]["content"][:16],
             "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    first = None
    for fold_dir in scored.get("checkpoints", []):
        card_uri = storage.join(fold_dir, artifacts.CARD_FILE)
        if not storage.exists(card_uri):
            continue
        card = artifacts.read_card(card_uri)
        kept = [t for t in card.test_metrics if t.get("evaluation") != entry["evaluation"]]
        card = card.model_copy(update={"test_metrics": kept + [entry], "changelog": card.changelog + [
            {"when": entry["when"], "what": f"test results from {entry['evaluation']}"}]})
        artifacts.write_card(artifacts.ModelCard.model_validate(card.model_dump()), fold_dir)
        first = first or storage.join(fold_dir, artifacts.CARD_MD)
    return first


def write_outputs(t: Tables, tasks: list[Task], paths: dict, summary: dict) -> None:
    write_tables(t, paths)
    plots = render_plots(t, tasks)
    for name, png in plots.items():
        storage.write_bytes(storage.join(paths["plots"], name), png)
    md, page = render_report(summary, t, plots, tasks, summary.get("model_card"))
    storage.write_text(paths["report_md"], md)
    storage.write_text(paths["report_html"], page)
    storage.write_text(paths["summary"], strict_json(summary))


def run(cfg: RunConfig, base: str | None = None) -> dict:
    """Evaluate ``evaluate.predictions``; ``base`` overrides where the outputs go (the nightly job's date folder)."""
    t_start = time.perf_counter()
    ecfg = cfg.evaluate
    inp = read_definitions(cfg)
    assert ecfg.predictions is not None  # read_definitions checked it
    paths = layout.evaluate_outputs(base or layout.metrics_dir(cfg.output, cfg.run_id))
    if ecfg.distributed:
        return run_distributed(cfg, inp, paths, t_start)
    df = load_predictions(ecfg.predictions, ecfg.model_id, predictions_columns(ecfg))
    readers = _load_readers(ecfg.readers)
    compare = load_other_run(ecfg.compare, predictions_columns(ecfg), df.attrs["probs"].shape[1],
                             inp) if ecfg.compare else None
    groups = lesions(df)
    unknown_label = int((~df["label"].isin(inp.tax.index.keys())).sum())
    subset_masks = subsets(df, ecfg.subgroups)
    overlap = train_overlap(df, inp, ecfg)
    if overlap.images:  # every metric again without the test images that copy training images
        subset_masks.append(("no_train_overlap", ~df["image_id"].isin(overlap.images).to_numpy()))
    t = Tables(train_overlap=overlap.pairs)
    excluded, evaluated = {}, np.zeros(len(df), bool)
    # One line at the end (more while it runs if it takes over 5 s; live on a terminal).
    meter = progress.Meter("evaluate", len(inp.tasks), unit="tasks")
    meter.extra = (f"; {len(df):,} images, {pd.Series(groups).nunique():,} lesions, {len(subset_masks)} subset(s), "
                   f"{ecfg.n_bootstrap:,} bootstrap resamples")
    test = EvalData(df, groups, subset_masks, readers, compare)
    for task in inp.tasks:
        excluded[task.name], used = evaluate_task(t, cfg.run_id, task, test, inp, ecfg)
        evaluated |= used
        meter.update()
    cohorts, reference = cohorts_of(df, ecfg, inp)
    if cohorts:
        assert reference is not None  # cohorts_of names the reference cohort whenever it returns cohorts
        external_validation(t, cfg.run_id, inp, cohorts, reference, ecfg)
    now = evaluation_lineage(inp, df.attrs["fingerprint"], lineage.file_fingerprint(ecfg.readers) if ecfg.readers
                             else None, compare.attrs["fingerprint"] if compare is not None else None, cfg)
    summary = {
        "stage": STAGE, "run_id": cfg.run_id, "predictions": storage.redact(ecfg.predictions), "images": len(df),
        "lesions": int(pd.Series(groups).nunique()),
        "biopsy_images": int((df["label_source"] == "biopsy").sum()) if "label_source" in df.columns else None,
        # Every prediction is evaluated by some task or lies outside every task (its label in no task class).
        "evaluated": int(evaluated.sum()), "outside_every_task": int((~evaluated).sum()),
        "model_ids": sorted(df["model_id"].unique().tolist()), "partition": storage.redact(inp.partition),
        "unknown_labels": unknown_label, "excluded": excluded, "train_overlap": overlap.summary(),
        "tasks": [t_.name for t_ in inp.tasks],
        "subsets": [s for s, _ in subset_masks], "headline": headline(t), "lineage": now.to_dict(), "outputs": paths,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    summary["model_card"] = write_back(summary, inp.scored)
    write_outputs(t, inp.tasks, paths, summary)
    return summary


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


def write_tables(t: Tables, paths: dict) -> None:
    specs = [("metrics", t.metrics, schemas.METRICS), ("roc", t.roc, schemas.ROC),
             ("confusion", t.confusion, schemas.CONFUSION), ("readers", t.readers, schemas.READER_POINTS),
             ("calibration", t.calibration, schemas.CALIBRATION),
             ("train_overlap", t.train_overlap, schemas.TRAIN_OVERLAP)]
    for name, rows, schema in specs:
        arrow = schema.arrow([c.name for c in schema.columns])
        table = pa.Table.from_pylist(rows, schema=arrow) if rows else arrow.empty_table()
        storage.write_table(table, paths[name])


def headline(t: Tables) -> list[dict]:
    keep = {"auc", "accuracy", "balanced_accuracy"}
    return [{k: r[k] for k in ("task", "subset", "metric", "value", "ci_low", "ci_high", "n", "note")}
            for r in t.metrics if (r["metric"] in keep and r["subset"] in ("all", "biopsy"))
            or r["metric"] == "auc_difference" or (r["metric"] == "auc" and r["subset"].startswith("cohort="))
            or (r["metric"].startswith("carries_over@") and r["value"] == 0)]


# ---- external validation ------------------------------------------------------------------------------------------
def task_scores(df: pd.DataFrame, inp: EvalInputs,
                task: Task) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(0/1 truth, score, groups, which rows of ``df`` they are) of a binary task's images in ``df``."""
    y_task = truth_for_task(inp.tax, task, df["label"].to_numpy())
    pos = task.class_names.index(cast(str, task.positive))  # set for every binary task (parse_tasks)
    # Another run's predictions (the reference cohort) through their own membership (load_other_run).
    probs = df.attrs["probs"]
    score = binary_task_score(probs, membership_matrix(df.attrs.get("membership", inp.membership), task,
                                                       probs.shape[1]), pos)
    use = (y_task != NOT_IN_TASK) & ~np.isnan(score)
    groups = lesions(df)
    return (y_task[use] == pos).astype(int), score[use], groups[use], use


def cohorts_of(df: pd.DataFrame, ecfg: EvaluateConfig, inp: EvalInputs
               ) -> tuple[dict[str, pd.DataFrame], str | None]:
    """The cohorts to compare: {"internal": the reference predictions, "external": these} or the values of the
    cohort column; and the reference cohort's name."""
    if ecfg.reference:
        ref = load_other_run(ecfg.reference, predictions_columns(ecfg), df.attrs["probs"].shape[1], inp)
        return {"internal": ref, "external": df}, "internal"
    if ecfg.cohort:
        if ecfg.cohort not in df.columns:
            raise UserError(f"evaluate.cohort: column {ecfg.cohort!r} is not in the predictions")
        values = sorted(df[ecfg.cohort].dropna().astype(str).unique())
        reference = ecfg.reference_cohort or ("internal" if "internal" in values else values[0] if values else None)
        if reference not in values:
            raise UserError(f"evaluate.reference_cohort {reference!r} is not a value of {ecfg.cohort} ({values})")
        out = {}
        for v in values:
            part = df[df[ecfg.cohort].astype(str) == v].copy()
            part.attrs = {**df.attrs, "probs": df.attrs["probs"][(df[ecfg.cohort].astype(str) == v).to_numpy()]}
            out[v] = part
        return out, reference
    return {}, None


def external_validation(t: Tables, run_id: str, inp: EvalInputs, cohorts: dict, reference: str,
                        ecfg: EvaluateConfig) -> None:
    """Per binary task and modality: each cohort's AUC with its CI, and each cohort's difference from the
    reference cohort with a CI from unpaired lesion bootstraps (each cohort resampled on its own)."""
    alpha = 1 - ecfg.ci_level
    for task in [x for x in inp.tasks if x.is_binary]:
        scored = {name: task_scores(df, inp, task) + (df,) for name, df in cohorts.items()}
        modalities = sorted(set().union(*[set(d["modality"].dropna()) for d in cohorts.values()
                                          if "modality" in d.columns])) if cohorts else []
        for subset in ["all"] + [f"modality={m}" for m in modalities]:
            boots = {}
            for k, (name, (y, s, g, use, df)) in enumerate(scored.items()):
                mask = np.ones(len(y), bool)
                if subset != "all" and "modality" in df.columns:
                    mask = (df["modality"].to_numpy()[use] == subset.split("=", 1)[1])
                if mask.sum() < 2 or y[mask].min() == y[mask].max():
                    continue
                b = M.bootstrap_auc(y[mask], s[mask], g[mask], n_boot=ecfg.n_bootstrap, seed=ecfg.seed + 7919 * k,
                                    alpha=alpha)
                boots[name] = b
                At(t, run_id, task.name, f"cohort={name}:{subset}").add("auc", b.estimate, int(mask.sum()),
                                                                        b.ci_low, b.ci_high)
            if reference not in boots:
                continue
            for name, b in boots.items():
                if name == reference:
                    continue
                ref = boots[reference]
                r = min(len(b.replicates), len(ref.replicates))
                diffs = b.replicates[:r] - ref.replicates[:r]
                diffs = diffs[np.isfinite(diffs)]
                lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2]) if len(diffs) else (float("nan"),) * 2
                At(t, run_id, task.name, f"cohort={name}:{subset}").add(
                    "auc_difference", b.estimate - ref.estimate, int(b.n_groups), float(lo), float(hi),
                    note=f"{name} minus {reference} (unpaired lesion bootstrap)")


# ---- distributed path -----------------------------------------------------------------------------------------------
SUBSET_NAMES = ("all", "biopsy", "modality=clinical", "modality=dermoscopy")


def block_histograms(batch: pa.Table, node_ids: list[str], truth: list[tuple[int, np.ndarray]],
                     matrices: list[np.ndarray], bins: int) -> dict:
    """Ray Data batch fn: per binary task, subset and truth (negative, positive), the histogram of the scores of
    one block of predictions: int64 [1, tasks, subsets, 2, bins]."""
    probs = probs_matrix(batch.column("probs"))
    labels = batch.column("label").to_numpy(zero_copy_only=False)
    n = len(labels)
    source = (batch.column("label_source").to_numpy(zero_copy_only=False) if "label_source" in batch.column_names
              else np.full(n, None))
    modality = (batch.column("modality").to_numpy(zero_copy_only=False) if "modality" in batch.column_names
                else np.full(n, None))
    masks = [np.ones(n, bool), source == "biopsy", modality == "clinical", modality == "dermoscopy"]
    h = np.zeros((len(truth), len(SUBSET_NAMES), 2, bins), np.int64)
    for ti, ((pos, node_class), m) in enumerate(zip(truth, matrices)):
        y = task_class_of_labels(node_ids, node_class, labels)
        score = binary_task_score(probs, m, pos)  # NaN when not estimable: counted nowhere
        ok = (y != NOT_IN_TASK) & ~np.isnan(score)
        b = np.clip((np.nan_to_num(score) * bins).astype(np.int64), 0, bins - 1)
        for si, mask in enumerate(masks):
            sel = ok & mask
            np.add.at(h[ti, si], ((y[sel] == pos).astype(np.int64), b[sel]), 1)
    return {"hist": h[None]}


def histogram_metrics(at: At, neg: np.ndarray, posh: np.ndarray, thresholds: list[float]) -> None:
    """AUC and the rates at ``thresholds`` from the histograms of the negatives' and the positives' scores
    (float [bins] each, equal bins over [0, 1])."""
    bins = len(neg)
    n = int(neg.sum() + posh.sum())
    if n == 0:
        return
    at.add("n_positive", posh.sum(), n)
    at.add("n_negative", neg.sum(), n)
    note = None if posh.sum() and neg.sum() else "undefined: no positives or no negatives in this subset"
    at.add("auc", M.auc_from_counts(posh, neg), n, note=note)
    for thr in thresholds:
        k = int(np.clip(math.ceil(thr * bins - 1e-9), 0, bins))
        sens = posh[k:].sum() / posh.sum() if posh.sum() else float("nan")
        spec = neg[:k].sum() / neg.sum() if neg.sum() else float("nan")
        at.add(f"sensitivity@{thr:g}", sens, n)
        at.add(f"specificity@{thr:g}", spec, n)


def run_distributed(cfg: RunConfig, inp: EvalInputs, paths: dict, t_start: float) -> dict:
    """AUC and rates at fixed thresholds per binary task and subset (all, biopsy, each modality) from per-block
    histograms of the scores merged on the driver: memory is bins x tasks x subsets, whatever the row count."""
    import ray.data

    from dermray.core.inference import membership_matrix
    from dermray.runtime.raysession import check_shared_storage, ray_session

    ecfg = cfg.evaluate
    assert ecfg.predictions is not None  # read_definitions (which made inp) checked it
    binary = [task for task in inp.tasks if task.is_binary]
    if not binary:
        raise UserError("evaluate.distributed computes binary tasks only; the tasks YAML has none")
    truth = [(task.class_names.index(cast(str, task.positive)), node_task_class(inp.tax, task)) for task in binary]
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        # Ray Data's read tasks run on any node: a local predictions folder must be one every node sees.
        check_shared_storage(cfg.storage, {"evaluate.predictions": ecfg.predictions, "output": paths["metrics"]})
        fs, path = storage.filesystem(ecfg.predictions)
        ds = ray.data.read_parquet(path, filesystem=storage.pyarrow_fs(fs) if storage.is_s3(ecfg.predictions) else None)
        if ds.count() == 0:
            raise UserError(f"{storage.redact(ecfg.predictions)}: no predictions to evaluate")
        n_classes = len(ds.take(1)[0]["probs"])
        matrices = [membership_matrix(inp.membership, task, n_classes) for task in binary]
        ds = ds.select_columns([c for c in ("probs", "label", "label_source", "modality") if c in ds.schema().names])
        total = np.zeros((len(binary), len(SUBSET_NAMES), 2, ecfg.histogram_bins), np.int64)
        kwargs = {"node_ids": inp.tax.node_ids, "truth": truth, "matrices": matrices, "bins": ecfg.histogram_bins}
        for batch in ds.map_batches(block_histograms, batch_format="pyarrow", batch_size=None,  # type: ignore[arg-type]
                                    fn_kwargs=kwargs).iter_batches(batch_format="numpy", batch_size=1):
            total += batch["hist"].reshape(total.shape)
    t = Tables()
    for ti, task in enumerate(binary):
        for si, subset in enumerate(SUBSET_NAMES):
            histogram_metrics(At(t, cfg.run_id, task.name, subset), total[ti, si, 0].astype(float),
                              total[ti, si, 1].astype(float), [float(x) for x in ecfg.thresholds])
    write_tables(t, paths)
    summary = {"stage": STAGE, "run_id": cfg.run_id, "mode": "distributed", "histogram_bins": ecfg.histogram_bins,
               "predictions": storage.redact(ecfg.predictions), "tasks": [x.name for x in binary],
               "headline": headline(t), "outputs": {k: paths[k] for k in ("metrics", "summary")},
               "seconds": round(time.perf_counter() - t_start, 3)}
    storage.write_text(paths["summary"], strict_json(summary))
    return summary


def counts(s: dict) -> dict:
    """Predictions in = evaluated by a task + outside every task (none is dropped silently)."""
    if s.get("mode") == "distributed":
        return {"in": None, "out": None, "quarantined": 0, "seconds": s["seconds"]}
    return {"in": s["images"], "out": s["evaluated"], "quarantined": s["outside_every_task"], "seconds": s["seconds"]}


def format_summary(s: dict) -> str:
    lines = [f"evaluate: run {s['run_id']}" + (f", {s['images']} images" if "images" in s else "")]
    lines += [f"  {w}" for w in flagged_points(s["headline"])]
    for h in s["headline"]:
        if h["metric"].startswith("carries_over@"):
            continue
        ci = f" [{fmt(h['ci_low'])}, {fmt(h['ci_high'])}]" if h["ci_low"] is not None else ""
        why = f"  ({h['note']})" if h["value"] is None and h.get("note") else ""
        lines.append(f"  {h['task']:<32} {h['subset']:<8} {h['metric']:<18} {fmt(h['value'])}{ci}  n={h['n']}{why}")
    for task, ex in s.get("excluded", {}).items():
        if ex["undefined_score"]:
            lines.append(f"  warning: {task}: {ex['undefined_score']} images have no probability in either class")
    if s.get("unknown_labels"):
        lines.append(f"  warning: {s['unknown_labels']} predictions carry a label that is not a taxonomy node")
    overlap = s.get("train_overlap") or {}
    if overlap.get("test_images"):
        lines.append(f"  warning: {overlap['test_images']} test images are near-duplicates of training images "
                     "(train_overlap.parquet); every metric is also given without them (subset no_train_overlap)")
    elif overlap and not overlap["checked"]:
        lines.append(f"  train-test overlap not checked: {overlap['not_checked']}")
    out = s["outputs"]
    lines.append(f"  report: {out.get('report_html', out.get('metrics'))}  ({duration(s['seconds'])})")
    return "\n".join(lines)
