"""The stage contract suite: every stage in ``dermray.stages.STAGES`` keeps the contracts of docs/design.md, checked
here once for all of them (in the spirit of scikit-learn's ``parametrize_with_checks``). A stage added to the list
is held to every check by adding its case below.

The stages ran once, in order, on the shared synthetic study (tests/study.py: partition -> a two-epoch tiny model
on two folds -> scoring an archive with a missing file and a repeated id -> evaluation -> saliency), each from the
same run config file, and then again. It needs no real data. Checks, per stage:
- a re-run with the same inputs changes nothing: every table it wrote is equal, no key repeats;
- the summary's counts add up: input = out + quarantined;
- every Parquet table it wrote passes its schema (columns, types, nulls, enumerations);
- a user error exits 2 with one line and no traceback, from the CLI and from jobs/ (in this process: one
  subprocess smoke test per entry point lives in tests/system/test_entrypoints.py);
- a planted secret appears in no output and no log line;
- every file it writes lies under <output>/<stage folder>/<run_id>/;
- its summary records a lineage whose id ``lineage_now`` reproduces without running it;
- every config value it declares (but its tuning) is in that lineage: changing one names it among the changes.
"""
from __future__ import annotations

import fnmatch
import json
import os
import pathlib
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dermray.cli import main
from dermray.runtime import registry
from dermray.runtime.config import load_config
from dermray.store import schemas
from dermray.store.lineage import Lineage

from helpers import run_job
from study import SECRET, stage_root

REPO = pathlib.Path(__file__).resolve().parents[2]


@dataclass
class Case:
    tables: dict  # file name pattern -> TableSchema
    unique: dict = field(default_factory=dict)  # file name pattern -> key columns that never repeat
    bad: str = ""  # an override that is a user error: "{missing}" is a path that does not exist


CASES = {
    "partition": Case({"training_classes.parquet": schemas.TRAINING_CLASSES, "labels.parquet": schemas.LABELS,
                       "quarantine.parquet": schemas.QUARANTINE, "task_membership.parquet": schemas.TASK_MEMBERSHIP,
                       "fold_counts.parquet": schemas.FOLD_COUNTS, "near_duplicates.parquet": schemas.NEAR_DUPLICATES,
                       "image_hashes.parquet": schemas.IMAGE_HASHES},
                      {"labels.parquet": ["image_id"]}, "data.manifest={missing}"),
    "train": Case({"quarantine.parquet": schemas.QUARANTINE, "metrics.parquet": schemas.TRAINING_METRICS,
                   "val_predictions.parquet": schemas.PREDICTIONS, "val_predictions_raw.parquet": None,
                   "train_summary.parquet": schemas.TRAIN_SUMMARY,
                   "locking_predictions.parquet": schemas.LOCKING_PREDICTIONS},
                  {"val_predictions.parquet": ["image_id"]}, "train.partition={missing}"),
    "score": Case({"part-*.parquet": schemas.PREDICTIONS, "quarantine*.parquet": schemas.QUARANTINE},
                  {"part-*.parquet": ["image_id"]}, "score.input={missing}.parquet"),
    "evaluate": Case({"metrics.parquet": schemas.METRICS, "roc.parquet": schemas.ROC,
                      "confusion.parquet": schemas.CONFUSION, "readers.parquet": schemas.READER_POINTS,
                      "calibration.parquet": schemas.CALIBRATION, "train_overlap.parquet": schemas.TRAIN_OVERLAP},
                     {"metrics.parquet": ["task", "subset", "metric"]}, "evaluate.predictions={missing}"),
    "saliency": Case({"saliency_index.parquet": schemas.SALIENCY_INDEX, "sanity.parquet": schemas.SANITY},
                     {"saliency_index.parquet": ["image_id", "task", "method"]}, "saliency.predictions={missing}"),
}


def test_every_stage_has_a_case():
    assert set(CASES) == set(registry.STAGES)


def matching(case: Case, path: str):
    name = pathlib.PurePath(path).name
    for pattern, value in case.tables.items():
        if fnmatch.fnmatch(name, pattern):
            return pattern, value
    return None, None


@pytest.mark.parametrize("stage", registry.STAGES)
def test_a_rerun_with_the_same_inputs_changes_nothing(study, stage):
    first, second = study["runs"][stage]
    assert set(first["tables"]) == set(second["tables"]), stage
    for name, table in first["tables"].items():
        pd.testing.assert_frame_equal(table, second["tables"][name], check_like=True, obj=f"{stage}: {name}")
    case = CASES[stage]
    for name, table in second["tables"].items():
        for pattern, keys in case.unique.items():
            if fnmatch.fnmatch(pathlib.PurePath(name).name, pattern):
                assert not table.duplicated(keys).any(), f"{stage}: {name} repeats {keys}"
    # The predictions read as one table (every part): each image once.
    if stage == "score":
        preds = pd.read_parquet(stage_root(study["out"], "score") / "predictions")
        assert preds["image_id"].is_unique and len(preds) == 20


@pytest.mark.parametrize("stage", registry.STAGES)
def test_the_summary_counts_add_up(study, stage):
    for run in study["runs"][stage]:
        c = registry.module(stage).counts(run["summary"])
        assert c["in"] == c["out"] + c["quarantined"], (stage, c)
        assert c["in"] > 0
    if stage in ("partition", "score"):
        first = registry.module(stage).counts(study["runs"][stage][0]["summary"])
        assert first["quarantined"] >= (2 if stage == "score" else 0)


@pytest.mark.parametrize("stage", registry.STAGES)
def test_every_output_table_passes_its_schema(study, stage):
    case = CASES[stage]
    tables = study["runs"][stage][1]["tables"]
    assert tables, stage
    root = stage_root(study["out"], stage)
    for name in tables:
        pattern, schema = matching(case, name)
        assert pattern is not None, f"{stage} wrote {name}, a table no schema describes"
        if schema is not None:
            schemas.check_table(pq.read_table(root / name), schema, f"{stage}: {name}")


# The documented exception: evaluate writes the test results into the model cards of the models it evaluated.
# A model card carries its test results: the ensemble's card when the folds scored together, else each fold's.
ALSO_WRITES = {"evaluate": ("train/*/fold=*/model_card.json", "train/*/fold=*/model_card.md",
                            "train/*/ensemble_card.json", "train/*/ensemble_card.md")}


@pytest.mark.parametrize("stage", registry.STAGES)
def test_every_file_lies_under_the_stage_folder_of_the_run(study, stage):
    prefix = str(stage_root(study["out"], stage).relative_to(study["out"]))
    for run in study["runs"][stage]:
        stray = sorted(f for f in run["changed"] if not f.startswith(prefix + os.sep)
                       and not any(fnmatch.fnmatch(f, pattern) for pattern in ALSO_WRITES.get(stage, ())))
        assert not stray, f"{stage} wrote outside {prefix}: {stray[:5]}"
    assert study["runs"][stage][0]["changed"], f"{stage} wrote nothing"


@pytest.mark.parametrize("stage", registry.STAGES)
def test_every_json_file_is_strict_json(study, stage):
    """Every .json a stage wrote (summary, model cards, records) parses with a strict parser: no bare NaN or
    Infinity, which Python writes and browsers, jq and most other languages refuse (issue 29: saliency's summary)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    files = sorted(p for p in stage_root(study["out"], stage).rglob("*.json"))
    assert files, f"{stage} wrote no JSON"
    for p in files:
        try:
            json.loads(p.read_text(), parse_constant=refuse)
        except ValueError as e:
            raise AssertionError(f"{stage}: {p.relative_to(study['out'])}: {e}") from None


@pytest.mark.parametrize("stage", registry.STAGES)
def test_a_planted_secret_appears_in_no_output_and_no_log(study, stage):
    for run in study["runs"][stage]:
        assert SECRET not in run["log"], stage
    root = stage_root(study["out"], stage)
    for p in root.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), f"{stage}: {p}"


@pytest.mark.parametrize("stage", registry.STAGES)
def test_the_lineage_is_recorded_and_reproduced_without_running(study, stage):
    summary = study["runs"][stage][1]["summary"]
    recorded = Lineage.from_dict(summary["lineage"])
    assert recorded.stage == stage and recorded.id and recorded.inputs
    assert recorded.id == Lineage.from_dict(study["runs"][stage][0]["summary"]["lineage"]).id
    now = registry.lineage_now(stage, load_config(str(study["config"])), recorded)
    assert now.id == recorded.id, now.changes_from(recorded)
    assert {"dermray", "ray", "torch"} <= set(recorded.versions)


@pytest.mark.parametrize("stage", registry.STAGES)
def test_the_summary_is_its_typed_record(study, stage):
    """What ``run`` returned and what the summary file holds are the stage's summary record (StageSpec.summary_type),
    every key declared there; a key the record does not declare is refused."""
    from pydantic import ValidationError

    spec = registry.REGISTRY[stage]
    text = (stage_root(study["out"], stage) / spec.summary_file).read_text()
    record = registry.read_summary(stage, text)
    assert record.as_dict() == json.loads(text) == study["runs"][stage][1]["summary"]
    with pytest.raises(ValidationError, match="undeclared"):
        spec.summary_record(**json.loads(text), undeclared=1)


def _changed(value):
    """Another valid value of a number or a flag (None for any other kind: strings, lists, None)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value * 0.9, 6) if value else 0.1
    return None


def _changed_settings(stage: str, cfg) -> dict[str, object]:
    """Every declared number and flag of ``stage`` (not its tuning, not its inputs) with another valid value."""
    out = {}
    for section, values in registry.declared_values(stage, cfg).items():
        for key, value in values.items():
            if key not in ("final_model", "folds") and _changed(value) is not None:  # train: which folds exist
                out[f"{section}.{key}"] = _changed(value)
    return out


@pytest.mark.parametrize("stage", registry.STAGES)
def test_every_declared_setting_is_in_the_lineage(study, stage):
    """Issue 27: a stage's lineage listed config keys by hand, and forgot some (train.max_pixels decides which images
    a fold trains on; it was in no lineage). Every declared number and flag changed at once: the lineage
    ``lineage_now`` computes names each of them among its changes, and train's folds refuse to resume naming
    each of the fold's own settings - not the decisions' (evaluate.target_sensitivity re-locks, never retrains)."""
    base = load_config(str(study["config"]))
    settings = _changed_settings(stage, base)
    assert len(settings) >= 2, settings
    changed = load_config(str(study["config"]), [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    recorded = Lineage.from_dict(study["runs"][stage][1]["summary"]["lineage"])
    said = "; ".join(registry.lineage_now(stage, changed, recorded).changes_from(recorded))
    assert [k for k in settings if f"{k} " not in said] == [], said
    if stage == "train":
        from dermray.errors import UserError
        from dermray.stages import train

        with pytest.raises(UserError) as refused:
            train.check_can_run(registry.view(changed, "train"))
        fold_settings = [k for k in settings if k.startswith(("train.", "transforms."))]
        assert "train.max_pixels" in fold_settings
        assert [k for k in fold_settings if f"{k} " not in str(refused.value)] == [], str(refused.value)
        assert "evaluate.target_sensitivity" not in str(refused.value)


def _one_line_exit_2(code: int, err: str, what: str) -> None:
    err = err.strip()
    assert code == 2, (what, code, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, (what, err[-2000:])
    assert "error:" in err


@pytest.mark.parametrize("stage", registry.STAGES)
def test_a_user_error_exits_2_with_one_line_from_the_cli_and_from_jobs(study, stage, capfd):
    bad = CASES[stage].bad.format(missing=study["dir"] / "no-such-input")
    args = ["--config", str(study["config"]), "--set", bad, "--set", f"output={study['dir'] / 'err-out'}"]
    capfd.readouterr()
    code = main([stage, *args])
    _one_line_exit_2(code, capfd.readouterr().err, f"dermray {stage}")
    code = run_job(stage, args)
    _one_line_exit_2(code, capfd.readouterr().err, f"jobs/{stage}.py")
