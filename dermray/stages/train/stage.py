"""The training stage's ``run``: plan, check every fold's lineage before anything is written, train the folds
not finished (concurrently), lock the decisions, write the summary."""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd
import pyarrow as pa

from dermray.core.formatting import duration, fmt, strict_json
from dermray.runtime import faults, layout, progress, trainloop
from dermray.runtime.config import RunConfig
from dermray.stages.train.data import datasets_for, quarantine_unreadable, split_rows
from dermray.stages.train.decisions import lock_decisions, not_estimable_tasks, write_decisions, write_ensemble_card
from dermray.stages.train.fold import FittedFold, finish_fold, fit_fold, fold_job
from dermray.stages.train.plan import TrainPlan, plan
from dermray.stages.train.records import (
    adopt_older_record,
    check_fold_lineage,
    finished_fold,
    fold_lineage,
    record_fold_lineage,
    run_lineage,
)
from dermray.stages.train.shared import FINAL, STAGE
from dermray.store import lineage, storage
from dermray.store.summaries import TrainSummary


def train_folds(p: TrainPlan, folds: list, table: pa.Table, cfg: RunConfig, lineages: dict) -> list[FittedFold]:
    """The TorchTrainers of ``folds``, all at once (threads: each fit() blocks while its worker trains)."""
    from dermray.store.models import spec

    size = cfg.train.image_size or spec(cfg.train.arch).input_size
    hooks = faults.from_env()
    with progress.Relay(len(folds), trainloop.MERGERS) as lines, \
            concurrent.futures.ThreadPoolExecutor(max_workers=len(folds)) as pool:
        lines.starting(f"train: starting {len(folds)} Ray Train workers and their data pipelines")
        split = {fold: split_rows(fold, table, cfg.train) for fold in folds}
        progress.say("%s", fold_sizes(split))
        futures = []
        for fold, rows in split.items():
            job = fold_job(fold, p, cfg, "select" in rows, lineages[str(fold)].id, hooks, lines.queue)
            futures.append(pool.submit(fit_fold, job, datasets_for(fold, rows, cfg, size), rows.get("val"), p.run_dir,
                                       cfg))
        return [f.result() for f in futures]


def fold_sizes(split: dict) -> str:
    """One line for every fold's images: to train on, to select the epoch, held out (ranges over the folds)."""
    def count(part: str, none: str) -> str:
        n = [rows[part].num_rows for rows in split.values() if part in rows]
        if len(n) < len(split):
            return none if not n else f"{min(n):,}-{max(n):,} (some: {none})"
        return f"{n[0]:,}" if min(n) == max(n) else f"{min(n):,}-{max(n):,}"

    head = f"train: fold {next(iter(split))}:" if len(split) == 1 else f"train: {len(split)} folds, each"
    return (f"{head} {count('train', 'none')} images to train on, {count('select', 'no')} to select the epoch, "
            f"{count('val', 'none')} held out")


def run(cfg: RunConfig) -> dict:
    """Train every requested fold (concurrently) and write the per-fold and summary outputs."""
    from dermray.runtime.raysession import check_shared_storage, ray_session

    t_start = time.perf_counter()
    p = plan(cfg)
    lineages = {str(fold): fold_lineage(fold, p, cfg) for fold in p.folds}
    clear = {str(fold): check_fold_lineage(fold, layout.fold_dir(cfg.output, cfg.run_id, fold), lineages[str(fold)],
                                           cfg.train.force) for fold in p.folds}
    for fold in p.folds:
        if not clear[str(fold)]:
            adopt_older_record(layout.fold_dir(cfg.output, cfg.run_id, fold), lineages[str(fold)])
    finished = {str(fold): None if clear[str(fold)] else
                finished_fold(layout.fold_dir(cfg.output, cfg.run_id, fold), lineages[str(fold)]) for fold in p.folds}
    for fold, record in finished.items():
        if record is not None:
            progress.say("train: fold %s: finished earlier from the same inputs (lineage %s): not trained again",
                         fold, record["lineage_id"][:8])
    todo = [fold for fold in p.folds if finished[str(fold)] is None]
    rows: dict[str, dict] = {}
    if todo:
        with ray_session(cfg.ray.address, cfg.ray.num_cpus):
            first_local = storage.first_local(p.table.column("uri"))
            check_shared_storage(cfg.storage, {"output": cfg.output, "image URI (in the manifest)": first_local})
            for fold in todo:  # written only once the run is known to be possible
                record_fold_lineage(layout.fold_dir(cfg.output, cfg.run_id, fold), lineages[str(fold)],
                                    clear[str(fold)])
            training = quarantine_unreadable(p.table, cfg, p.run_dir)
            results = train_folds(p, todo, training.table, cfg, lineages)
        rows = {fitted.job.fold: finish_fold(fitted, cfg, p, training, lineages[fitted.job.fold]) for fitted in results}
        used, n_bad = training.table.num_rows, training.quarantined
    else:  # every fold finished: the counts they recorded (the same inputs, so the same images)
        record = finished[str(p.folds[0])]
        assert record is not None  # nothing to do: every fold finished
        used, n_bad = record["images"] - record["quarantined"], record["quarantined"]
    # A fold not trained now finished earlier.
    fold_rows = [rows.get(str(fold)) or cast(dict, finished[str(fold)])["row"] for fold in p.folds]
    with progress.working("train: locking the decisions on the images no fold model trained on, writing the cards"):
        locked = lock_decisions(cfg, p, fold_rows)
        calibration, points = locked.calibration, locked.points
        cv = cv_summary(fold_rows, p.task_names)
        write_decisions(cfg, p.folds, calibration, points, cv, not_estimable_tasks(cfg, p))
        write_ensemble_card(cfg, p, fold_rows, cv.to_dict(orient="records"), locked)
    return summarise(cfg, p, Trained(fold_rows, used, n_bad), lineages, time.perf_counter() - t_start,
                     {"calibration": calibration, "operating_points": points,
                      "out_of_fold_auc": locked.out_of_fold_auc})


def cv_summary(fold_rows: list[dict], task_names: list[str]) -> pd.DataFrame:
    """Mean and sd over the cross-validation folds of each validation metric (Extended Data Table 2 form)."""
    cv = [r for r in fold_rows if r["fold"] != FINAL]
    keys = ["val_top1", "val_loss"] + [f"val_acc_{t}" for t in task_names]
    rows = []
    for k in keys:
        vals = np.array([r[k] for r in cv if k in r], dtype=float)
        if len(vals):
            rows.append({"metric": k, "mean": float(np.nanmean(vals)),
                         "sd": float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else float("nan"), "folds": len(vals)})
    return pd.DataFrame(rows, columns=["metric", "mean", "sd", "folds"])


def lineage_now(cfg: RunConfig, recorded: lineage.Lineage | None = None) -> lineage.Lineage:
    p = plan(cfg)
    return run_lineage({str(fold): fold_lineage(fold, p, cfg) for fold in p.folds}, p, cfg)


@dataclass(frozen=True)
class Trained:
    """What the run's folds came to: each fold's summary row (trained now or finished earlier), and the images
    used and quarantined."""
    fold_rows: list[dict]
    used: int
    quarantined: int


def summarise(cfg: RunConfig, p: TrainPlan, trained: Trained, lineages: dict, seconds: float, decided: dict) -> dict:
    fold_rows, used, n_bad = trained.fold_rows, trained.used, trained.quarantined
    table = cv_summary(fold_rows, p.task_names)
    storage.write_table(pa.Table.from_pandas(table, preserve_index=False),
                        storage.join(p.run_dir, "train_summary.parquet"))
    summary = {"stage": STAGE, "run_id": cfg.run_id, "arch": cfg.train.arch, "folds": [str(f) for f in p.folds],
               "images": used + n_bad, "trained_on": used, "quarantined": n_bad, "per_fold": fold_rows,
               "summary": table.to_dict(orient="records"), "partition": storage.redact(p.partition), **decided,
               "lineage": run_lineage(lineages, p, cfg).to_dict(),
               "outputs": {"run": p.run_dir, "summary": storage.join(p.run_dir, "train_summary.parquet")},
               "seconds": round(seconds, 1)}
    summary = TrainSummary(**summary).as_dict()
    storage.write_text(layout.summary_uri(cfg.output, STAGE, cfg.run_id), strict_json(summary))
    return summary


def counts(s: dict) -> dict:
    return {"in": s["images"], "out": s["trained_on"], "quarantined": s["quarantined"], "seconds": s["seconds"]}


def format_summary(s: dict) -> str:
    lines = [f"train: {s['arch']}, run {s['run_id']}, folds {', '.join(s['folds'])}: {s['images']} images = "
             f"{s['trained_on']} used + {s['quarantined']} quarantined ({duration(s['seconds'])})"]
    for r in s["per_fold"]:
        lines.append(f"  fold {r['fold']}: {r['epochs']} epochs, best epoch {r['best_epoch']}, "
                     + ", ".join(f"{k}={fmt(v)}" for k, v in r.items() if k.startswith("val_")))
    for r in s["summary"]:
        lines.append(f"  {r['metric']:<32} {fmt(r['mean'])} +- {fmt(r['sd'])} over {r['folds']} folds")
    if s.get("calibration"):
        lines.append(f"  calibration: temperature {s['calibration']['temperature']:.2f} (NLL "
                     f"{s['calibration']['nll_before']:.3f} -> {s['calibration']['nll_after']:.3f}, out of fold)")
    for pt in s.get("operating_points", []):
        lines.append(f"  locked {pt['task']} {pt['name']}: threshold {pt['threshold']:.3f} (out of fold: sensitivity "
                     f"{pt['sensitivity']:.3f}, specificity {pt['specificity']:.3f})")
    lines.append(f"  outputs: {s['outputs']['run']}")
    return "\n".join(lines)
