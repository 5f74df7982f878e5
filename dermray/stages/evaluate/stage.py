"""The evaluation stage's ``run``: read and check the inputs, every task on every subset, external validation,
the tables, plots and report, the summary (with the lineage) and the model card's test results."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from dermray.core.formatting import duration, flagged_points, fmt, strict_json
from dermray.core.report import render_plots, render_report, training_curves
from dermray.runtime import layout, progress, registry
from dermray.runtime.config import RunConfig
from dermray.stages.evaluate.distributed import run_distributed
from dermray.stages.evaluate.external import cohorts_of, external_validation
from dermray.stages.evaluate.inputs import (
    EvalInputs,
    load_other_run,
    load_readers,
    other_run_membership,
    predictions_columns,
    read_definitions,
)
from dermray.stages.evaluate.overlap import train_overlap
from dermray.stages.evaluate.per_task import EvalData, evaluate_task
from dermray.stages.evaluate.shared import STAGE
from dermray.stages.evaluate.subsets import lesions, subsets
from dermray.stages.evaluate.tables import Tables, headline, write_tables
from dermray.store import lineage, storage
from dermray.store.predictions import declared_columns, load_predictions
from dermray.store.summaries import EvaluateSummary


def evaluation_lineage(inp: EvalInputs, predictions_fp, readers_fp, compare_fp, cfg: RunConfig):
    ecfg = cfg.evaluate
    inputs = dict(inp.fingerprints) | {"predictions": predictions_fp}
    if readers_fp is not None:
        inputs["readers"] = readers_fp
    if compare_fp is not None:
        inputs["compare"] = compare_fp
    if ecfg.reference:
        inputs["reference"] = load_predictions(ecfg.reference, None, predictions_columns(ecfg)).attrs["fingerprint"]
    for name in ("compare", "reference"):  # the other run's probabilities are scored through its own membership
        uri = getattr(ecfg, name)
        fp = other_run_membership(uri)[1] if uri else None
        if fp is not None:
            inputs[f"{name}_task_membership"] = fp
    return registry.stage_lineage(STAGE, cfg, inputs)


def lineage_now(cfg: RunConfig, recorded: lineage.Lineage | None = None) -> lineage.Lineage:
    ecfg = cfg.evaluate
    inp = read_definitions(cfg)
    predictions = ecfg.predictions
    assert predictions is not None  # read_definitions checked it

    columns = predictions_columns(ecfg)
    declared = declared_columns(columns)
    pred = lineage.reuse(recorded, "predictions", predictions, lambda: load_predictions(
        predictions, ecfg.model_id, columns).attrs["fingerprint"], declared)
    compare = lineage.reuse(recorded, "compare", ecfg.compare, lambda: load_predictions(
        ecfg.compare, None, columns).attrs["fingerprint"], declared) if ecfg.compare else None
    readers = lineage.file_fingerprint(ecfg.readers) if ecfg.readers else None
    return evaluation_lineage(inp, pred, readers, compare, cfg)


def write_back(summary: dict, scored: dict) -> str | None:
    """The headline test numbers written into the model card of the model that scored the predictions (the one
    place outside <output>/metrics/<run_id> this stage writes, by design: a model card carries its test results):
    the ensemble's card when a train run's folds scored them together, else each fold model's. Returns the card's
    markdown, for the report's link."""
    import datetime as dt

    from dermray.runtime import artifacts, ensemble_card

    entry = {"evaluation": storage.redact(storage.parent(summary["outputs"]["metrics"])), "run_id": summary["run_id"],
             "model_id": ", ".join(summary["model_ids"]), "headline": summary["headline"],
             "predictions": summary["lineage"]["inputs"]["predictions"]["content"][:16],
             "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    checkpoints = scored.get("checkpoints", [])
    runs = {storage.parent(c.rstrip("/")) for c in checkpoints}
    run_dir = runs.pop() if len(checkpoints) > 1 and len(runs) == 1 else None
    ensemble = ensemble_card.read(run_dir) if run_dir else None
    if ensemble is not None and ensemble.model_id in summary["model_ids"]:
        assert run_dir is not None
        kept = [t for t in ensemble.test_metrics if t.get("evaluation") != entry["evaluation"]]
        return ensemble_card.write(ensemble.model_copy(update={"test_metrics": kept + [entry], "changelog": [
            *ensemble.changelog, {"when": entry["when"], "what": f"test results from {entry['evaluation']}"}]}),
            run_dir)
    first = None
    for fold_dir in checkpoints:
        card_uri = storage.join(fold_dir, artifacts.CARD_FILE)
        if not storage.exists(card_uri):
            continue
        card = artifacts.read_card(card_uri)
        kept = [t for t in card.test_metrics if t.get("evaluation") != entry["evaluation"]]
        card = card.model_copy(update={"test_metrics": kept + [entry], "changelog": card.changelog + [
            {"when": entry["when"], "what": f"test results from {entry['evaluation']}"}]})
        artifacts.write_card(artifacts.ModelCard.model_validate(card.model_dump()), fold_dir)
        first = first or storage.join(fold_dir, artifacts.CARD_MD)
    return first


def write_outputs(t: Tables, inp: EvalInputs, paths: dict, summary: dict) -> None:
    tasks = inp.tasks
    write_tables(t, paths)
    plots = render_plots(t, tasks) | training_curves(inp.histories)
    for name, png in plots.items():
        storage.write_bytes(storage.join(paths["plots"], name), png)
    md, page = render_report(summary, t, plots, tasks, summary.get("model_card"))
    storage.write_text(paths["report_md"], md)
    storage.write_text(paths["report_html"], page)
    storage.write_text(paths["summary"], strict_json(summary))


def run(cfg: RunConfig, base: str | None = None) -> dict:
    """Evaluate ``evaluate.predictions``; ``base`` overrides where the outputs go (the nightly job's date folder)."""
    t_start = time.perf_counter()
    ecfg = cfg.evaluate
    inp = read_definitions(cfg)
    assert ecfg.predictions is not None  # read_definitions checked it
    paths = layout.evaluate_outputs(base or layout.metrics_dir(cfg.output, cfg.run_id))
    if ecfg.distributed:
        return run_distributed(cfg, inp, paths, t_start)
    df = load_predictions(ecfg.predictions, ecfg.model_id, predictions_columns(ecfg))
    readers = load_readers(ecfg.readers)
    compare = load_other_run(ecfg.compare, predictions_columns(ecfg), df.attrs["probs"].shape[1],
                             inp) if ecfg.compare else None
    groups = lesions(df)
    unknown_label = int((~df["label"].isin(inp.tax.index.keys())).sum())
    subset_masks = subsets(df, ecfg.subgroups)
    overlap = train_overlap(df, inp, ecfg)
    if overlap.images:  # every metric again without the test images that copy training images
        subset_masks.append(("no_train_overlap", ~df["image_id"].isin(overlap.images).to_numpy()))
    t = Tables(train_overlap=overlap.pairs)
    excluded, evaluated = {}, np.zeros(len(df), bool)
    # One line at the end (more while it runs if it takes over 5 s; live on a terminal).
    meter = progress.Meter("evaluate", len(inp.tasks), unit="tasks")
    meter.extra = (f"; {len(df):,} images, {pd.Series(groups).nunique():,} lesions, {len(subset_masks)} subset(s), "
                   f"{ecfg.n_bootstrap:,} bootstrap resamples")
    test = EvalData(df, groups, subset_masks, readers, compare)
    for task in inp.tasks:
        excluded[task.name], used = evaluate_task(t, cfg.run_id, task, test, inp, ecfg)
        evaluated |= used
        meter.update()
    cohorts, reference = cohorts_of(df, ecfg, inp)
    if cohorts:
        assert reference is not None  # cohorts_of names the reference cohort whenever it returns cohorts
        external_validation(t, cfg.run_id, inp, cohorts, reference, ecfg)
    now = evaluation_lineage(inp, df.attrs["fingerprint"], lineage.file_fingerprint(ecfg.readers) if ecfg.readers
                             else None, compare.attrs["fingerprint"] if compare is not None else None, cfg)
    summary = {
        "stage": STAGE, "run_id": cfg.run_id, "predictions": storage.redact(ecfg.predictions), "images": len(df),
        "lesions": int(pd.Series(groups).nunique()),
        "biopsy_images": int((df["label_source"] == "biopsy").sum()) if "label_source" in df.columns else None,
        # Every prediction is evaluated by some task or lies outside every task (its label in no task class).
        "evaluated": int(evaluated.sum()), "outside_every_task": int((~evaluated).sum()),
        "model_ids": sorted(df["model_id"].unique().tolist()), "partition": storage.redact(inp.partition),
        "unknown_labels": unknown_label, "excluded": excluded, "train_overlap": overlap.summary(),
        "tasks": [t_.name for t_ in inp.tasks],
        "subsets": [s for s, _ in subset_masks], "headline": headline(t), "lineage": now.to_dict(), "outputs": paths,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    summary["model_card"] = write_back(summary, inp.scored)
    summary = EvaluateSummary(**summary).as_dict()
    write_outputs(t, inp, paths, summary)
    return summary


def counts(s: dict) -> dict:
    """Predictions in = evaluated by a task + outside every task (none is dropped silently)."""
    if s.get("mode") == "distributed":
        return {"in": None, "out": None, "quarantined": 0, "seconds": s["seconds"]}
    return {"in": s["images"], "out": s["evaluated"], "quarantined": s["outside_every_task"], "seconds": s["seconds"]}


def format_summary(s: dict) -> str:
    lines = [f"evaluate: run {s['run_id']}" + (f", {s['images']} images" if "images" in s else "")]
    lines += [f"  {w}" for w in flagged_points(s["headline"])]
    for h in s["headline"]:
        if h["metric"].startswith("carries_over@"):
            continue
        ci = f" [{fmt(h['ci_low'])}, {fmt(h['ci_high'])}]" if h["ci_low"] is not None else ""
        why = f"  ({h['note']})" if h["value"] is None and h.get("note") else ""
        lines.append(f"  {h['task']:<32} {h['subset']:<8} {h['metric']:<18} {fmt(h['value'])}{ci}  n={h['n']}{why}")
    for task, ex in s.get("excluded", {}).items():
        if ex["undefined_score"]:
            lines.append(f"  warning: {task}: {ex['undefined_score']} images have no probability in either class")
    if s.get("unknown_labels"):
        lines.append(f"  warning: {s['unknown_labels']} predictions carry a label that is not a taxonomy node")
    overlap = s.get("train_overlap") or {}
    if overlap.get("test_images"):
        lines.append(f"  warning: {overlap['test_images']} test images are near-duplicates of training images "
                     "(train_overlap.parquet); every metric is also given without them (subset no_train_overlap)")
    elif overlap and not overlap["checked"]:
        lines.append(f"  train-test overlap not checked: {overlap['not_checked']}")
    out = s["outputs"]
    lines.append(f"  report: {out.get('report_html', out.get('metrics'))}  ({duration(s['seconds'])})")
    return "\n".join(lines)
