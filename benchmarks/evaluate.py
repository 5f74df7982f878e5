"""Bootstrap AUC CI at scale: dermray's vectorised group bootstrap vs a loop of scikit-learn's roc_auc_score over
the same resamples (the same per-image weights), in the same run.

At 10M predictions the scikit-learn loop is timed on a few replicates and scaled to 1000; the CI agreement of the
two implementations is checked on every replicate at a size where the whole loop runs (200k predictions, 1000
replicates), and the replicates timed at 10M are compared one by one. Run with no arguments:

    .venv/bin/python benchmarks/evaluate.py      # ~2 minutes on 2 cores; DERMRAY_BENCH_SMOKE=1: 1000x smaller

Writes benchmarks/results/evaluate/results.json (with the machine). Last line JSON: speedup, ci_agree (both CI ends
equal to 3 decimals), plus the figures behind them.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from dermray.core import metrics as M

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SMOKE, last_line, size, write_results  # noqa: E402

N_BIG = size(10_000_000, 10_000)
N_SMALL = size(200_000, 2_000)
N_BOOT = 1000
SK_REPLICATES_BIG = 3


def study(n: int, seed: int = 0):
    """Lesions of 1-3 images sharing a diagnosis and a lesion effect; 30 % positive; AUC about 0.76."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, n)
    groups = np.repeat(np.arange(n), sizes)[:n]
    n_groups = groups[-1] + 1
    y = (rng.random(n_groups) < 0.3).astype(np.int8)[groups]
    score = 1 / (1 + np.exp(-(rng.normal(0, 0.6, n_groups)[groups] + rng.normal(y * 1.0, 1.0))))
    return y, score.astype(np.float32).astype(np.float64), groups


def sklearn_replicates(y, score, groups, count):
    out = []
    for w in M.bootstrap_weights(len(y), groups, N_BOOT, seed=0):
        out.append(roc_auc_score(y, score, sample_weight=w))
        if len(out) == count:
            break
    return np.array(out)


def main() -> None:
    started = time.perf_counter()
    rows = []
    # 1. Agreement on every replicate at a size where the scikit-learn loop runs in full.
    y, s, g = study(N_SMALL, 1)
    t0 = time.perf_counter()
    ours_small = M.bootstrap_auc(y, s, g, n_boot=N_BOOT, seed=0)
    t_ours_small = time.perf_counter() - t0
    t0 = time.perf_counter()
    sk_small = sklearn_replicates(y, s, g, N_BOOT)
    t_sk_small = time.perf_counter() - t0
    sk_lo, sk_hi = np.quantile(sk_small, [0.025, 0.975])
    ci_agree = bool(round(sk_lo, 3) == round(ours_small.ci_low, 3) and round(sk_hi, 3) == round(ours_small.ci_high, 3))
    rows.append((f"{N_SMALL:,}", t_ours_small, t_sk_small, t_sk_small / t_ours_small,
                 f"[{ours_small.ci_low:.4f}, {ours_small.ci_high:.4f}]", f"[{sk_lo:.4f}, {sk_hi:.4f}]",
                 float(np.abs(ours_small.replicates - sk_small).max())))
    # 2. The target size: dermray's 1000 replicates in full, scikit-learn on a few and scaled.
    y, s, g = study(N_BIG, 2)
    t0 = time.perf_counter()
    ours = M.bootstrap_auc(y, s, g, n_boot=N_BOOT, seed=0)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    sk_big = sklearn_replicates(y, s, g, SK_REPLICATES_BIG)
    t_sk_big = (time.perf_counter() - t0) / SK_REPLICATES_BIG * N_BOOT
    big_diff = float(np.abs(ours.replicates[:SK_REPLICATES_BIG] - sk_big).max())
    speedup = t_sk_big / t_ours
    rows.append((f"{N_BIG:,}", t_ours, t_sk_big, speedup, f"[{ours.ci_low:.4f}, {ours.ci_high:.4f}]",
                 f"(scaled from {SK_REPLICATES_BIG})", big_diff))
    print(f"{'predictions':>12} {'dermray s':>10} {'sklearn s':>10} {'speedup':>8} {'dermray CI':>20} "
          f"{'sklearn CI':>20} {'max |replicate diff|':>21}")
    for r in rows:
        print(f"{r[0]:>12} {r[1]:>10.1f} {r[2]:>10.1f} {r[3]:>8.1f} {r[4]:>20} {r[5]:>20} {r[6]:>21.2e}")
    print(f"{N_BOOT} replicates, lesion-grouped resampling; machine: {os.cpu_count()} CPUs; target speedup >= 50"
          + ("  [SMOKE: sizes 1000x smaller, not a measurement]" if SMOKE else ""))
    figures = {"speedup": round(speedup, 1), "ci_agree": ci_agree, "n_predictions": N_BIG,
               "n_bootstrap": N_BOOT, "dermray_s": round(t_ours, 2), "sklearn_s_scaled": round(t_sk_big, 1),
               "auc": round(ours.estimate, 5), "ci_low": round(ours.ci_low, 5),
               "ci_high": round(ours.ci_high, 5), "max_replicate_diff_10m": big_diff,
               "speedup_200k": round(t_sk_small / t_ours_small, 1), "n_predictions_small": N_SMALL,
               "dermray_s_200k": round(t_ours_small, 2), "sklearn_s_200k": round(t_sk_small, 1)}
    write_results("evaluate", figures, started=started)
    last_line(figures)


if __name__ == "__main__":
    main()
