"""The distributed path (evaluate.distributed): AUCs from per-block score histograms over Ray Data, for inputs
larger than the driver's memory."""
from __future__ import annotations

import math
import time
from typing import cast

import numpy as np
import pyarrow as pa

from dermray.core import metrics as M
from dermray.core.formatting import strict_json
from dermray.core.inference import (
    NOT_IN_TASK,
    binary_task_score,
    membership_matrix,
    node_task_class,
    probs_matrix,
    task_class_of_labels,
)
from dermray.errors import UserError
from dermray.runtime.config import RunConfig
from dermray.stages.evaluate.inputs import EvalInputs
from dermray.stages.evaluate.shared import STAGE
from dermray.stages.evaluate.tables import At, Tables, headline, write_tables
from dermray.store import storage
from dermray.store.summaries import EvaluateSummary

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
    summary = EvaluateSummary(**summary).as_dict()
    storage.write_text(paths["summary"], strict_json(summary))
    return summary
