"""Metrics for the evaluation stage. Pure numpy: no Ray, no I/O.

Conventions: ``y`` is 0/1 (1 = the task's positive class), ``score`` a float where higher means more positive, a
case is called positive when ``score >= threshold``. Multi-class truth is an int class index, predictions are
probabilities of shape [n, K]; an argmax tie is "undecided" and counts as wrong (the ISIC challenge's rule).
Undefined values (a rate with an empty denominator, an AUC without positives or negatives) are NaN and the caller
marks them undefined; nothing here divides by zero silently.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check_binary(y, score, weight=None):
    y = np.asarray(y)
    score = np.asarray(score, dtype=np.float64)
    if y.shape != score.shape or y.ndim != 1:
        raise ValueError(f"y and score must be 1-d of one length, got {y.shape} and {score.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold 0/1 only")
    if np.isnan(score).any():
        raise ValueError("score holds NaN")
    w = np.ones(len(y)) if weight is None else np.asarray(weight, dtype=np.float64)
    return y.astype(np.int8), score, w


def _tied_counts(y, score, w):
    """Distinct scores ascending, with the positive and negative weight at each."""
    order = np.argsort(score, kind="mergesort")
    s, yy, ww = score[order], y[order], w[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(ww * yy, starts) if len(s) else np.zeros(0)
    neg = np.add.reduceat(ww * (1 - yy), starts) if len(s) else np.zeros(0)
    return s[starts], pos, neg


def auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from positive and negative weights per ordered score value (or per bin, ascending); ties count half."""
    p, n = pos.sum(), neg.sum()
    if p <= 0 or n <= 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (p * n))


def roc_auc(y, score, weight=None) -> float:
    """Area under the ROC curve: the (weighted) Mann-Whitney statistic, exact, O(n log n). NaN without positives or
    negatives."""
    y, score, w = _check_binary(y, score, weight)
    _, pos, neg = _tied_counts(y, score, w)
    return auc_from_counts(pos, neg)


def roc_curve(y, score, weight=None, drop_intermediate: bool = True):
    """(fpr, tpr, thresholds) as scikit-learn's ``roc_curve``: thresholds descending from +inf."""
    y, score, w = _check_binary(y, score, weight)
    s, pos, neg = _tied_counts(y, score, w)
    tps = np.cumsum(pos[::-1])
    fps = np.cumsum(neg[::-1])
    thresholds = s[::-1]
    if drop_intermediate and len(tps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, thresholds


def thin_curve(fpr, tpr, thresholds, max_points: int = 2000):
    """At most ``max_points`` points of a ROC curve, keeping both ends (for tables and plots of huge inputs)."""
    if len(fpr) <= max_points:
        return fpr, tpr, thresholds
    idx = np.unique(np.r_[np.linspace(0, len(fpr) - 1, max_points).round().astype(int)])
    return fpr[idx], tpr[idx], thresholds[idx]


@dataclass(frozen=True)
class BinaryRates:
    threshold: float
    sensitivity: float
    specificity: float
    accuracy: float
    ppv: float
    npv: float
    tp: float
    fp: float
    tn: float
    fn: float


def _ratio(a, b) -> float:
    return float(a / b) if b > 0 else float("nan")


def rates_at(y, score, threshold: float, weight=None) -> BinaryRates:
    """Sensitivity, specificity, accuracy, PPV, NPV when calling ``score >= threshold`` positive."""
    y, score, w = _check_binary(y, score, weight)
    called = score >= threshold
    tp = float(w[called & (y == 1)].sum())
    fp = float(w[called & (y == 0)].sum())
    fn = float(w[~called & (y == 1)].sum())
    tn = float(w[~called & (y == 0)].sum())
    return BinaryRates(float(threshold), _ratio(tp, tp + fn), _ratio(tn, tn + fp), _ratio(tp + tn, tp + tn + fp + fn),
                       _ratio(tp, tp + fp), _ratio(tn, tn + fn), tp, fp, tn, fn)


def youden_threshold(y, score) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the highest such threshold on ties)."""
    fpr, tpr, thr = roc_curve(y, score, drop_intermediate=False)
    j = tpr - fpr
    if np.isnan(j).all():
        return float("nan")
    best = int(np.nanargmax(j))
    return float(thr[best]) if np.isfinite(thr[best]) else float(thr[min(best + 1, len(thr) - 1)])


def threshold_for_sensitivity(y, score, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (so the best specificity that does)."""
    fpr, tpr, thr = roc_curve(y, score, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= target - 1e-12)
    if len(ok) == 0 or np.isnan(tpr).all():
        return float("nan")
    t = thr[ok[0]]
    return float(t) if np.isfinite(t) else float(thr[min(ok[0] + 1, len(thr) - 1)])


def sensitivity_at_specificity(y, score, specificity: float) -> float:
    """The model's best sensitivity among operating points whose specificity is at least ``specificity``."""
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    ok = (1 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max()) if ok.any() else float("nan")


# ---- bootstrap -------------------------------------------------------------------------------------------------
MAX_BOOTSTRAP_BINS = 1 << 20


def _rank_bins(score: np.ndarray, max_bins: int) -> tuple[np.ndarray, int]:
    """Each score's rank among the distinct scores (exact ties), or its quantile bin when there are more than
    ``max_bins`` distinct scores (then the AUC of a resample is exact up to pairs within one bin, < 1e-6)."""
    uniq, inv = np.unique(score, return_inverse=True)
    if len(uniq) <= max_bins:
        return inv.astype(np.int64), len(uniq)
    edges = np.unique(np.quantile(uniq, np.linspace(0, 1, max_bins + 1)[1:-1]))
    return np.searchsorted(edges, score, side="right").astype(np.int64), len(edges) + 1


@dataclass(frozen=True)
class BootstrapResult:
    estimate: float
    ci_low: float
    ci_high: float
    replicates: np.ndarray  # AUC of each resample (NaN where a resample had no positives or no negatives)
    n_groups: int


def resample_counts(rng: np.random.Generator, n_groups: int) -> np.ndarray:
    """How often each of ``n_groups`` groups is drawn in one bootstrap resample (n_groups draws with replacement)."""
    return np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)


def bootstrap_auc(y, score, groups=None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                  max_bins: int = MAX_BOOTSTRAP_BINS) -> BootstrapResult:
    """Percentile bootstrap CI of the AUC, resampling groups (lesions/patients) rather than images.

    Vectorised: the scores are ranked once; each resample is a vector of group weights, turned into weighted
    positive/negative counts per rank with one ``bincount`` (O(n) per resample, no sort, no Python loop over
    images). The resample of replicate b is ``resample_counts(np.random.default_rng(seed).spawn(n_boot)[b], G)``.
    """
    y, score, _ = _check_binary(y, score)
    if groups is None:
        group_idx = np.arange(len(y))
    else:
        _, group_idx = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_idx.max()) + 1 if len(group_idx) else 0
    estimate = roc_auc(y, score)
    if n_groups == 0 or np.isnan(estimate):
        return BootstrapResult(estimate, float("nan"), float("nan"), np.zeros(0), n_groups)
    bins, n_bins = _rank_bins(score, max_bins)
    # Sort by group once so a resample's per-image weights are one np.repeat of the group counts.
    order = np.argsort(group_idx, kind="stable")
    key = (bins[order] * 2 + y[order]).astype(np.int64)
    group_sizes = np.bincount(group_idx, minlength=n_groups)
    reps = np.empty(n_boot)
    for b, rng in enumerate(np.random.default_rng(seed).spawn(n_boot)):
        w = np.repeat(resample_counts(rng, n_groups).astype(np.float64), group_sizes)
        h = np.bincount(key, weights=w, minlength=2 * n_bins)
        reps[b] = auc_from_counts(h[1::2], h[0::2])
    ok = reps[~np.isnan(reps)]
    if len(ok) == 0:
        return BootstrapResult(estimate, float("nan"), float("nan"), reps, n_groups)
    lo, hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return BootstrapResult(estimate, float(lo), float(hi), reps, n_groups)


def bootstrap_weights(n: int, groups, n_boot: int, seed: int):
    """Per-image weights of each bootstrap resample, in the order ``bootstrap_auc`` draws them (for checking it
    against another implementation on the same resamples)."""
    _, group_idx = np.unique(np.asarray(groups) if groups is not None else np.arange(n), return_inverse=True)
    n_groups = int(group_idx.max()) + 1
    for rng in np.random.default_rng(seed).spawn(n_boot):
        yield resample_counts(rng, n_groups)[group_idx].astype(np.float64)


# ---- DeLong ----------------------------------------------------------------------------------------------------
def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    mid = (starts + ends - 1) / 2.0 + 1
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mid, ends - starts)
    return ranks


def delong_test(y, score_a, score_b) -> dict:
    """DeLong et al. (1988) test of two correlated AUCs on the same cases (fast midrank form, Sun & Xu 2014).
    Returns auc_a, auc_b, diff (a - b), se, z and the two-sided p-value."""
    from scipy.stats import norm

    y = np.asarray(y).astype(bool)
    a, b = np.asarray(score_a, float), np.asarray(score_b, float)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        nan = float("nan")
        return {"auc_a": nan, "auc_b": nan, "diff": nan, "se": nan, "z": nan, "p_value": nan}
    aucs, v01, v10 = [], [], []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.r_[pos, neg])
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    se = float(np.sqrt(max(var, 0.0)))
    z = diff / se if se > 0 else (0.0 if diff == 0 else float("inf") * np.sign(diff))
    p = float(2 * norm.sf(abs(z))) if np.isfinite(z) else 0.0
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": float(diff), "se": se, "z": float(z),
            "p_value": p}


# ---- multi-class -----------------------------------------------------------------------------------------------
UNDECIDED = -1


def predicted_class(probs: np.ndarray) -> np.ndarray:
    """Argmax over classes; ``UNDECIDED`` where the maximum is shared (counts as wrong)."""
    probs = np.asarray(probs, dtype=np.float64)
    top = probs.max(axis=1, keepdims=True)
    winners = (probs == top).sum(axis=1)
    pred = probs.argmax(axis=1)
    pred[winners > 1] = UNDECIDED
    return pred


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true class, predicted class], with a last column for undecided predictions: int64 [K, K + 1]."""
    cm = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    np.add.at(cm, (y_true, np.where(y_pred == UNDECIDED, n_classes, y_pred)), 1)
    return cm


def multiclass_summary(y_true, probs) -> dict:
    """Accuracy, balanced accuracy (mean per-class recall of argmax labels) and per-class one-vs-rest sensitivity
    and specificity at probability > 0.5, as the ISIC challenge defines them (undefined rates are NaN)."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = predicted_class(probs)
    cm = confusion(y_true, pred, k)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(cm[:, :k]) / np.maximum(support, 1), np.nan)
    per_class = []
    for c in range(k):
        truth = y_true == c
        called = probs[:, c] > 0.5
        tp, fn = (truth & called).sum(), (truth & ~called).sum()
        tn, fp = (~truth & ~called).sum(), (~truth & called).sum()
        per_class.append({"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                          "n": int(truth.sum())})
    present = support > 0
    return {
        "accuracy": _ratio((pred == y_true).sum(), len(y_true)),
        "balanced_accuracy": float(np.mean(recall[present])) if present.any() else float("nan"),
        "undecided": int((pred == UNDECIDED).sum()),
        "confusion": cm,
        "per_class": per_class,
    }


# ---- calibration -----------------------------------------------------------------------------------------------
def reliability(y, prob, n_bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error (equal-width bins, weighted by bin size) and the reliability curve: per bin
    its range, count, mean predicted probability and observed frequency."""
    y = np.asarray(y, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    idx = np.clip((prob * n_bins).astype(int), 0, n_bins - 1)
    curve, ece = [], 0.0
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        mean_p = float(prob[m].mean()) if n else float("nan")
        freq = float(y[m].mean()) if n else float("nan")
        if n:
            ece += n / len(y) * abs(mean_p - freq)
        curve.append({"bin_low": b / n_bins, "bin_high": (b + 1) / n_bins, "n": n, "mean_predicted": mean_p,
                      "observed": freq})
    return (float(ece) if len(y) else float("nan")), curve


# ---- readers ---------------------------------------------------------------------------------------------------
def reader_comparison(y, score, reader_points: list[tuple[str, float, float]]) -> dict:
    """Readers' (sensitivity, specificity) against the model's ROC curve: how many lie below it (their sensitivity
    is lower than the model's at their specificity), their mean, and the model's sensitivity at the readers' mean
    specificity."""
    if not reader_points:
        return {"n_readers": 0}
    sens = np.array([p[1] for p in reader_points])
    spec = np.array([p[2] for p in reader_points])
    model_at = np.array([sensitivity_at_specificity(y, score, s) for s in spec])
    mean_spec = float(np.nanmean(spec))
    return {
        "n_readers": len(reader_points),
        "mean_sensitivity": float(np.nanmean(sens)),
        "mean_specificity": mean_spec,
        "below_curve": int((sens < model_at - 1e-12).sum()),
        "model_sensitivity_at_mean_specificity": sensitivity_at_specificity(y, score, mean_spec),
        "model_sensitivity_at_reader_specificity": model_at.tolist(),
    }
