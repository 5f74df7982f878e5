"""``dermray pipeline``: partition -> train -> score -> evaluate -> saliency, one command.

The stages run in one Ray session (in-process by default, a cluster with ``--address`` / ``RAY_ADDRESS``). Each is
skipped when its summary for this run already exists (``pipeline.force`` re-runs it), so a failed or interrupted
run resumes where it stopped and never retrains a finished model. The score stage scores the held-out test split
(``pipeline.test_manifest``, its biopsy-proven images by default) with the ensemble of the cross-validation fold
models; evaluate reads those predictions (with ``evaluate.readers`` for the reader comparison); saliency explains
the first fold's model on the best and worst scored test images.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from dermray import storage
from dermray.config import RunConfig
from dermray.errors import UserError

log = logging.getLogger("dermray.pipeline")
STAGES = ("partition", "train", "score", "evaluate", "saliency")


def summary_uri(cfg: RunConfig, stage: str) -> str:
    o, r = cfg.output, cfg.run_id
    return {"partition": storage.join(o, "partition", "partition_summary.json"),
            "train": storage.join(o, "train", r, "train_summary.json"),
            "score": storage.join(o, "predictions", r, "score_summary.json"),
            "evaluate": storage.join(o, "metrics", r, "evaluate_summary.json"),
            "saliency": storage.join(o, "saliency", r, "saliency_summary.json")}[stage]


def test_split(cfg: RunConfig) -> str:
    """The test manifest to score: biopsy-proven rows only when asked, URIs made absolute (it is rewritten
    elsewhere). Returns its URI."""
    src = cfg.pipeline.test_manifest
    table = storage.read_table(src)
    base = storage.parent(src)
    table = table.set_column(table.column_names.index("uri"), "uri",
                             pa.array([storage.resolve(u, base) if u else u for u in table.column("uri").to_pylist()],
                                      pa.string()))
    if cfg.pipeline.biopsy_only:
        if "label_source" not in table.column_names:
            raise UserError(f"{storage.redact(src)}: pipeline.biopsy_only needs a label_source column")
        table = table.filter(pc.equal(table.column("label_source"), "biopsy"))
        if table.num_rows == 0:
            raise UserError(f"{storage.redact(src)}: no biopsy-proven images (label_source == biopsy) to score")
    out = storage.join(cfg.output, "pipeline", cfg.run_id, "test_split.parquet")
    storage.write_table(table, out)
    return out


def stage_config(cfg: RunConfig, stage: str) -> RunConfig:
    """The run config each stage sees: the pipeline wires each stage's inputs to the previous stages' outputs."""
    train_dir = storage.join(cfg.output, "train", cfg.run_id)
    predictions = storage.join(cfg.output, "predictions", cfg.run_id, "predictions")
    partition = cfg.train.partition or storage.join(cfg.output, "partition")
    if stage == "score":
        return dataclasses.replace(cfg, score=dataclasses.replace(
            cfg.score, input=test_split(cfg), input_kind="manifest", checkpoints=cfg.score.checkpoints or [train_dir],
            partition=cfg.score.partition or partition))
    if stage == "evaluate":
        return dataclasses.replace(cfg, evaluate=dataclasses.replace(
            cfg.evaluate, predictions=cfg.evaluate.predictions or predictions,
            partition=cfg.evaluate.partition or partition))
    if stage == "saliency":
        folds = sorted(f for f in storage.list_files(train_dir, ("model_card.json",)) if "fold=all" not in f)
        if not folds and not cfg.saliency.checkpoints:
            raise UserError(f"saliency: no trained fold under {storage.redact(train_dir)}")
        return dataclasses.replace(cfg, saliency=dataclasses.replace(
            cfg.saliency, checkpoints=cfg.saliency.checkpoints or [storage.parent(folds[0])],
            predictions=cfg.saliency.predictions or predictions, partition=cfg.saliency.partition or partition))
    return cfg


def counts(stage: str, s: dict) -> dict:
    """rows in / out / quarantined of a stage summary, for the pipeline's table."""
    if stage == "partition":
        return {"in": s["input_rows"], "out": s["assigned"], "quarantined": s["quarantined"],
                "seconds": s["seconds"]["total"]}
    if stage == "train":
        return {"in": s["images"], "out": s["trained_on"], "quarantined": s["quarantined"], "seconds": s["seconds"]}
    if stage == "score":
        return {"in": s["input"], "out": s["run_scored_total"], "quarantined": s["run_quarantined_total"],
                "seconds": s["seconds"]}
    if stage == "evaluate":
        return {"in": s.get("images"), "out": len(s["headline"]), "quarantined": 0, "seconds": s["seconds"]}
    return {"in": s["selected"], "out": s["maps"], "quarantined": 0, "seconds": s["seconds"]}


def run(cfg: RunConfig) -> dict:
    from dermray import evaluate, partition, saliency, score, train
    from dermray.raysession import ray_session

    modules = {"partition": partition, "train": train, "score": score, "evaluate": evaluate, "saliency": saliency}
    unknown = [s for s in cfg.pipeline.stages if s not in STAGES]
    if unknown:
        raise UserError(f"pipeline.stages: unknown {unknown} (choose from {', '.join(STAGES)})")
    if "score" in cfg.pipeline.stages and not cfg.pipeline.test_manifest:
        raise UserError("pipeline: set pipeline.test_manifest (the held-out images to score), or leave score, "
                        "evaluate and saliency out of pipeline.stages")
    t0 = time.perf_counter()
    rows, summaries = [], {}
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        for stage in [s for s in STAGES if s in cfg.pipeline.stages]:
            uri = summary_uri(cfg, stage)
            if storage.exists(uri) and not cfg.pipeline.force:
                s = json.loads(storage.read_text(uri))
                status = "skipped (done)"
                log.info("pipeline: %s already done for run %s: skipped", stage, cfg.run_id)
            else:
                log.info("pipeline: %s ...", stage)
                s = modules[stage].run(stage_config(cfg, stage))
                status = "ran"
                log.info("pipeline: %s done", stage)
            summaries[stage] = s
            rows.append({"stage": stage, "status": status, **counts(stage, s)})
    report = summaries.get("evaluate", {}).get("outputs", {}).get("report_html")
    summary = {"stage": "pipeline", "run_id": cfg.run_id, "stages": rows, "report": report,
               "headline": summaries.get("evaluate", {}).get("headline", []),
               "cross_validation": summaries.get("train", {}).get("summary", []),
               "saliency_gallery": summaries.get("saliency", {}).get("outputs", {}).get("gallery"),
               "seconds": round(time.perf_counter() - t0, 1)}
    storage.write_text(storage.join(cfg.output, "pipeline", cfg.run_id, "pipeline_summary.json"),
                       json.dumps(summary, indent=2, default=str))
    return summary


def format_summary(s: dict) -> str:
    from dermray.evaluate import _fmt

    lines = [f"pipeline: run {s['run_id']} ({s['seconds']} s)",
             f"  {'stage':<10} {'status':<15} {'rows in':>8} {'out':>8} {'quarantined':>12} {'seconds':>8}"]
    for r in s["stages"]:
        lines.append(f"  {r['stage']:<10} {r['status']:<15} {r['in'] if r['in'] is not None else '-':>8} "
                     f"{r['out']:>8} {r['quarantined']:>12} {r['seconds']:>8}")
    for r in s["cross_validation"]:
        lines.append(f"  cross-validation {r['metric']:<28} {r['mean']:.3f} +- {r['sd']:.3f}")
    for h in s["headline"]:
        if h["metric"] in ("auc", "accuracy") and h["subset"] == "all":
            ci = f" [{_fmt(h['ci_low'])}, {_fmt(h['ci_high'])}]" if h.get("ci_low") is not None else ""
            lines.append(f"  test {h['task']:<32} {h['metric']:<9} {_fmt(h['value'])}{ci}  n={h['n']}")
    if s["report"]:
        lines.append(f"  report: {s['report']}")
    if s["saliency_gallery"]:
        lines.append(f"  saliency gallery: {s['saliency_gallery']}")
    return "\n".join(lines)
