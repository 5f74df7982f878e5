"""The scoring summary: the run's totals, the quarantine merged and its reasons counted, and the lines a
person reads."""
from __future__ import annotations

import collections
import posixpath
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.formatting import duration, rate
from dermray.runtime.artifacts import Ensemble
from dermray.runtime.config import RunConfig
from dermray.stages.score.plan import WorkPlan, run_state
from dermray.stages.score.shared import STAGE
from dermray.stages.score.write import PartWriter
from dermray.store import lineage, schemas, storage
from dermray.store.archive import TRANSIENT


def merge_quarantine(rdir: str, input_quarantine: pa.Table) -> int:
    """The input's quarantine and every part's -> quarantine.parquet (atomically, streamed). Returns its rows.

    A row quarantined for a transient reason is left out once a re-run has settled that image: scored (it is in
    the run's predictions) or quarantined again later for another reason (a missing object, first met while the
    server was down). So the file says what is wrong now, and input = scored + quarantined holds across re-runs."""
    storage.write_table(input_quarantine, storage.join(rdir, "_state", "quarantine-input.parquet"))
    sdir = storage.join(rdir, "_state")
    files = [f for f in storage.list_files(sdir, (".parquet",)) if posixpath.basename(f).startswith("quarantine-")]
    settled = settled_transients(rdir, files)

    def tables():
        for f in files:
            t = storage.read_table(f)
            if settled.get(f) is not None:
                t = t.filter(pa.array(~settled[f]))
            yield t

    return storage.write_table_batches(schemas.QUARANTINE.arrow(), tables(), storage.join(rdir, "quarantine.parquet"))


def reason_kind(reason: str | None) -> str:
    """A quarantine reason without its particulars - paths and URIs, parenthesised details, numbers -
    ("duplicate image_id (first seen at row 5)" -> "duplicate image_id"; "cannot read s3://b/x.jpg: no such file"
    -> "cannot read …: no such file"), so that reasons of one kind count together."""
    text = re.sub(r"\S*/\S*?(?=[:,;]?(?:\s|$))", "…", reason or "unknown")
    text = re.sub(r"\s*\([^)]*\)", "", text)
    return re.sub(r"\d+", "N", text).strip()[:80]


def top_reasons(quarantine_uri: str, top: int = 3) -> list[dict]:
    """The run's most frequent quarantine reasons, [{"reason", "images"}], most frequent first (the quarantine
    holds the bad rows only: small)."""
    if not storage.exists(quarantine_uri):
        return []
    reasons = storage.read_table(quarantine_uri, columns=["reason"]).column("reason").to_pylist()
    counted = collections.Counter(reason_kind(r) for r in reasons)
    return [{"reason": r, "images": n} for r, n in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def _batch_of(path: str) -> int:
    m = re.search(r"-b(\d+)-", posixpath.basename(path))
    return int(m.group(1)) if m else 1 << 30  # the input's quarantine: this run's, after every part


def settled_transients(rdir: str, files: list[str]) -> dict[str, np.ndarray]:
    """Per quarantine file, a mask of its transient rows that a later batch settled (see merge_quarantine). The
    driver holds the quarantine's ids and reasons (the bad rows, not the archive); the predictions are read one
    part's ``image_id`` column at a time, and only when some row is transient."""
    rows = {f: storage.read_table(f, columns=["image_id", "reason"]) for f in files}
    transient = {f: pc.fill_null(pc.starts_with(t.column("reason"), TRANSIENT), False).to_numpy(
        zero_copy_only=False) for f, t in rows.items()}
    ids_transient = {i for f, t in rows.items() for i, tr in zip(t.column("image_id").to_pylist(), transient[f])
                     if tr and i is not None}
    if not ids_transient:
        return {}
    value_set = pa.array(sorted(ids_transient), pa.string())
    scored = set()
    for part in run_state(rdir)[0]:
        col = storage.read_table(part, columns=["image_id"]).column("image_id")
        scored.update(col.filter(pc.is_in(col, value_set=value_set)).to_pylist())
    last_batch: dict[str, int] = {}  # the latest batch that quarantined each of those ids
    for f, t in rows.items():
        for i in t.column("image_id").filter(pc.is_in(t.column("image_id"), value_set=value_set)).to_pylist():
            last_batch[i] = max(last_batch.get(i, -1), _batch_of(f))
    out = {}
    for f, t in rows.items():
        if transient[f].any():
            b = _batch_of(f)
            out[f] = np.array([bool(tr) and (i in scored or last_batch.get(i, -1) > b)
                               for i, tr in zip(t.column("image_id").to_pylist(), transient[f])], bool)
    return out


def run_totals(rdir: str) -> int:
    """Predictions in the run (from the parts' footers, not their rows)."""
    return sum(storage.parquet_file(f).metadata.num_rows for f in run_state(rdir)[0])


@dataclass(frozen=True)
class RunFacts:
    """What a score run's summary reports beside its work plan and its writer."""
    rdir: str  # the run's predictions folder
    run_lineage: lineage.Lineage
    partition: str | None  # the partition the task columns come from
    quarantined_total: int  # the run's quarantine, all runs under the run id together
    t_start: float  # time.perf_counter() when the run started
    t_wall: float  # time.time() when the scoring stream was set up


def summarise(cfg: RunConfig, ens: Ensemble, work: WorkPlan, writer: PartWriter, facts: RunFacts) -> dict:
    sc = cfg.score
    rdir, partition, t_start, t_wall = facts.rdir, facts.partition, facts.t_start, facts.t_wall
    processed = writer.scored + writer.quarantined
    n_input = work.input_rows if work.input_rows is not None else processed + work.already_done
    summary = {
        "stage": STAGE, "run_id": cfg.run_id, "model_id": ens.model_id, "input_kind": work.kind,
        "models": len(ens.weights), "arch": ens.arch, "tta": sc.tta, "input": n_input,
        "shards": work.parts + work.already_done if work.kind == "webdataset" else None,
        "already_done": work.already_done, "scored": writer.scored, "changed_since_scored": work.changed,
        "quarantined": writer.quarantined + work.quarantine.num_rows, "files_written": writer.files,
        "run_scored_total": run_totals(rdir), "run_quarantined_total": facts.quarantined_total,
        "images_per_s": round(processed / (time.perf_counter() - t_start), 2) if work.refs else None,
        # From the first model batch's start to the last one's end: the pipeline's rate once running (the
        # benchmark's figure); start-up (Ray, actors, models, first decode) is the time before it.
        "steady_images_per_s": round(processed / (writer.t_model[1] - writer.t_model[0]), 2)
        if work.refs and writer.t_model[1] > writer.t_model[0] else None,
        "startup_s": round(writer.t_model[0] - t_wall, 2) if work.refs and np.isfinite(writer.t_model[0]) else None,
        "seconds": round(time.perf_counter() - t_start, 2),
        "partition": storage.redact(partition) if partition else None,
        "decisions": writer.decided.as_dict(), "precision": sorted(writer.precisions),
        "checkpoints": [storage.redact(storage.parent(storage.parent(w))) for w in ens.weights],
        "operating_points": [pt.model_dump() for pt in ens.first.operating_points],
        "lineage": facts.run_lineage.to_dict(),
        "quarantine_reasons": top_reasons(storage.join(rdir, "quarantine.parquet")),
        "outputs": {"predictions": storage.join(rdir, "predictions"),
                    "quarantine": storage.join(rdir, "quarantine.parquet")},
    }
    if work.kind != "webdataset" and summary["input"] != summary["already_done"] + summary["scored"] + summary[
            "quarantined"]:
        raise RuntimeError(f"score: counts do not add up: {summary}")  # a bug, never a user error
    return summary


def counts(s: dict) -> dict:
    return {"in": s["input"], "out": s["run_scored_total"], "quarantined": s["run_quarantined_total"],
            "seconds": s["seconds"]}


def format_summary(s: dict) -> str:
    if s["input_kind"] == "webdataset":
        head = (f"score: {s['shards']} shards: {s['scored']} scored + {s['quarantined']} quarantined; "
                f"{s['already_done']} shards done before")
    else:
        head = (f"score: {s['input']} images = {s['scored']} scored + {s['quarantined']} quarantined + "
                f"{s['already_done']} done before")
        if s.get("changed_since_scored"):
            head += f" ({s['changed_since_scored']} scored again: their input row changed since)"
    lines = [head + f" ({duration(s['seconds'])})",
             f"  model {s['model_id']} ({s['arch']}, {s['models']} model(s), tta {s['tta']})",
             f"  run totals: {s['run_scored_total']} predictions, {s['run_quarantined_total']} quarantined",
             f"  outputs: {s['outputs']['predictions']}"]
    if s["run_quarantined_total"]:
        why = ", ".join(f"{r['images']} {r['reason']}" for r in s.get("quarantine_reasons") or [])
        lines.append(f"  quarantined ({why or 'see the file'}): {storage.redact(s['outputs']['quarantine'])}")
    if s.get("images_per_s"):
        lines.insert(1, f"  {rate(s['images_per_s'])} images/s overall, first results after "
                        f"{duration(s['startup_s'])}")
    return "\n".join(lines)
