"""External validation: the AUC on these predictions against a reference cohort's, with the difference and its
interval (lesions resampled in each cohort apart)."""
from __future__ import annotations

from typing import cast

import numpy as np
import pandas as pd

from dermray.core import metrics as M
from dermray.core.evaluation_tasks import Task
from dermray.core.inference import (
    NOT_IN_TASK,
    binary_task_score,
    membership_matrix,
    truth_for_task,
)
from dermray.errors import UserError
from dermray.runtime.config import EvaluateConfig
from dermray.stages.evaluate.inputs import EvalInputs, load_other_run, predictions_columns
from dermray.stages.evaluate.subsets import lesions
from dermray.stages.evaluate.tables import At, Tables


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
