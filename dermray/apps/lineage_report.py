"""``dermray lineage``: the chain behind a run's numbers, for an auditor - manifest -> partition -> each fold's model
-> predictions -> metrics -> saliency - with each fingerprint, where it lives, and whether each link holds (the
model that scored is the run's trained ensemble, the metrics were computed from the predictions as they are now).
Reads only the summaries, model cards and lineage records the stages wrote; runs nothing.
"""
from __future__ import annotations

import json

from dermray.errors import UserError
from dermray.runtime import artifacts, layout
from dermray.runtime.registry import STAGES
from dermray.store import storage


def _summary(output: str, stage: str, run_id: str) -> dict | None:
    uri = layout.summary_uri(output, stage, run_id)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def _input_fingerprints(lin: dict) -> dict:
    return {name: {k: fp.get(k) for k in ("uri", "method", "content", "rows")}
            for name, fp in lin.get("inputs", {}).items()}


def chain(output: str, run_id: str) -> dict:
    """The run's lineage as a dict: one entry per stage that ran, plus the links between them."""
    summaries = {stage: _summary(output, stage, run_id) for stage in STAGES}
    if not any(summaries.values()):
        raise UserError(f"no stage outputs for run {run_id!r} under {storage.redact(output)}")
    out: dict = {"run_id": run_id, "output": storage.redact(output), "stages": {}, "links": []}
    for stage, s in summaries.items():
        if s is None:
            continue
        lin = s.get("lineage", {})
        out["stages"][stage] = {"where": storage.redact(layout.stage_dir(output, stage, run_id)),
                                "lineage_id": lin.get("id"), "config_hash": lin.get("config_hash"),
                                "inputs": _input_fingerprints(lin), "versions": lin.get("versions", {})}
    if summaries["train"]:
        folds = []
        for d in artifacts.fold_dirs(layout.train_dir(output, run_id), include_final=True):
            card = artifacts.read_card(storage.join(d, artifacts.CARD_FILE))
            folds.append({"fold": card.fold, "model_id": card.model_id, "weights_sha256": card.weights_sha256,
                          "where": storage.redact(d), "lineage_id": card.lineage.get("id"),
                          "labels": card.lineage.get("inputs", {}).get("labels", {}).get("content"),
                          "partition": card.lineage.get("partition")})
        out["stages"]["train"]["folds"] = folds
    out["links"] = links(output, run_id, summaries)
    return out


def links(output: str, run_id: str, s: dict) -> list[dict]:
    """Each link of the chain that can be checked, with whether it holds now."""
    found = []

    def link(name: str, holds: bool, detail: str) -> None:
        found.append({"link": name, "holds": bool(holds), "detail": detail})

    if s["partition"] and s["train"]:
        link("partition -> train", *trained_on_partition(output, run_id, s["train"]))
    if s["train"] and s["score"]:
        try:
            ensemble = artifacts.load_ensemble([layout.train_dir(output, run_id)]).model_id
        except UserError as e:
            ensemble = f"unreadable ({e})"
        link("train -> predictions", s["score"]["model_id"] == ensemble,
             f"scored by {s['score']['model_id']}; the run's fold ensemble is {ensemble}")
    if s["score"] and s["evaluate"]:
        pred = s["evaluate"].get("lineage", {}).get("inputs", {}).get("predictions", {})
        current = storage.identity(s["score"]["outputs"]["predictions"])
        link("predictions -> metrics", s["score"]["model_id"] in s["evaluate"].get("model_ids", []) and
             pred.get("identity") == current,
             f"metrics from predictions {str(pred.get('content'))[:8]} of {s['evaluate'].get('model_ids')}"
             + ("" if pred.get("identity") == current else "; the predictions changed since"))
    if s["train"] and s["saliency"]:
        first = sorted(artifacts.fold_dirs(layout.train_dir(output, run_id)))
        try:
            model = artifacts.load_ensemble([first[0]]).model_id if first else None
        except UserError as e:
            model = f"unreadable ({e})"
        link("model -> saliency", s["saliency"]["model_id"] == model,
             f"maps of {s['saliency']['model_id']}" + ("" if s["saliency"]["model_id"] == model else
                                                      f"; the model is {model}"))
    return found


def trained_on_partition(output: str, run_id: str, train_summary: dict) -> tuple[bool, str]:
    """(holds, detail): whether every fold was trained on the run's partition as it is now: the rows each fold's
    lineage recorded (image, class, held out or not) and the training classes, by content - an output tree copied
    elsewhere still holds, a partition rebuilt under the run id does not."""
    from dermray.stages.train.records import fold_rows
    from dermray.store import lineage

    part = layout.partition_dir(output, run_id)
    files = layout.partition_outputs(part)
    labels = storage.read_table(files["labels"], columns=["image_id", "class_index", "fold"]).sort_by("image_id")
    classes = artifacts.classes_hash(storage.read_table(files["training_classes"]))
    moved = []
    for d in artifacts.fold_dirs(layout.train_dir(output, run_id), include_final=True):
        card = artifacts.read_card(storage.join(d, artifacts.CARD_FILE))
        rows = fold_rows(labels, layout.FINAL_FOLD if card.held_out_fold is None else card.held_out_fold)
        recorded = card.lineage.get("inputs", {}).get("labels", {}).get("content")
        if card.classes_hash != classes or recorded != lineage.table_fingerprint(rows):
            moved.append(f"fold {card.fold}")
    if moved:
        return False, (f"{', '.join(moved)}: trained on other labels or classes than "
                       f"{storage.redact(files['labels'])} holds now (partitioned again since)")
    return True, (f"trained on the labels and classes {storage.redact(part)} holds "
                  f"(recorded: {train_summary.get('partition')})")


def format_chain(c: dict) -> str:
    lines = [f"lineage of run {c['run_id']} under {c['output']}"]
    for stage, st in c["stages"].items():
        lines.append(f"{stage:<10} {st['where']}  lineage {str(st['lineage_id'])[:12]}, config {st['config_hash']}")
        for name, fp in st["inputs"].items():
            rows = f", {fp['rows']:,} rows" if fp.get("rows") is not None else ""
            where = f"  {fp['uri']}" if fp.get("uri") else ""
            lines.append(f"    {name:<18} {fp['method']} {str(fp['content'])[:16]}{rows}{where}")
        for f in st.get("folds", []):
            lines.append(f"    fold {f['fold']}: {f['model_id']}  weights sha256 {str(f['weights_sha256'])[:16]}, "
                         f"labels {str(f['labels'])[:8]}")
    for link in c["links"]:
        lines.append(f"{'ok' if link['holds'] else 'BROKEN':<6} {link['link']}: {link['detail']}")
    return "\n".join(lines)
