"""``dermray pipeline``: partition -> train -> score -> evaluate -> saliency, one command.

The stages run in one Ray session (in-process by default, a cluster with ``--address`` / ``RAY_ADDRESS``). A
stage is skipped only when its summary records the lineage it would compute now (its inputs' fingerprints and
its config); otherwise it runs again and the table says why (``pipeline.force`` runs every stage). So an
interrupted run resumes where it stopped and never retrains a finished model, while a new manifest, seed or
setting reaches every stage it affects. The score stage scores the held-out test split
(``pipeline.test_manifest``, its biopsy-proven images by default) with the ensemble of the cross-validation fold
models; evaluate reads those predictions (with ``evaluate.readers``); saliency explains the first fold's model on
the best and worst scored test images.
"""
from __future__ import annotations

import json
import logging
import time
from typing import cast

import pyarrow.compute as pc

from dermray.core.formatting import duration, flagged_points, fmt, strict_json
from dermray.errors import UserError
from dermray.runtime import artifacts, layout, progress, registry
from dermray.runtime.config import RunConfig, derive
from dermray.store import lineage, storage

log = logging.getLogger("dermray.pipeline")


def test_split(cfg: RunConfig) -> str:
    """The test manifest to score: biopsy-proven rows only when asked, URIs made absolute (it is rewritten
    elsewhere). Written only when its content changed, so that an unchanged re-run sees the same file."""
    src = cfg.pipeline.test_manifest
    assert src is not None  # check() requires pipeline.test_manifest when score runs
    table = storage.read_table(src)
    base = storage.parent(src)
    table = table.set_column(table.column_names.index("uri"), "uri", storage.resolve_column(table.column("uri"), base))
    if cfg.pipeline.biopsy_only:
        if "label_source" not in table.column_names:
            raise UserError(f"{storage.redact(src)}: pipeline.biopsy_only needs a label_source column")
        table = table.filter(pc.equal(table.column("label_source"), "biopsy"))
        if table.num_rows == 0:
            raise UserError(f"{storage.redact(src)}: no biopsy-proven images (label_source == biopsy) to score")
    out = storage.join(layout.pipeline_dir(cfg.output, cfg.run_id), "test_split.parquet")
    if not storage.exists(out) or lineage.table_fingerprint(storage.read_table(out)) != lineage.table_fingerprint(
            table):
        storage.write_table(table, out)
    return out


def stage_config(cfg: RunConfig, stage: str) -> RunConfig:
    """The run config each stage sees: the pipeline wires each stage's inputs to the previous stages' outputs."""
    train_dir = layout.train_dir(cfg.output, cfg.run_id)
    predictions = storage.join(layout.predictions_dir(cfg.output, cfg.run_id), "predictions")
    partition = cfg.train.partition or layout.partition_dir(cfg.output, cfg.run_id)
    if stage == "score":
        return derive(cfg, {"score": {"input": test_split(cfg), "input_kind": "manifest",
                                      "checkpoints": cfg.score.checkpoints or [train_dir],
                                      "partition": cfg.score.partition or partition}})
    if stage == "evaluate":
        return derive(cfg, {"evaluate": {"predictions": cfg.evaluate.predictions or predictions,
                                         "partition": cfg.evaluate.partition or partition}})
    if stage == "saliency":
        folds = artifacts.fold_dirs(train_dir)
        if not folds and not cfg.saliency.checkpoints:
            raise UserError(f"saliency: no trained fold under {storage.redact(train_dir)}")
        return derive(cfg, {"saliency": {"checkpoints": cfg.saliency.checkpoints or [sorted(folds)[0]],
                                         "predictions": cfg.saliency.predictions or predictions,
                                         "partition": cfg.saliency.partition or partition}})
    return cfg


def decide(stage: str, scfg: RunConfig, force: bool) -> tuple[bool, str, dict | None]:
    """(run it?, why, the recorded summary): a stage runs when forced, when it has no summary, or when the lineage
    it would record now differs from the recorded one."""
    uri = layout.summary_uri(scfg.output, stage, scfg.run_id)
    if force or not storage.exists(uri):
        return True, "forced" if force else "not run yet", None
    summary = json.loads(storage.read_text(uri))
    recorded = lineage.Lineage.from_dict(summary["lineage"]) if "lineage" in summary else None
    if recorded is None:
        return True, "its output records no lineage", None
    now = registry.lineage_now(stage, scfg, recorded)
    changes = now.changes_from(recorded)
    return (True, "; ".join(changes), None) if changes else (False, "unchanged", summary)


def run_stage(cfg: RunConfig, stage: str, scfg: RunConfig, order: list[str]) -> dict:
    """Run one stage; the run's partition, once folds are trained on it, only through ``partition_aside``."""
    trained = "train" in order and not cfg.train.partition and storage.exists(layout.train_dir(cfg.output, cfg.run_id))
    if stage == "partition" and trained:
        return partition_aside(cfg, scfg)
    return registry.run(stage, scfg)


def partition_aside(cfg: RunConfig, scfg: RunConfig) -> dict:
    """Partition a run whose folds are trained: build the partition aside, ask train whether it can run on it (the
    folds' rows and classes unchanged, or train.force), and only then put it in place of the run's partition. A
    refusal leaves the run's partition as it was: its labels stay those the models were trained on."""
    from dermray.stages import train

    aside = storage.join(layout.pipeline_dir(cfg.output, cfg.run_id), "_staged")
    storage.delete(aside)
    try:
        registry.run("partition", derive(scfg, {"output": aside}))
        staged = layout.partition_dir(aside, cfg.run_id)
        try:
            train.check_can_run(cast(RunConfig, registry.view(
                derive(stage_config(cfg, "train"), {"train": {"partition": staged}}), "train")))
        except UserError as e:
            raise UserError(f"pipeline: the new partition is not applied (the run's partition is left as it was): "
                            f"{e}") from None
        return move_partition(staged, layout.partition_dir(cfg.output, cfg.run_id))
    finally:
        storage.delete(aside)


def move_partition(staged: str, target: str) -> dict:
    """Copy a partition's files from ``staged`` to ``target``, its summary (naming its files) last."""
    src, dst = layout.partition_outputs(staged), layout.partition_outputs(target)
    for name in layout.PARTITION_TABLES:
        if storage.exists(src[name]):
            storage.write_bytes(dst[name], storage.read_bytes(src[name]))
        else:
            storage.delete(dst[name])
    text = storage.read_text(src["summary"])
    for a, b in ((staged, target), (storage.redact(staged), storage.redact(target))):
        text = text.replace(json.dumps(a)[1:-1], json.dumps(b)[1:-1])
    storage.write_text(dst["summary"], text)
    return json.loads(text)


def check(cfg: RunConfig) -> list[str]:
    """The stages to run, in order, once everything the run needs before its first stage is checked (before Ray
    starts): each stage's inputs that the config sets (those the pipeline wires from earlier stages are checked
    when their stage runs), the test manifest, an S3 output's bucket."""
    order = [s for s in registry.STAGES if s in cfg.pipeline.stages]
    if "score" in order and not cfg.pipeline.test_manifest:
        raise UserError("pipeline: set pipeline.test_manifest (the held-out images to score), or leave score, "
                        "evaluate and saliency out of pipeline.stages")
    for stage in order:
        registry.preflight(stage, cfg)
    test_manifest = cfg.pipeline.test_manifest
    if "score" in order and test_manifest and not storage.exists(test_manifest):
        raise UserError(f"pipeline: pipeline.test_manifest {storage.redact(test_manifest)}: no such file or object")
    return order


def run(cfg: RunConfig) -> dict:
    from dermray.runtime.raysession import ray_session

    order = check(cfg)
    t0 = time.perf_counter()
    rows: list[dict] = []
    summaries: dict[str, dict] = {}
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        for i, stage in enumerate(order, 1):
            scfg = stage_config(cfg, stage)
            again, why, s = decide(stage, scfg, cfg.pipeline.force)
            if again:
                header = f"pipeline [{i}/{len(order)}] {stage}: running ({why})"
                if why == "not run yet":  # nothing to say but its place: the stage's first line begins "[2/5] "
                    progress.to_log_only("%s", header)
                    with progress.leading(f"[{i}/{len(order)}] ", f"[{i}/{len(order)}] {stage}: ran"):
                        s = run_stage(cfg, stage, scfg, order)
                else:  # forced, or what changed since its last run: worth a line
                    progress.say("%s", header)
                    s = run_stage(cfg, stage, scfg, order)
                status = "ran"
            else:
                assert s is not None  # decide() returns the recorded summary whenever it skips a stage
                progress.say("pipeline [%d/%d] %s: skipped (its inputs and settings are unchanged since its run%s)",
                             i, len(order), stage, ran_when(s))
                status = "skipped (done)"
            summaries[stage] = s
            rows.append({"stage": stage, "status": status, "why": why, **registry.module(stage).counts(s)})
    report = summaries.get("evaluate", {}).get("outputs", {}).get("report_html")
    summary = {"stage": "pipeline", "run_id": cfg.run_id, "stages": rows, "report": report,
               "headline": summaries.get("evaluate", {}).get("headline", []),
               "cross_validation": summaries.get("train", {}).get("summary", []),
               "saliency_gallery": summaries.get("saliency", {}).get("outputs", {}).get("gallery"),
               "lineage": {stage: s.get("lineage", {}).get("id") for stage, s in summaries.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
    storage.write_text(layout.summary_uri(cfg.output, "pipeline", cfg.run_id), strict_json(summary))
    return summary


def ran_when(summary: dict) -> str:
    """" of <when>, <how long>" for a recorded stage run ("" when its summary does not say: an older dermray)."""
    seconds = summary.get("seconds")
    seconds = seconds.get("total") if isinstance(seconds, dict) else seconds
    when = summary.get("finished_at")
    parts = ([when.replace("T", " ").replace("+00:00", " UTC")] if when else []) + (
        [f"{duration(seconds)} long"] if isinstance(seconds, (int, float)) else [])
    return f" of {', '.join(parts)}" if parts else ""


def counts(s: dict) -> dict:
    return {"in": None, "out": len(s["stages"]), "quarantined": 0, "seconds": s["seconds"]}


def format_summary(s: dict) -> str:
    # One line for the stages that ran and one for those skipped (issue 29: a six-line table in a 40-line budget);
    # the rows in and out of each are in pipeline_summary.json. A skipped stage's seconds are its earlier run's.
    ran = [f"{r['stage']} {duration(r['seconds'])}" + (f" ({r['quarantined']:,} quarantined)" if r["quarantined"]
                                                       else "")
           for r in s["stages"] if not r["status"].startswith("skipped")]
    skipped = [r["stage"] for r in s["stages"] if r["status"].startswith("skipped")]
    lines = [f"pipeline: run {s['run_id']} ({duration(s['seconds'])})" + (f": {', '.join(ran)}" if ran else "")]
    if skipped:
        lines.append(f"  skipped (inputs and settings unchanged): {', '.join(skipped)}")
    # The cross-validation figures are in the train summary, the ensemble's card and the report: not repeated here
    # (issue 29: 52 console lines for the demo, 40 the target).
    for h in s["headline"]:
        if h["metric"] in ("auc", "accuracy") and h["subset"] == "all":
            ci = f" [{fmt(h['ci_low'])}, {fmt(h['ci_high'])}]" if h.get("ci_low") is not None else ""
            lines.append(f"  test {h['task']:<32} {h['metric']:<9} {fmt(h['value'])}{ci}  n={h['n']}")
    lines += [f"  {w}" for w in flagged_points(s["headline"])]
    if s["report"]:
        lines.append(f"  report: {s['report']}")
    if s["saliency_gallery"]:
        lines.append(f"  saliency gallery: {s['saliency_gallery']}")
    return "\n".join(lines)
