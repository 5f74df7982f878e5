"""The long-form tables an evaluation writes (metrics, ROC, confusion, readers, calibration, DeLong, external
validation), the record every metric row is written through (``At``: task, subset, model), and the headline."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pyarrow as pa

from dermray.store import schemas, storage


@dataclass
class Tables:
    metrics: list = dataclasses.field(default_factory=list)
    roc: list = dataclasses.field(default_factory=list)
    confusion: list = dataclasses.field(default_factory=list)
    readers: list = dataclasses.field(default_factory=list)
    calibration: list = dataclasses.field(default_factory=list)
    train_overlap: list = dataclasses.field(default_factory=list)
    curves: dict = dataclasses.field(default_factory=dict)  # (task, subset) -> data for plots


@dataclass(frozen=True)
class At:
    """Where a call's rows go: the tables, and the run, evaluation task and subset that all its rows share."""
    tables: Tables
    run_id: str
    task: str
    subset: str

    def keys(self) -> dict:
        return {"run_id": self.run_id, "task": self.task, "subset": self.subset}

    def add(self, metric: str, value, n, lo=None, hi=None, note: str | None = None) -> None:
        """One row of metrics.parquet; a null value (None or NaN) is noted "undefined" unless a note says why."""
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        if value is None and note is None:
            note = "undefined"
        self.tables.metrics.append(self.keys() | {
            "metric": metric, "value": value, "ci_low": None if lo is None or math.isnan(lo) else float(lo),
            "ci_high": None if hi is None or math.isnan(hi) else float(hi), "n": int(n), "note": note})


def write_tables(t: Tables, paths: dict) -> None:
    specs = [("metrics", t.metrics, schemas.METRICS), ("roc", t.roc, schemas.ROC),
             ("confusion", t.confusion, schemas.CONFUSION), ("readers", t.readers, schemas.READER_POINTS),
             ("calibration", t.calibration, schemas.CALIBRATION),
             ("train_overlap", t.train_overlap, schemas.TRAIN_OVERLAP)]
    for name, rows, schema in specs:
        arrow = schema.arrow([c.name for c in schema.columns])
        table = pa.Table.from_pylist(rows, schema=arrow) if rows else arrow.empty_table()
        storage.write_table(table, paths[name])


def headline(t: Tables) -> list[dict]:
    keep = {"auc", "accuracy", "balanced_accuracy"}
    return [{k: r[k] for k in ("task", "subset", "metric", "value", "ci_low", "ci_high", "n", "note")}
            for r in t.metrics if (r["metric"] in keep and r["subset"] in ("all", "biopsy"))
            or r["metric"] == "auc_difference" or (r["metric"] == "auc" and r["subset"].startswith("cohort="))
            or (r["metric"].startswith("carries_over@") and r["value"] == 0)]
