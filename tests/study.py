"""The shared synthetic study of the stage tier: built once per test session, read by every stage test.

`dermray synth` draws a small study (60 training lesions, 30 held-out lesions, 32 px images); one run config file
drives every stage in order - partition -> a two-epoch tiny model on two folds -> scoring an archive of held-out
images with a missing file and a repeated id -> evaluation with the readers -> saliency - and then again, each
stage's second run with the same inputs. Each run's summary, console and log text, the files it changed and the
tables it wrote are kept, so that the stage contract suite and the stage tests judge one set of runs instead of
training again. A test that needs to change something copies what it changes, never changes the study itself.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib

import pandas as pd
import pyarrow.parquet as pq
import yaml

RUN = "c"
SECRET = "planted-SECRET-7f3a9c"  # planted as a credential and a Ray token while the stages run
SYNTH = ["--lesions", "60", "--test-lesions", "30", "--size", "32", "--seed", "7"]


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


def run_config(d: pathlib.Path) -> dict:
    from dermray.runtime import layout

    out, data = d / "out", d / "data"
    predictions = str(layout.predictions_dir(str(out), RUN)) + "/predictions"
    return {
        "run_id": RUN, "output": str(out),
        "data": {"manifest": str(data / "manifest.parquet"), "taxonomy": str(data / "taxonomy.parquet"),
                 "tasks": str(data / "tasks.yaml")},
        "partition": {"max_class_size": 12, "folds": 2},
        # selection_fraction 0.3: ~35 of the 110 training images no fold model trains on, 8 of them melanomas -
        # what the operating points are locked on (at 0.1: 10 images, no melanoma)
        "train": {"arch": "mobilenet_v3_small", "weights": "none", "image_size": 32, "epochs": 2, "batch_size": 8,
                  "cpus_per_worker": 0.5, "data_cpus": 0.5, "selection_fraction": 0.3},
        "score": {"input": str(data / "archive.parquet"), "checkpoints": [str(layout.train_dir(str(out), RUN))],
                  "batch_size": 8, "rows_per_file": 8, "cpus_per_actor": 0.5, "decode_cpus": 0.5},
        "evaluate": {"predictions": predictions, "readers": str(data / "readers.parquet"), "n_bootstrap": 20},
        "saliency": {"checkpoints": [str(layout.fold_dir(str(out), RUN, 0))], "predictions": predictions,
                     "methods": ["gradient"], "k": 1, "audit_size": 2, "sanity_levels": 2, "cpus_per_actor": 0.5},
    }


def write_archive(data: pathlib.Path) -> pd.DataFrame:
    """The archive score reads: the first 20 held-out images (URIs relative to the manifest), one of them listed
    twice, and one whose file does not exist."""
    test = pd.read_parquet(data / "test_manifest.parquet").sort_values("image_id")
    missing = test.head(1).assign(image_id="no-such-image", uri="images/missing.jpg")
    archive = pd.concat([test.head(20), test.head(1), missing], ignore_index=True)
    archive.to_parquet(data / "archive.parquet", index=False)
    return archive


def stage_root(out: pathlib.Path, stage: str) -> pathlib.Path:
    from dermray.runtime import layout

    return pathlib.Path(layout.stage_dir(str(out), stage, RUN))


def read_tables(out: pathlib.Path, stage: str) -> dict[str, pd.DataFrame]:
    root = stage_root(out, stage)
    return {str(p.relative_to(root)): pq.read_table(p).to_pandas() for p in sorted(root.rglob("*.parquet"))}


def build(d: pathlib.Path) -> dict:
    """Draw the data, write the run config, run every stage twice. Returns {"dir", "data", "out", "config",
    "runs": {stage: [first, second]}} with each run's summary, log text, changed files and tables."""
    from dermray.cli import main
    from dermray.runtime import faults, registry
    from dermray.runtime.config import load_config

    data, out = d / "data", d / "out"
    assert main(["synth", "--output", str(data), *SYNTH]) == 0
    write_archive(data)
    cfg_path = d / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(d)))
    saved = {k: os.environ.get(k) for k in ("DERMRAY_PLANTED_SECRET", "RAY_AUTH_TOKEN", faults.ENV)}
    os.environ["DERMRAY_PLANTED_SECRET"] = SECRET
    os.environ["RAY_AUTH_TOKEN"] = SECRET
    runs: dict[str, list[dict]] = {}
    try:
        for stage in registry.STAGES:
            runs[stage] = []
            for _ in range(2):
                before = snapshot(out) if out.exists() else {}
                # The first training run records the image ids each fold trains on (tests/stage/test_train.py).
                hooks = {"consumed_file": str(d / "consumed-{fold}")} if stage == "train" and not runs[stage] else {}
                if hooks:
                    os.environ[faults.ENV] = json.dumps(hooks)
                else:
                    os.environ.pop(faults.ENV, None)
                with captured() as text:
                    summary = registry.run(stage, load_config(str(cfg_path)))
                    print(registry.module(stage).format_summary(summary))
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
    return {"dir": d, "data": data, "out": out, "config": cfg_path, "runs": runs}
