"""The stage contract suite: every stage in ``dermray.stages.STAGES`` keeps the contracts of DESIGN.md, checked
here once for all of them (in the spirit of scikit-learn's ``parametrize_with_checks``). A stage added to the list
is held to every check by adding its case below.

The stages run once, in order, on a small real study (40 HAM10000 images: partition -> a one-epoch tiny model on
two folds -> scoring an archive with a missing file and a repeated id -> evaluation -> saliency), each from the same
run config file, and then again. Checks, per stage:
- a re-run with the same inputs changes nothing: every table it wrote is equal, no key repeats;
- the summary's counts add up: input = out + quarantined;
- every Parquet table it wrote passes its schema (columns, types, nulls, enumerations);
- a user error exits 2 with one line and no traceback, from the CLI and from jobs/;
- a planted secret appears in no output and no log line;
- every file it writes lies under <output>/<stage folder>/<run_id>/;
- its summary records a lineage whose id ``lineage_now`` reproduces without running it.
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from dermray import layout, schemas, stages
from dermray.cli import main
from dermray.config import load_config
from dermray.lineage import Lineage

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = "c"
SECRET = "planted-SECRET-7f3a9c"


@dataclass
class Case:
    tables: dict  # file name pattern -> TableSchema
    unique: dict = field(default_factory=dict)  # file name pattern -> key columns that never repeat
    bad: str = ""  # an override that is a user error: "{missing}" is a path that does not exist


CASES = {
    "partition": Case({"training_classes.parquet": schemas.TRAINING_CLASSES, "labels.parquet": schemas.LABELS,
                       "quarantine.parquet": schemas.QUARANTINE, "task_membership.parquet": schemas.TASK_MEMBERSHIP,
                       "fold_counts.parquet": schemas.FOLD_COUNTS, "near_duplicates.parquet": schemas.NEAR_DUPLICATES},
                      {"labels.parquet": ["image_id"]}, "data.manifest={missing}"),
    "train": Case({"quarantine.parquet": schemas.QUARANTINE, "metrics.parquet": schemas.TRAINING_METRICS,
                   "val_predictions.parquet": schemas.PREDICTIONS, "val_predictions_raw.parquet": None,
                   "train_summary.parquet": schemas.TRAIN_SUMMARY},
                  {"val_predictions.parquet": ["image_id"]}, "train.partition={missing}"),
    "score": Case({"part-*.parquet": schemas.PREDICTIONS, "quarantine*.parquet": schemas.QUARANTINE},
                  {"part-*.parquet": ["image_id"]}, "score.input={missing}.parquet"),
    "evaluate": Case({"metrics.parquet": schemas.METRICS, "roc.parquet": schemas.ROC,
                      "confusion.parquet": schemas.CONFUSION, "readers.parquet": schemas.READER_POINTS,
                      "calibration.parquet": schemas.CALIBRATION},
                     {"metrics.parquet": ["task", "subset", "metric"]}, "evaluate.predictions={missing}"),
    "saliency": Case({"saliency_index.parquet": schemas.SALIENCY_INDEX, "sanity.parquet": schemas.SANITY},
                     {"saliency_index.parquet": ["image_id", "task", "method"]}, "saliency.predictions={missing}"),
}


def test_every_stage_has_a_case():
    assert set(CASES) == set(stages.STAGES)


def snapshot(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@contextlib.contextmanager
def captured():
    """Everything a stage prints or logs in this process."""
    out, err, records = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield lambda: out.getvalue() + err.getvalue() + records.getvalue()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture(scope="module")
def study(ham_dir, tmp_path_factory, ray_local):
    """The inputs, one run config for every stage, and each stage's first and second run."""
    d = tmp_path_factory.mktemp("contract")
    labels = pd.read_csv(ham_dir / "labels.csv")
    subset = pd.concat([labels[labels.dx == dx].head(10) for dx in ("nv", "mel", "bkl", "bcc")])
    subset.to_csv(d / "labels.csv", index=False)
    assert main(["import", "ham10000", "--metadata", str(d / "labels.csv"), "--images", str(ham_dir / "images"),
                 "--output", str(d / "in")]) == 0
    man = pd.read_parquet(d / "in" / "manifest.parquet").sort_values("image_id")
    archive = pd.concat([man.head(20), man.head(1), man.head(1).assign(image_id="no-such-image",
                                                                       uri=str(d / "missing.jpg"))])
    archive.to_parquet(d / "archive.parquet", index=False)
    out = d / "out"
    config = {
        "run_id": RUN, "output": str(out),
        "data": {"manifest": str(d / "in" / "manifest.parquet"), "taxonomy": str(d / "in" / "taxonomy.parquet"),
                 "tasks": str(d / "in" / "tasks.yaml")},
        "partition": {"max_class_size": 8, "folds": 2},
        "train": {"arch": "mobilenet_v3_small", "weights": "none", "image_size": 32, "epochs": 1, "batch_size": 8,
                  "cpus_per_worker": 0.5, "data_cpus": 0.5},
        "score": {"input": str(d / "archive.parquet"), "checkpoints": [str(layout.train_dir(str(out), RUN))],
                  "batch_size": 8, "rows_per_file": 8, "cpus_per_actor": 0.5, "decode_cpus": 0.5},
        "evaluate": {"predictions": str(layout.predictions_dir(str(out), RUN)) + "/predictions",
                     "n_bootstrap": 20},
        "saliency": {"checkpoints": [str(layout.fold_dir(str(out), RUN, 0))],
                     "predictions": str(layout.predictions_dir(str(out), RUN)) + "/predictions",
                     "methods": ["gradient"], "k": 1, "audit_size": 2, "sanity_levels": 2, "cpus_per_actor": 0.5},
    }
    cfg_path = d / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    saved = {k: os.environ.get(k) for k in ("DERMRAY_PLANTED_SECRET", "RAY_AUTH_TOKEN")}
    os.environ["DERMRAY_PLANTED_SECRET"] = SECRET
    os.environ["RAY_AUTH_TOKEN"] = SECRET
    runs = {}
    try:
        for stage in stages.STAGES:
            runs[stage] = []
            for _ in range(2):
                before = snapshot(out) if out.exists() else {}
                with captured() as text:
                    summary = stages.module(stage).run(load_config(str(cfg_path)))
                    print(stages.module(stage).format_summary(summary))
                after = snapshot(out)
                changed = {f for f, t in after.items() if before.get(f) != t}
                runs[stage].append({"summary": summary, "changed": changed, "log": text(),
                                    "tables": read_tables(out, stage)})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"dir": d, "out": out, "config": cfg_path, "runs": runs}


def stage_root(out: pathlib.Path, stage: str) -> pathlib.Path:
    return pathlib.Path(layout.stage_dir(str(out), stage, RUN))


def read_tables(out: pathlib.Path, stage: str) -> dict[str, pd.DataFrame]:
    root = stage_root(out, stage)
    return {str(p.relative_to(root)): pq.read_table(p).to_pandas() for p in sorted(root.rglob("*.parquet"))}


def matching(case: Case, path: str):
    name = pathlib.PurePath(path).name
    for pattern, value in case.tables.items():
        if fnmatch.fnmatch(name, pattern):
            return pattern, value
    return None, None


@pytest.mark.parametrize("stage", stages.STAGES)
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


@pytest.mark.parametrize("stage", stages.STAGES)
def test_the_summary_counts_add_up(study, stage):
    for run in study["runs"][stage]:
        c = stages.module(stage).counts(run["summary"])
        assert c["in"] == c["out"] + c["quarantined"], (stage, c)
        assert c["in"] > 0
    if stage in ("partition", "score"):
        first = stages.module(stage).counts(study["runs"][stage][0]["summary"])
        assert first["quarantined"] >= (2 if stage == "score" else 0)


@pytest.mark.parametrize("stage", stages.STAGES)
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
ALSO_WRITES = {"evaluate": ("train/*/fold=*/model_card.json", "train/*/fold=*/model_card.md")}


@pytest.mark.parametrize("stage", stages.STAGES)
def test_every_file_lies_under_the_stage_folder_of_the_run(study, stage):
    prefix = str(stage_root(study["out"], stage).relative_to(study["out"]))
    for run in study["runs"][stage]:
        stray = sorted(f for f in run["changed"] if not f.startswith(prefix + os.sep)
                       and not any(fnmatch.fnmatch(f, pattern) for pattern in ALSO_WRITES.get(stage, ())))
        assert not stray, f"{stage} wrote outside {prefix}: {stray[:5]}"
    assert study["runs"][stage][0]["changed"], f"{stage} wrote nothing"


@pytest.mark.parametrize("stage", stages.STAGES)
def test_a_planted_secret_appears_in_no_output_and_no_log(study, stage):
    for run in study["runs"][stage]:
        assert SECRET not in run["log"], stage
    root = stage_root(study["out"], stage)
    for p in root.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), f"{stage}: {p}"


@pytest.mark.parametrize("stage", stages.STAGES)
def test_the_lineage_is_recorded_and_reproduced_without_running(study, stage):
    summary = study["runs"][stage][1]["summary"]
    recorded = Lineage.from_dict(summary["lineage"])
    assert recorded.stage == stage and recorded.id and recorded.inputs
    assert recorded.id == Lineage.from_dict(study["runs"][stage][0]["summary"]["lineage"]).id
    now = stages.module(stage).lineage_now(load_config(str(study["config"])), recorded)
    assert now.id == recorded.id, now.changes_from(recorded)
    assert {"dermray", "ray", "torch"} <= set(recorded.versions)


def _one_line_exit_2(proc: subprocess.CompletedProcess, what: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (what, proc.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, (what, err[-2000:])
    assert "error:" in err


@pytest.mark.parametrize("stage", stages.STAGES)
def test_a_user_error_exits_2_with_one_line_from_the_cli_and_from_jobs(study, stage):
    bad = CASES[stage].bad.format(missing=study["dir"] / "no-such-input")
    args = ["--config", str(study["config"]), "--set", bad, "--set", f"output={study['dir'] / 'err-out'}"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cli = subprocess.run([sys.executable, "-m", "dermray.cli", stage, *args], capture_output=True, text=True,
                         timeout=300, env=env, cwd=REPO)
    _one_line_exit_2(cli, f"dermray {stage}")
    job = subprocess.run([sys.executable, str(REPO / "jobs" / f"{stage}.py"), *args], capture_output=True, text=True,
                         timeout=300, env=env, cwd=REPO)
    _one_line_exit_2(job, f"jobs/{stage}.py")
