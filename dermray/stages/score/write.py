"""Writing the parts: the decisions applied to each image (calibration, operating points) and the driver's
writer, which writes each part atomically once all its images are back."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from dermray.errors import UserError
from dermray.runtime.artifacts import Ensemble
from dermray.runtime.config import ScoreConfig
from dermray.stages.score.plan import quarantine_rows
from dermray.stages.score.shared import CHUNK, END_OF_SHARD, INPUT_ROW_HASH, ROW, ROW_HASH, TOTAL, log
from dermray.store import storage
from dermray.store.archive import WDS_META


@dataclass(frozen=True)
class Decisions:
    """What the model card locked and scoring applies: the temperature and, per binary task, one threshold."""
    temperature: float
    thresholds: dict  # task -> (point name, threshold)

    def as_dict(self) -> dict:
        return {"temperature": self.temperature,
                "thresholds": {t: {"name": n, "threshold": v} for t, (n, v) in self.thresholds.items()}}


def model_decisions(ens: Ensemble, sc: ScoreConfig) -> Decisions:
    """The ensemble's locked calibration and operating points (one set for the run's folds: they must agree)."""
    cards = ens.cards
    if any(c.calibration != cards[0].calibration or c.operating_points != cards[0].operating_points for c in cards):
        log.warning("score: the models' cards lock different decisions: no calibration, no <task>_positive")
        return Decisions(1.0, {})
    card = cards[0]
    temperature = card.calibration.temperature if card.calibration and sc.calibrate else 1.0
    thresholds = {}
    for pt in card.operating_points:
        if pt.task not in thresholds and (sc.operating_point is None or pt.name == sc.operating_point):
            thresholds[pt.task] = (pt.name, pt.threshold)
    if sc.operating_point and card.operating_points and not thresholds:
        names = sorted({pt.name for pt in card.operating_points})
        raise UserError(f"score.operating_point {sc.operating_point!r} is not locked in the model card (it has: "
                        f"{', '.join(names)})")
    return Decisions(temperature, thresholds)


@dataclass(frozen=True)
class TaskColumns:
    """What the task columns are computed from: the evaluation tasks, the partition's task membership (its path),
    and the fingerprints of the tasks, taxonomy and membership (inputs of the lineage)."""
    tasks: list
    membership: pd.DataFrame | None
    partition: str | None
    fingerprints: dict


class PartWriter:
    """Collects the streamed rows of each part and writes the part (and its quarantine) once all its rows are
    back: then the rows leave the driver."""

    def __init__(self, rdir: str, ens: Ensemble, columns: TaskColumns, carry: pa.Schema | None, meter,
                 decided: Decisions):
        from dermray.core.inference import binary_task_score, membership_matrix

        self.rdir, self.ens, self.carry, self.meter, self.decided = rdir, ens, carry, meter, decided
        self.task_columns = []
        for task in columns.tasks:
            m = membership_matrix(columns.membership, task, ens.n_classes)
            pos = task.class_names.index(task.positive) if task.is_binary else None
            self.task_columns.append((task, m, pos))
        self._binary_score = binary_task_score
        self.pending: dict[str, list[dict]] = {}
        self.received: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.scored = self.quarantined = self.files = 0
        self.t_model = [np.inf, -np.inf]  # first model batch start, last model batch end (epoch seconds)
        self.node_ids = [c["node_id"] for c in ens.classes]
        self.precisions: set[str] = set()
        self.compiled: set[bool] = set()  # whether the batches' models ran compiled

    def add(self, batch: dict) -> None:
        if "precision" in batch:
            self.precisions.update(batch["precision"].tolist())
        if "compiled" in batch:
            self.compiled.update(bool(c) for c in batch["compiled"])
        if len(batch["t_model"]):
            self.t_model = [min(self.t_model[0], float(batch["t_model"][:, 0].min())),
                            max(self.t_model[1], float(batch["t_model"][:, 1].max()))]
        chunks = batch[CHUNK]
        for chunk in pd.unique(chunks):
            sel = chunks == chunk
            rows = {k: v[sel] for k, v in batch.items()}
            marker = rows["error"] == END_OF_SHARD
            if marker.any():
                self.totals[chunk] = int(rows[TOTAL][marker][0])
                rows = {k: v[~marker] for k, v in rows.items()}
            elif len(rows[TOTAL]) and rows[TOTAL][0] >= 0:
                self.totals[chunk] = int(rows[TOTAL][0])
            self.pending.setdefault(chunk, []).append(rows)
            self.received[chunk] = self.received.get(chunk, 0) + len(rows["error"])
            self.meter.update(len(rows["error"]))
            if chunk in self.totals and self.received[chunk] >= self.totals[chunk]:
                self.flush(chunk)

    def flush(self, chunk: str) -> None:
        parts = self.pending.pop(chunk)
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        bad = np.array([e != "" for e in cols["error"]], bool)
        qrows = [{"image_id": i or None, "row": int(r) if r >= 0 else None, "uri": storage.redact(u), "reason": e}
                 for i, r, u, e in zip(cols["image_id"][bad], cols[ROW][bad], cols["uri"][bad], cols["error"][bad])]
        storage.write_table(quarantine_rows(qrows), storage.join(self.rdir, "_state", f"quarantine-{chunk}.parquet"))
        table = self.predictions_table({k: v[~bad] for k, v in cols.items()})
        storage.write_table(table, storage.join(self.rdir, "predictions", f"part-{chunk}.parquet"))
        self.scored += table.num_rows
        self.quarantined += len(qrows)
        self.files += 1
        log.debug("score: part %s written: %d scored, %d quarantined", chunk, table.num_rows, len(qrows))

    def predictions_table(self, cols: dict) -> pa.Table:
        n = len(cols["image_id"])
        order = np.argsort(cols["image_id"].astype(str), kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        from dermray.core.metrics import apply_temperature

        raw = np.asarray(cols["probs"], np.float32).reshape(n, self.ens.n_classes)
        probs = apply_temperature(raw, self.decided.temperature).astype(np.float32) if n else raw
        top = probs.argmax(axis=1) if n else np.zeros(0, np.int64)

        def matrix(a):
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1]).cast(pa.list_(pa.float32()))

        data = {
            "image_id": pa.array(cols["image_id"].tolist(), pa.string()),
            "model_id": pa.array([self.ens.model_id] * n, pa.string()),
            "probs": matrix(probs),
            "probs_raw": matrix(raw),
            "top_class": pa.array(top, pa.int32()),
            "top_node": pa.array([self.node_ids[i] for i in top], pa.string()),
        }
        p64 = probs.astype(np.float64)  # once for every task
        for task, m, pos in self.task_columns:
            tp = (p64 @ m).astype(np.float32)
            data[f"{task.name}_probs"] = pa.FixedSizeListArray.from_arrays(
                pa.array(tp.reshape(-1)), len(task.classes)).cast(pa.list_(pa.float32()))
            if pos is not None:
                score = self._binary_score(p64, m, pos).astype(np.float32)  # NaN: not estimable
                data[f"{task.name}_score"] = pa.array(score)
                if task.name in self.decided.thresholds:
                    data[f"{task.name}_positive"] = pa.array(score >= self.decided.thresholds[task.name][1],
                                                             pa.bool_())
        if self.carry is not None:
            for f in self.carry:
                if f.name not in data:
                    data[f.name] = pa.array(cols[f.name].tolist(), type=f.type, from_pandas=True)
            data["row"] = pa.array(cols[ROW], pa.int64())
            data[INPUT_ROW_HASH] = pa.array(cols[ROW_HASH].tolist(), pa.string())
        else:
            metas = [json.loads(m) if m else {} for m in cols["meta"]]
            for key in WDS_META:
                data[key] = pa.array([None if m.get(key) is None else str(m[key]) for m in metas], pa.string())
            data["uri"] = pa.array(cols["uri"].tolist(), pa.string())
        return pa.table(data)
