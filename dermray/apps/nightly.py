"""The nightly scoring job: score tonight's new images with the current model (incrementally, into one run), evaluate
everything this model has scored, keep the night's metrics in a date partition, and fail loudly when a floor is
missed.

Outputs: the score run under ``<output>/predictions/<run_id>/`` (as ``dermray score --incremental``), the night's
full evaluation under ``<output>/metrics/<run_id>/date=<YYYY-MM-DD>/``, and the night's metrics table again under
``<output>/metrics/<run_id>/history/date=<YYYY-MM-DD>/metrics.parquet``, so that
``pd.read_parquet("<output>/metrics/<run_id>/history")`` gives every night with a ``date`` column.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import cast

import pandas as pd

from dermray.core.formatting import flagged_points, fmt, strict_json
from dermray.errors import UserError
from dermray.runtime import layout, registry
from dermray.runtime.config import RunConfig, derive
from dermray.stages import evaluate, score
from dermray.store import storage

log = logging.getLogger("dermray.nightly")
STAGE = "nightly"


class FloorMissed(UserError):
    """A configured quality floor was not met: the night's outputs are written, and the job must fail."""


def night(cfg: RunConfig) -> str:
    """nightly.date (checked when the config loads), else today in UTC."""
    return cfg.nightly.date or dt.datetime.now(dt.timezone.utc).date().isoformat()


def check_floors(cfg: RunConfig, scored: dict, metrics: pd.DataFrame) -> list[str]:
    """The floors missed, each as a sentence."""
    nc = cfg.nightly
    missed = []
    for task, floor in nc.min_auc.items():
        row = metrics[(metrics["task"] == task) & (metrics["subset"] == nc.auc_subset) & (metrics["metric"] == "auc")]
        if row.empty:
            raise UserError(f"nightly.min_auc names task {task!r}, subset {nc.auc_subset!r}, which the evaluation "
                            f"did not produce (tasks: {', '.join(sorted(metrics['task'].unique()))})")
        value = row["value"].iloc[0]
        if pd.isna(value) or value < floor:
            why = row["note"].iloc[0] if "note" in row and pd.isna(value) else f"{value:.3f}"
            missed.append(f"{task} AUC ({nc.auc_subset}) is {why}, below the floor {floor}")
    if nc.max_quarantined_share is not None:
        tonight = scored["scored"] + scored["quarantined"]
        share = scored["quarantined"] / tonight if tonight else 0.0
        if share > nc.max_quarantined_share:
            missed.append(f"{scored['quarantined']} of tonight's {tonight} images were quarantined ({share:.1%}), "
                          f"above the limit {nc.max_quarantined_share:.1%}")
    return missed


def run(cfg: RunConfig) -> dict:
    date = night(cfg)
    log.info("nightly %s: scoring %s incrementally into run %s", date, storage.redact(cfg.score.input or "?"),
             cfg.run_id)
    scored = registry.run("score", derive(cfg, {"score": {"incremental": True}}))
    log.info("nightly %s: %s", date, score.format_summary(scored).splitlines()[0])
    ev_cfg = derive(cfg, {"evaluate": {"predictions": scored["outputs"]["predictions"], "model_id": scored["model_id"],
                                       "partition": cfg.evaluate.partition or scored.get("partition")}})
    night_dir = storage.join(layout.metrics_dir(cfg.output, cfg.run_id), f"date={date}")
    ev = evaluate.run(cast(RunConfig, registry.view(ev_cfg, "evaluate")), base=night_dir)
    metrics = storage.read_table(ev["outputs"]["metrics"]).to_pandas()
    history = storage.join(layout.metrics_dir(cfg.output, cfg.run_id), "history", f"date={date}", "metrics.parquet")
    storage.write_table(storage.read_table(ev["outputs"]["metrics"]), history)
    missed = check_floors(cfg, scored, metrics)
    summary = {"stage": STAGE, "date": date, "run_id": cfg.run_id, "model_id": scored["model_id"],
               "scored_tonight": scored["scored"], "quarantined_tonight": scored["quarantined"],
               "already_scored": scored["already_done"], "changed_since_scored": scored["changed_since_scored"],
               "predictions_total": scored["run_scored_total"],
               "headline": ev["headline"], "floors_missed": missed,
               "outputs": {"predictions": scored["outputs"]["predictions"], "report": ev["outputs"]["report_html"],
                           "metrics_history": storage.parent(storage.parent(history))}}
    storage.write_text(storage.join(night_dir, "nightly_summary.json"), strict_json(summary))
    if missed:
        raise FloorMissed(f"nightly {date}: " + "; ".join(missed) + f" (report: {ev['outputs']['report_html']})")
    return summary


def format_summary(s: dict) -> str:
    changed = (f" ({s['changed_since_scored']} of them relabelled since they were scored)"
               if s.get("changed_since_scored") else "")
    lines = [f"nightly {s['date']}: {s['scored_tonight']} images scored{changed}, {s['quarantined_tonight']} "
             f"quarantined, {s['already_scored']} already scored; {s['predictions_total']} predictions by "
             f"{s['model_id']}"]
    for h in s["headline"]:
        if h["metric"] == "auc":
            lines.append(f"  {h['task']:<32} {h['subset']:<8} AUC {fmt(h['value'])}  n={h['n']}")
    lines += [f"  {w}" for w in flagged_points(s["headline"])]
    lines.append(f"  report: {s['outputs']['report']}")
    lines.append(f"  metrics by night: {s['outputs']['metrics_history']}")
    return "\n".join(lines)
