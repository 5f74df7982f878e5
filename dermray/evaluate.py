"""Evaluation stage: predictions -> the paper's results, as long-form tables for analysts, plots and a report.

For each task (tasks YAML) and subset (all, biopsy-proven, each modality, each value of the configured subgroup
columns) the stage derives the ground truth from each image's taxonomy label (the task class whose nodes lie at
or above it; images outside every class are not part of the task) and the model's task-class probabilities from
the training-class probabilities (the paper's inference algorithm: sum over the training classes in each task
class, via the partition stage's task_membership table). Binary tasks score P(pos) / (P(pos) + P(neg)).

Outputs under ``<output>/metrics/<run_id>/``: metrics.parquet (long form), roc.parquet, confusion.parquet,
readers.parquet, calibration.parquet, plots/*.png, report.html (self-contained) and report.md.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from dermray import metrics as M
from dermray import schemas, storage
from dermray.config import EvaluateConfig, RunConfig
from dermray.errors import UserError
from dermray.tasks import Task, load_tasks
from dermray.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger("dermray.evaluate")
STAGE = "evaluate"
NOT_IN_TASK = -1


# ---- inputs ------------------------------------------------------------------------------------------------------
def truth_for_task(tax: Taxonomy, task: Task, labels: np.ndarray) -> np.ndarray:
    """Task class index of each image from its taxonomy label (node_id); NOT_IN_TASK where none applies."""
    node_class = np.full(len(tax), NOT_IN_TASK, dtype=np.int64)
    for k, cls in enumerate(task.classes):
        for node in cls.nodes:
            node_class[tax.descendants(node)] = k
    idx = pd.Series(np.arange(len(tax)), index=tax.node_ids).reindex(labels).to_numpy()
    out = np.full(len(labels), NOT_IN_TASK, dtype=np.int64)
    known = ~np.isnan(idx)
    out[known] = node_class[idx[known].astype(np.int64)]
    return out


def task_probabilities(probs: np.ndarray, membership: pd.DataFrame, task: Task) -> np.ndarray:
    """[n, K] probability of each task class: the sum over its training classes (the inference algorithm)."""
    m = np.zeros((probs.shape[1], len(task.classes)))
    rows = membership[membership["task"] == task.name]
    col = {c: j for j, c in enumerate(task.class_names)}
    for ci, tc in zip(rows["class_index"], rows["task_class"]):
        if ci >= probs.shape[1]:
            raise UserError(f"task_membership names training class {ci} but the predictions have "
                            f"{probs.shape[1]} probabilities: the partition and the model do not match")
        m[ci, col[tc]] = 1.0
    return probs @ m


def binary_score(task_probs: np.ndarray, positive: int) -> np.ndarray:
    """P(pos) / (P(pos) + P(neg)); NaN where both are zero."""
    pos = task_probs[:, positive]
    total = task_probs.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, pos / np.where(total > 0, total, 1), np.nan)


def probs_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """list<float32> column -> float64 [n, C]; rows of unequal length are an error."""
    arr = column.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0))
    lengths = np.asarray(pa.compute.list_value_length(arr).fill_null(-1))
    if (lengths != lengths[0]).any() or lengths[0] < 0:
        bad = int(np.flatnonzero(lengths != lengths[0])[0]) if (lengths != lengths[0]).any() else 0
        raise UserError(f"predictions: 'probs' has rows of different lengths (row {bad} has {lengths[bad]}, "
                        f"row 0 has {lengths[0]}) or nulls")
    return np.asarray(arr.flatten(), dtype=np.float64).reshape(len(arr), int(lengths[0]))


def load_predictions(uri: str, model_id: str | None) -> pd.DataFrame:
    table = storage.read_table(uri)
    source = storage.redact(uri)
    schemas.check_columns(table.schema, schemas.PREDICTIONS, source)
    if "label" not in table.column_names:
        raise UserError(f"{source}: predictions need the manifest's 'label' column to be evaluated")
    models = pd.unique(table.column("model_id").to_numpy(zero_copy_only=False))
    if model_id is None and len(models) > 1:
        raise UserError(f"{source}: predictions of {len(models)} models ({', '.join(map(str, models[:5]))}); "
                        "choose one with evaluate.model_id")
    if model_id is not None:
        table = table.filter(pa.compute.equal(table.column("model_id"), model_id))
        if table.num_rows == 0:
            raise UserError(f"{source}: no predictions of model_id {model_id!r} (has: {', '.join(map(str, models))})")
    probs = probs_matrix(table.column("probs"))
    df = table.drop_columns(["probs"]).to_pandas()
    dup = df["image_id"].duplicated()
    if dup.any():
        raise UserError(f"{source}: image_id {df.loc[dup, 'image_id'].iloc[0]!r} is predicted more than once "
                        f"for one model")
    df.attrs["probs"] = probs
    return df


# ---- subsets -----------------------------------------------------------------------------------------------------
def subsets(df: pd.DataFrame, subgroup_specs: list[str]) -> list[tuple[str, np.ndarray]]:
    """(name, boolean mask) for: all, biopsy-proven, each modality, each value of each subgroup column."""
    out = [("all", np.ones(len(df), dtype=bool))]
    if "label_source" in df.columns:
        out.append(("biopsy", (df["label_source"] == "biopsy").to_numpy()))
    if "modality" in df.columns:
        for value in sorted(df["modality"].dropna().unique()):
            out.append((f"modality={value}", (df["modality"] == value).to_numpy()))
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
    curves: dict = dataclasses.field(default_factory=dict)  # (task, subset) -> data for plots


def _metric(t: Tables, run_id, task, subset, metric, value, n, lo=None, hi=None, note=None):
    value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    if value is None and note is None:
        note = "undefined"
    t.metrics.append({"run_id": run_id, "task": task, "subset": subset, "metric": metric, "value": value,
                      "ci_low": None if lo is None or math.isnan(lo) else float(lo),
                      "ci_high": None if hi is None or math.isnan(hi) else float(hi), "n": int(n), "note": note})


def evaluate_binary(t: Tables, run_id: str, task: Task, subset: str, y: np.ndarray, score: np.ndarray,
                    groups: np.ndarray, image_ids: np.ndarray, cfg: EvaluateConfig,
                    readers: pd.DataFrame | None) -> None:
    n, n_pos = len(y), int(y.sum())
    _metric(t, run_id, task.name, subset, "n_positive", n_pos, n)
    _metric(t, run_id, task.name, subset, "n_negative", n - n_pos, n)
    if n_pos == 0 or n_pos == n:
        why = f"undefined: no {'positives' if n_pos == 0 else 'negatives'} in this subset"
        for name in ("auc", "sensitivity@0.5", "specificity@0.5"):
            _metric(t, run_id, task.name, subset, name, None, n, note=why)
        return
    alpha = 1 - cfg.ci_level
    boot = M.bootstrap_auc(y, score, groups, n_boot=cfg.n_bootstrap, seed=cfg.seed, alpha=alpha)
    _metric(t, run_id, task.name, subset, "auc", boot.estimate, n, boot.ci_low, boot.ci_high)
    _metric(t, run_id, task.name, subset, "n_groups", boot.n_groups, n)
    fpr, tpr, thr = M.roc_curve(y, score)
    for f, tp_, th in zip(*M.thin_curve(fpr, tpr, thr)):
        t.roc.append({"run_id": run_id, "task": task.name, "subset": subset, "threshold": float(th),
                      "fpr": float(f), "tpr": float(tp_)})
    named = [(f"{x:g}", float(x)) for x in cfg.thresholds]
    named.append(("youden", M.youden_threshold(y, score)))
    named.append((f"sens{cfg.target_sensitivity:g}", M.threshold_for_sensitivity(y, score, cfg.target_sensitivity)))
    for name, thr_value in named:
        r = M.rates_at(y, score, thr_value)
        if not name[0].isdigit():
            _metric(t, run_id, task.name, subset, f"threshold@{name}", thr_value, n)
        for metric in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
            _metric(t, run_id, task.name, subset, f"{metric}@{name}", getattr(r, metric), n)
    ece, curve = M.reliability(y, score, cfg.calibration_bins)
    _metric(t, run_id, task.name, subset, "ece", ece, n)
    for row in curve:
        t.calibration.append({"run_id": run_id, "task": task.name, "subset": subset} | row)
    points = []
    if readers is not None and len(readers):
        points = reader_points(t, run_id, task, subset, y, score, image_ids, readers)
    t.curves[(task.name, subset)] = {"fpr": fpr, "tpr": tpr, "auc": boot.estimate, "ci": (boot.ci_low, boot.ci_high),
                                     "readers": points, "n_pos": n_pos, "n_neg": n - n_pos,
                                     "calibration": curve}


def reader_points(t: Tables, run_id, task: Task, subset, y, score, image_ids, readers: pd.DataFrame):
    """Each reader's sensitivity/specificity on the images of this task and subset that the reader read."""
    r = readers[readers["task"] == task.name]
    if r.empty:
        return []
    truth = pd.Series(y, index=image_ids)
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
            raise UserError(f"readers: reader {reader_id!r} on task {task.name!r} has rows with neither decision "
                            "nor score")
        yy = truth.loc[rr["image_id"]].to_numpy()
        rates = M.rates_at(yy, called.astype(float), 0.5)
        model = M.sensitivity_at_specificity(y, score, rates.specificity) if not math.isnan(
            rates.specificity) else float("nan")
        below = None if math.isnan(rates.sensitivity) or math.isnan(model) else bool(rates.sensitivity < model - 1e-12)
        t.readers.append({"run_id": run_id, "task": task.name, "subset": subset, "reader_id": str(reader_id),
                          "n": len(rr), "sensitivity": rates.sensitivity, "specificity": rates.specificity,
                          "model_sensitivity_at_specificity": model, "below_model_curve": below})
        pts.append((str(reader_id), rates.sensitivity, rates.specificity))
    if pts:
        summary = M.reader_comparison(y, score, pts)
        n = len(y)
        _metric(t, run_id, task.name, subset, "readers_n", summary["n_readers"], n)
        _metric(t, run_id, task.name, subset, "readers_mean_sensitivity", summary["mean_sensitivity"], n)
        _metric(t, run_id, task.name, subset, "readers_mean_specificity", summary["mean_specificity"], n)
        _metric(t, run_id, task.name, subset, "readers_below_model_curve", summary["below_curve"], n)
        _metric(t, run_id, task.name, subset, "model_sensitivity_at_readers_mean_specificity",
                summary["model_sensitivity_at_mean_specificity"], n)
    return pts


def evaluate_multiclass(t: Tables, run_id: str, task: Task, subset: str, y: np.ndarray, probs: np.ndarray,
                        groups: np.ndarray, cfg: EvaluateConfig) -> None:
    n = len(y)
    if n == 0:
        _metric(t, run_id, task.name, subset, "accuracy", None, 0, note="undefined: no images of this task")
        return
    s = M.multiclass_summary(y, probs)
    correct = (M.predicted_class(probs) == y).astype(float)
    lo, hi = _bootstrap_mean(correct, groups, cfg)
    _metric(t, run_id, task.name, subset, "accuracy", s["accuracy"], n, lo, hi)
    _metric(t, run_id, task.name, subset, "balanced_accuracy", s["balanced_accuracy"], n)
    _metric(t, run_id, task.name, subset, "undecided", s["undecided"], n)
    for k, name in enumerate(task.class_names):
        pc = s["per_class"][k]
        for metric in ("sensitivity", "specificity"):
            value = pc[metric]
            note = None if not math.isnan(value) else f"undefined: no {'images' if metric == 'sensitivity' else 'other images'} of class {name}"
            _metric(t, run_id, task.name, subset, f"{metric}@0.5[{name}]", value, pc["n"] if metric ==
                    "sensitivity" else n - pc["n"], note=note)
    cm = s["confusion"]
    names = task.class_names + ["undecided"]
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            t.confusion.append({"run_id": run_id, "task": task.name, "subset": subset, "true_class": names[i],
                                "predicted_class": names[j], "n": int(cm[i, j])})
    conf = probs.max(axis=1)
    ece, curve = M.reliability(correct, conf, cfg.calibration_bins)
    _metric(t, run_id, task.name, subset, "ece_top_class", ece, n)
    t.curves[(task.name, subset)] = {"confusion": cm, "names": names, "accuracy": s["accuracy"]}


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
def outputs(output: str, run_id: str) -> dict[str, str]:
    base = storage.join(output, "metrics", run_id)
    out = {name: storage.join(base, f"{name}.parquet")
           for name in ("metrics", "roc", "confusion", "readers", "calibration")}
    out |= {"report_html": storage.join(base, "report.html"), "report_md": storage.join(base, "report.md"),
            "plots": storage.join(base, "plots"), "summary": storage.join(base, "evaluate_summary.json")}
    return out


def _load_readers(uri: str | None) -> pd.DataFrame | None:
    if not uri:
        return None
    table = storage.read_table_any(uri)
    schemas.check_columns(table.schema, schemas.READERS, storage.redact(uri))
    df = table.to_pandas()
    if "decision" not in df.columns and "score" not in df.columns:
        raise UserError(f"{storage.redact(uri)}: readers need a 'decision' (0/1) or a 'score' column")
    if "decision" in df.columns:
        bad = df["decision"].notna() & ~df["decision"].isin([0, 1])
        if bad.any():
            raise UserError(f"{storage.redact(uri)}: column 'decision' must be 0 or 1 (row {int(np.flatnonzero(bad)[0])})")
    return df


def run(cfg: RunConfig) -> dict:
    t_start = time.perf_counter()
    ecfg = cfg.evaluate
    if not ecfg.predictions:
        raise UserError("no predictions given: set evaluate.predictions (or --predictions)")
    if not cfg.data.tasks or not cfg.data.taxonomy:
        raise UserError("evaluation needs the tasks YAML and the taxonomy: set data.tasks and data.taxonomy")
    if not 0 < ecfg.ci_level < 1 or ecfg.n_bootstrap < 10:
        raise UserError("evaluate.ci_level must be in (0, 1) and evaluate.n_bootstrap at least 10")
    tax = load_taxonomy(cfg.data.taxonomy)
    tasks = load_tasks(cfg.data.tasks, tax)
    partition_dir = ecfg.partition or storage.join(cfg.output, "partition")
    membership = storage.read_table(storage.join(partition_dir, "task_membership.parquet")).to_pandas()
    if ecfg.distributed:
        return run_distributed(cfg, tax, tasks, membership, t_start)
    df = load_predictions(ecfg.predictions, ecfg.model_id)
    probs = df.attrs["probs"]
    readers = _load_readers(ecfg.readers)
    groups = (df["group_id"].fillna(df["image_id"]) if "group_id" in df.columns else df["image_id"]).to_numpy()
    labels = df["label"].to_numpy()
    unknown_label = int((~pd.Series(labels).isin(tax.index.keys())).sum())
    compare = load_predictions(ecfg.compare, None) if ecfg.compare else None
    t = Tables()
    run_id = cfg.run_id
    subset_masks = subsets(df, ecfg.subgroups)
    excluded = {}
    for task in tasks:
        y_task = truth_for_task(tax, task, labels)
        tprobs = task_probabilities(probs, membership, task)
        if task.is_binary:
            pos = task.class_names.index(task.positive)
            score = binary_score(tprobs, pos)
        in_task = y_task != NOT_IN_TASK
        nan_scores = in_task & np.isnan(score) if task.is_binary else np.zeros(len(df), bool)
        excluded[task.name] = {"not_in_task": int((~in_task).sum()), "undefined_score": int(nan_scores.sum())}
        use = in_task & ~nan_scores
        for subset_name, mask in subset_masks:
            m = use & mask
            if task.is_binary:
                y = (y_task[m] == pos).astype(int)
                evaluate_binary(t, run_id, task, subset_name, y, score[m], groups[m],
                                df["image_id"].to_numpy()[m], ecfg, readers)
            else:
                evaluate_multiclass(t, run_id, task, subset_name, y_task[m], tprobs[m], groups[m], ecfg)
        if task.is_binary and nan_scores.any():
            _metric(t, run_id, task.name, "all", "excluded_undefined_score", int(nan_scores.sum()), int(in_task.sum()),
                    note="P(pos) + P(neg) is 0: the model gives these images no probability in either class")
        if compare is not None and task.is_binary:
            delong_rows(t, run_id, task, compare, df, score, y_task, pos, tax, membership, use)
    paths = outputs(cfg.output, run_id)
    write_tables(t, paths)
    plots = render_plots(t, tasks)
    for name, png in plots.items():
        storage.write_bytes(storage.join(paths["plots"], name), png)
    summary = {
        "stage": STAGE, "run_id": run_id, "predictions": storage.redact(ecfg.predictions), "images": len(df),
        "unknown_labels": unknown_label, "excluded": excluded, "tasks": [t_.name for t_ in tasks],
        "subsets": [s for s, _ in subset_masks], "headline": headline(t), "outputs": paths,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    md, page = render_report(summary, t, plots)
    storage.write_text(paths["report_md"], md)
    storage.write_text(paths["report_html"], page)
    storage.write_text(paths["summary"], json.dumps(summary, indent=2, default=str))
    return summary


def delong_rows(t: Tables, run_id, task, compare: pd.DataFrame, df, score, y_task, pos, tax, membership, use):
    other = compare.set_index("image_id")
    common = df["image_id"].isin(other.index).to_numpy() & use
    if common.sum() < 4:
        _metric(t, run_id, task.name, "all", "delong_p_value", None, int(common.sum()),
                note="undefined: fewer than 4 images in common with the compared run")
        return
    order = other.index.get_indexer(df["image_id"].to_numpy()[common])
    other_score = binary_score(task_probabilities(compare.attrs["probs"], membership, task), pos)[order]
    y = (y_task[common] == pos).astype(int)
    ok = ~np.isnan(other_score)
    r = M.delong_test(y[ok], score[common][ok], other_score[ok])
    n = int(ok.sum())
    _metric(t, run_id, task.name, "all", "delong_auc_diff", r["diff"], n, r["diff"] - 1.96 * r["se"],
            r["diff"] + 1.96 * r["se"])
    _metric(t, run_id, task.name, "all", "delong_p_value", r["p_value"], n)


def write_tables(t: Tables, paths: dict) -> None:
    specs = [("metrics", t.metrics, schemas.METRICS), ("roc", t.roc, schemas.ROC),
             ("confusion", t.confusion, schemas.CONFUSION), ("readers", t.readers, schemas.READER_POINTS),
             ("calibration", t.calibration, schemas.CALIBRATION)]
    for name, rows, schema in specs:
        arrow = schema.arrow([c.name for c in schema.columns])
        table = pa.Table.from_pylist(rows, schema=arrow) if rows else arrow.empty_table()
        storage.write_table(table, paths[name])


def headline(t: Tables) -> list[dict]:
    keep = {"auc", "accuracy", "balanced_accuracy"}
    return [{k: r[k] for k in ("task", "subset", "metric", "value", "ci_low", "ci_high", "n")}
            for r in t.metrics if r["metric"] in keep and r["subset"] in ("all", "biopsy")]


# ---- plots and report ---------------------------------------------------------------------------------------------
def render_plots(t: Tables, tasks: list[Task]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for task in tasks:
        for subset in ("all", "biopsy"):
            c = t.curves.get((task.name, subset))
            if not c:
                continue
            if task.is_binary:
                fig, ax = plt.subplots(figsize=(5, 5))
                ax.plot(c["fpr"], c["tpr"], color="#1f4e9c", lw=2,
                        label=f"CNN (AUC {c['auc']:.3f}, 95% CI {c['ci'][0]:.3f}-{c['ci'][1]:.3f})")
                ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
                if c["readers"]:
                    rs = np.array([[p[1], p[2]] for p in c["readers"]], dtype=float)
                    ax.scatter(1 - rs[:, 1], rs[:, 0], color="#d62728", s=25, label="Dermatologists", zorder=3)
                    ax.scatter([1 - np.nanmean(rs[:, 1])], [np.nanmean(rs[:, 0])], color="#2ca02c", s=80,
                               marker="P", label="Average dermatologist", zorder=4)
                ax.set_xlabel("1 - specificity (false positive rate)")
                ax.set_ylabel("Sensitivity (true positive rate)")
                ax.set_title(f"{task.name} ({subset}: {c['n_pos']} pos, {c['n_neg']} neg)", fontsize=10)
                ax.set_xlim(-0.01, 1.01)
                ax.set_ylim(-0.01, 1.01)
                ax.legend(loc="lower right", fontsize=8)
                out[f"roc_{task.name}_{subset}.png"] = _png(fig)
                cal = [r for r in c["calibration"] if r["n"]]
                if cal:
                    fig, ax = plt.subplots(figsize=(4.5, 4.5))
                    ax.plot([0, 1], [0, 1], color="#bbbbbb", ls="--", lw=1)
                    ax.plot([r["mean_predicted"] for r in cal], [r["observed"] for r in cal], "o-", color="#1f4e9c")
                    ax.set_xlabel("Mean predicted probability")
                    ax.set_ylabel("Observed frequency")
                    ax.set_title(f"Reliability: {task.name} ({subset})", fontsize=10)
                    out[f"reliability_{task.name}_{subset}.png"] = _png(fig)
            else:
                cm = c["confusion"].astype(float)
                k = cm.shape[0]
                norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
                fig, ax = plt.subplots(figsize=(1.0 + 0.7 * (k + 1), 1.0 + 0.6 * k))
                ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
                for i in range(k):
                    for j in range(k + 1):
                        ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.6 else "black")
                ax.set_xticks(range(k + 1), c["names"], rotation=45, ha="right", fontsize=8)
                ax.set_yticks(range(k), c["names"][:k], fontsize=8)
                ax.set_xlabel("Predicted")
                ax.set_ylabel("True")
                ax.set_title(f"{task.name} ({subset}), accuracy {c['accuracy']:.3f}", fontsize=10)
                out[f"confusion_{task.name}_{subset}.png"] = _png(fig)
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def render_report(summary: dict, t: Tables, plots: dict[str, bytes]) -> tuple[str, str]:
    rows = [r for r in t.metrics if r["metric"] in ("auc", "accuracy", "balanced_accuracy", "sensitivity@0.5",
                                                    "specificity@0.5", "ece", "readers_below_model_curve",
                                                    "model_sensitivity_at_readers_mean_specificity")]
    md = [f"# dermray evaluation — run `{summary['run_id']}`", "",
          f"Predictions: `{summary['predictions']}` ({summary['images']} images). Subsets: "
          + ", ".join(summary["subsets"]) + ".", "",
          "| task | subset | metric | value | 95% CI | n | note |", "|---|---|---|---:|---|---:|---|"]
    for r in rows:
        ci = f"{_fmt(r['ci_low'])}–{_fmt(r['ci_high'])}" if r["ci_low"] is not None else ""
        md.append(f"| {r['task']} | {r['subset']} | {r['metric']} | {_fmt(r['value'])} | {ci} | {r['n']} | "
                  f"{r['note'] or ''} |")
    md += ["", "Full tables: metrics.parquet, roc.parquet, confusion.parquet, readers.parquet, calibration.parquet.",
           ""]
    md += [f"![{name}](plots/{name})" for name in plots]
    table_html = "".join(
        f"<tr><td>{html.escape(r['task'])}</td><td>{html.escape(r['subset'])}</td><td>{html.escape(r['metric'])}</td>"
        f"<td>{_fmt(r['value'])}</td><td>{_fmt(r['ci_low'])}–{_fmt(r['ci_high'])}</td><td>{r['n']}</td>"
        f"<td>{html.escape(r['note'] or '')}</td></tr>" for r in rows)
    images = "".join(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'/><figcaption>{html.escape(name)}</figcaption></figure>"
                     for name, png in plots.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dermray evaluation {html.escape(summary['run_id'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}figure{{display:inline-block;margin:8px}}
img{{max-width:480px}}</style></head><body>
<h1>dermray evaluation — run {html.escape(summary['run_id'])}</h1>
<p>Predictions: {html.escape(summary['predictions'])} ({summary['images']} images). Subsets: {html.escape(', '.join(summary['subsets']))}.</p>
<table><tr><th>task</th><th>subset</th><th>metric</th><th>value</th><th>95% CI</th><th>n</th><th>note</th></tr>{table_html}</table>
<h2>Figures</h2>{images}</body></html>"""
    return "\n".join(md) + "\n", page


# ---- distributed path -----------------------------------------------------------------------------------------------
def run_distributed(cfg: RunConfig, tax: Taxonomy, tasks: list[Task], membership: pd.DataFrame,
                    t_start: float) -> dict:
    """AUC and rates at fixed thresholds per binary task and subset (all, biopsy, each modality) from per-block
    histograms of the scores merged on the driver: memory is bins x tasks x subsets, whatever the row count."""
    from dermray.raysession import ray_session

    ecfg = cfg.evaluate
    bins = int(ecfg.histogram_bins)
    binary = [task for task in tasks if task.is_binary]
    if not binary:
        raise UserError("evaluate.distributed computes binary tasks only; the tasks YAML has none")
    subset_names = ["all", "biopsy", "modality=clinical", "modality=dermoscopy"]
    tax_ids = tax.node_ids
    node_truth = []
    for task in binary:
        pos = task.class_names.index(task.positive)
        node_class = np.full(len(tax), NOT_IN_TASK, np.int64)
        for k, c in enumerate(task.classes):
            for node in c.nodes:
                node_class[tax.descendants(node)] = k
        node_truth.append((task, pos, node_class))
    node_index = {n: i for i, n in enumerate(tax_ids)}

    def block_hist(batch: pa.Table) -> dict:
        probs = probs_matrix(batch.column("probs"))
        labels = batch.column("label").to_numpy(zero_copy_only=False)
        idx = np.array([node_index.get(l, -1) for l in labels])
        source = (batch.column("label_source").to_numpy(zero_copy_only=False) if "label_source" in
                  batch.column_names else np.full(len(labels), None))
        modality = (batch.column("modality").to_numpy(zero_copy_only=False) if "modality" in batch.column_names
                    else np.full(len(labels), None))
        masks = [np.ones(len(labels), bool), source == "biopsy", modality == "clinical", modality == "dermoscopy"]
        h = np.zeros((len(binary), len(subset_names), 2, bins), np.int64)
        for ti, (task, pos, node_class) in enumerate(node_truth):
            y = np.where(idx >= 0, node_class[np.maximum(idx, 0)], NOT_IN_TASK)
            score = binary_score(task_probabilities(probs, membership, task), pos)
            ok = (y != NOT_IN_TASK) & ~np.isnan(score)
            b = np.clip((np.nan_to_num(score) * bins).astype(np.int64), 0, bins - 1)
            for si, m in enumerate(masks):
                sel = ok & m
                yy = (y[sel] == pos).astype(np.int64)
                np.add.at(h[ti, si], (yy, b[sel]), 1)
        return {"hist": h[None]}

    import ray.data

    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        fs, path = storage.filesystem(ecfg.predictions)
        ds = ray.data.read_parquet(path if not storage.is_s3(ecfg.predictions) else ecfg.predictions,
                                   filesystem=storage._arrow_fs(fs) if storage.is_s3(ecfg.predictions) else None)
        ds = ds.select_columns([c for c in ("probs", "label", "label_source", "modality")
                                if c in ds.schema().names])
        total = np.zeros((len(binary), len(subset_names), 2, bins), np.int64)
        for batch in ds.map_batches(block_hist, batch_format="pyarrow", batch_size=None).iter_batches(
                batch_format="numpy", batch_size=1):
            total += batch["hist"].reshape(total.shape)
    t = Tables()
    thresholds = [float(x) for x in ecfg.thresholds]
    for ti, (task, pos, _) in enumerate(node_truth):
        for si, subset in enumerate(subset_names):
            neg, posh = total[ti, si, 0].astype(float), total[ti, si, 1].astype(float)
            n = int(neg.sum() + posh.sum())
            if n == 0:
                continue
            _metric(t, cfg.run_id, task.name, subset, "n_positive", posh.sum(), n)
            _metric(t, cfg.run_id, task.name, subset, "n_negative", neg.sum(), n)
            note = None if posh.sum() and neg.sum() else "undefined: no positives or no negatives in this subset"
            _metric(t, cfg.run_id, task.name, subset, "auc", M.auc_from_counts(posh, neg), n, note=note)
            for thr in thresholds:
                k = int(np.clip(math.ceil(thr * bins - 1e-9), 0, bins))
                sens = posh[k:].sum() / posh.sum() if posh.sum() else float("nan")
                spec = neg[:k].sum() / neg.sum() if neg.sum() else float("nan")
                _metric(t, cfg.run_id, task.name, subset, f"sensitivity@{thr:g}", sens, n)
                _metric(t, cfg.run_id, task.name, subset, f"specificity@{thr:g}", spec, n)
    paths = outputs(cfg.output, cfg.run_id)
    write_tables(t, paths)
    summary = {"stage": STAGE, "run_id": cfg.run_id, "mode": "distributed", "histogram_bins": bins,
               "predictions": storage.redact(ecfg.predictions), "tasks": [x.name for x in binary],
               "headline": headline(t), "outputs": {k: paths[k] for k in ("metrics", "summary")},
               "seconds": round(time.perf_counter() - t_start, 3)}
    storage.write_text(paths["summary"], json.dumps(summary, indent=2, default=str))
    return summary


def format_summary(s: dict) -> str:
    lines = [f"evaluate: run {s['run_id']}" + (f", {s['images']} images" if "images" in s else "")]
    for h in s["headline"]:
        ci = f" [{_fmt(h['ci_low'])}, {_fmt(h['ci_high'])}]" if h["ci_low"] is not None else ""
        lines.append(f"  {h['task']:<32} {h['subset']:<8} {h['metric']:<18} {_fmt(h['value'])}{ci}  n={h['n']}")
    for task, ex in s.get("excluded", {}).items():
        if ex["undefined_score"]:
            lines.append(f"  warning: {task}: {ex['undefined_score']} images have no probability in either class")
    if s.get("unknown_labels"):
        lines.append(f"  warning: {s['unknown_labels']} predictions carry a label that is not a taxonomy node")
    out = s["outputs"]
    lines.append(f"  report: {out.get('report_html', out.get('metrics'))}  ({s['seconds']} s)")
    return "\n".join(lines)
