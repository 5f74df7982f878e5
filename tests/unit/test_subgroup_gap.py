"""The subgroup gap of evaluate (issue 28, finding 2): its interval has the coverage it claims when the groups do not
differ, and it still detects a real gap. Simulated studies, each scored through evaluate's own per-subset path
(evaluate_binary, then subgroup_verdict)."""
import numpy as np
import pytest

from dermray.core.evaluation_tasks import Task, TaskClass
from dermray.runtime.config import EvaluateConfig
from dermray.stages.evaluate.per_task import BinaryScores, evaluate_binary, subgroup_verdict
from dermray.stages.evaluate.tables import At, Tables

TASK = Task("melanoma_vs_nevus", (TaskClass("melanoma", ()), TaskClass("nevus", ())), positive="melanoma")
CFG = EvaluateConfig(n_bootstrap=200, thresholds=[0.5], calibration_bins=5)


def _group(rng, n: int, auc: float, prevalence: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """n images, binormal scores with equal variances: AUC = Phi(shift / sqrt(2))."""
    from scipy.stats import norm

    y = (rng.random(n) < prevalence).astype(int)
    shift = np.sqrt(2) * norm.ppf(auc)
    score = 1 / (1 + np.exp(-(rng.standard_normal(n) + shift * y)))
    return y, score


def _gap_row(rng, aucs: tuple[float, ...], n: int = 300) -> dict:
    t = Tables()
    names = []
    for k, auc in enumerate(aucs):
        y, score = _group(rng, n, auc)
        name = f"modality={'abcdefgh'[k]}"
        ids = np.array([f"{name}-{i}" for i in range(n)])
        evaluate_binary(At(t, "r", TASK.name, name), BinaryScores(y, score, ids, ids), CFG,
                                 None)
        names.append(name)
    subgroup_verdict(t, "r", TASK, names, CFG)
    (row,) = [m for m in t.metrics if m["metric"] == "auc_gap"]
    return row


@pytest.mark.parametrize("groups", [2, 3])
def test_under_no_difference_the_gap_interval_contains_zero_at_its_stated_coverage(groups):
    rng = np.random.default_rng(2028)
    rows = [_gap_row(rng, (0.8,) * groups) for _ in range(200)]
    covered = sum(r["ci_low"] <= 0 <= r["ci_high"] for r in rows)
    assert covered >= 0.90 * len(rows), f"{covered} of {len(rows)} intervals contain 0"
    # The estimate lies inside its own interval.
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in rows)


def test_a_real_gap_of_0_08_with_300_images_per_group_is_detected_in_most_studies():
    rng = np.random.default_rng(2029)
    rows = [_gap_row(rng, (0.80, 0.88)) for _ in range(200)]
    detected = sum(r["ci_low"] > 0 for r in rows)
    assert detected > 0.5 * len(rows), f"detected in {detected} of {len(rows)}"
    assert all("modality=b minus modality=a" in r["note"] or "modality=a minus modality=b" in r["note"] for r in rows)
