"""Scoring stage: trained fold models over an archive of images with Ray Data -> predictions Parquet.

Steps (``run``): identify the models (``artifacts.load_ensemble``: the model id carries the weights' sha256) ->
plan the work in Ray tasks over the manifest's row groups (fingerprint the input, quarantine rows without an id or
URI and repeated ids, leave out what this model has already scored in this run, cut the rest into parts of
``score.rows_per_file`` images; one part per tar shard) -> compare the run's recorded lineage (replace the run's
output when the input or model changed, refuse in incremental mode when the model changed) -> Ray Data: decode
tasks (the training's evaluation transform, uint8) -> an actor pool holding the models (``Predictor``: mean softmax
over the fold models and the test-time-augmentation views) -> the driver writes each part, once all its images are
back, atomically.

The driver holds per-part metadata and the results of the parts in flight, never per-image state of the whole
archive: planning, deduplication and "already scored" are answered in tasks (``dermray/core/ids.py``).

Outputs under ``<output>/predictions/<run_id>/``: ``predictions/part-*.parquet`` (one table: read the folder),
``quarantine.parquet``, ``score_summary.json`` (with the lineage); ``_state/`` holds what a re-run needs. Columns:
``image_id``, ``model_id``, ``probs`` (list<float32> over training classes), ``top_class``, ``top_node``, per task
``<task>_probs`` and for binary tasks ``<task>_score``, then the input's columns (label, label_source, modality,
group_id, uri, ``row`` = input row, ...).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import posixpath
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core import ids
from dermray.core.formatting import duration, rate, strict_json
from dermray.errors import UserError
from dermray.runtime import artifacts, layout, progress, registry
from dermray.runtime.artifacts import Ensemble
from dermray.runtime.config import RunConfig, ScoreConfig, card_preprocess
from dermray.runtime.faults import from_env as fault_hooks
from dermray.store import archive, lineage, schemas, storage
from dermray.store.archive import TRANSIENT, WDS_META

log = logging.getLogger("dermray.score")
STAGE = "score"
END_OF_SHARD = "<end of shard>"  # a marker row: its part total is the shard's sample count
# Columns the work rows carry besides the input's own: the input row, the part, the part's size, the row's hash.
ROW, CHUNK, TOTAL, ROW_HASH = "__row", "__chunk", "__chunk_total", "__row_hash"
INTERNAL = (ROW, CHUNK, TOTAL, ROW_HASH, "row", "input_row_hash")
# In the predictions: the fingerprint of the input row an image was scored from (image_id and every column the input
# gave it). An image is "already scored" only with the same row: a relabelled image is scored again.
INPUT_ROW_HASH = "input_row_hash"


# ---- planning: tasks over the manifest's row groups ----------------------------------------------------------------
def _read(uri: str, row_groups: list[int], columns: list[str] | None = None) -> pa.Table:
    table = storage.parquet_file(uri).read_row_groups(row_groups, columns=columns)
    return pa.table({c: (pc.cast(table.column(c), pa.string()) if pa.types.is_dictionary(table.column(c).type)
                         else table.column(c)) for c in table.column_names})


def _usable(table: pa.Table) -> np.ndarray:
    ok = np.ones(table.num_rows, bool)
    for c in ("image_id", "uri"):
        ok &= ~pc.fill_null(pc.equal(table.column(c), ""), True).to_numpy(zero_copy_only=False)
    return ok


def plan_read(uri: str, row_groups: list[int], offset: int, partitions: int):
    """Pass 1 over one chunk: ((rows, its first local image URI or None), fingerprint partial, *id hash
    partitions of the usable rows)."""
    table = _read(uri, row_groups)
    hasher = lineage.TableHasher(table.column_names)
    hasher.add(table, offset)
    ok = _usable(table)
    base = storage.parent(uri)
    local = storage.first_local(storage.resolve_column(table.column("uri").filter(pa.array(ok)), base))
    fp = ids.fingerprints(table.column("image_id").filter(pa.array(ok)).to_numpy(zero_copy_only=False))
    rows = np.flatnonzero(ok).astype(np.int64) + offset
    part = ids.partition_of(fp, partitions)
    return ((table.num_rows, local), hasher.partial(), *[(fp[part == p], rows[part == p]) for p in range(partitions)])


def repeated_ids(*parts) -> tuple[np.ndarray, np.ndarray]:
    """Reduce over one hash partition: rows repeating an earlier image_id, and where it was first seen."""
    fp = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, ids.FINGERPRINT)
    rows = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    return ids.repeated(fp, rows)


def merge_repeats(*arrays) -> tuple[np.ndarray, np.ndarray]:
    """The reducers' (repeated rows, first rows) pairs, given as all rows arrays then all first arrays, merged and
    sorted by row (what plan_work's binary search needs)."""
    half = len(arrays) // 2
    rows = np.concatenate(arrays[:half]) if half else np.zeros(0, np.int64)
    first = np.concatenate(arrays[half:]) if half else np.zeros(0, np.int64)
    order = np.argsort(rows, kind="stable")
    return rows[order], first[order]


@dataclass
class Done:
    """What the run holds for a model, as sorted fingerprint sets: the input rows it scored (``rows``), the images
    it scored (``scored``), and the images of earlier chunks quarantined for a permanent reason (``quarantined``;
    transient ones are tried again)."""
    rows: np.ndarray
    scored: np.ndarray
    quarantined: np.ndarray


def row_hashes(table: pa.Table) -> np.ndarray:
    """FINGERPRINT [n] of each row: its image_id and the text of every other column of the input (null apart from
    empty), the internal ones left out - the same row gives the same hash in every run."""
    columns = ["image_id"] + sorted(c for c in table.column_names if c not in INTERNAL and c != "image_id")
    texts = []
    for name in columns:
        col = table.column(name)
        try:
            text = pc.cast(col, pa.string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # lists, structs: their JSON
            text = pa.array([None if v is None else json.dumps(v, sort_keys=True, default=str)
                             for v in col.to_pylist()], pa.string())
        texts.append(pc.fill_null(pc.binary_join_element_wise(name, "=", text, ""), f"{name}\x00"))
    joined = pc.binary_join_element_wise(*texts, "\x1f") if texts else pa.array([], pa.string())
    return ids.fingerprints(joined.to_numpy(zero_copy_only=False))


def hash_text(fp: np.ndarray) -> list[str]:
    """The 32 hex digits of each row fingerprint (how the predictions store it)."""
    raw = np.ascontiguousarray(fp).view(np.uint8).reshape(len(fp), 16)
    return [bytes(r).hex() for r in raw]


def hash_values(texts) -> np.ndarray:
    """The row fingerprints of ``hash_text`` strings; a missing one (predictions of an older dermray) matches no
    row."""
    texts = ["0" * 32 if t is None else t for t in texts]
    return np.frombuffer(bytes.fromhex("".join(texts)), ids.FINGERPRINT).copy() if texts else np.zeros(
        0, ids.FINGERPRINT)


def done_ids(part_files: list[str], model_id: str, quarantine_files: list[str]) -> Done:
    """What the run's parts and chunk quarantine files hold for ``model_id`` (``Done``)."""
    rows, scored, quarantined = [], [], []
    for f in part_files:
        # The ids and row hashes alone (a resumed run over millions of rows must not read back the probabilities).
        present = storage.parquet_file(f).schema_arrow.names
        t = storage.read_table(f, columns=["image_id", "model_id"] + [INPUT_ROW_HASH] * (INPUT_ROW_HASH in present))
        t = t.filter(pc.equal(t.column("model_id"), model_id))
        scored.append(ids.fingerprints(t.column("image_id").to_numpy(zero_copy_only=False)))
        if INPUT_ROW_HASH in t.column_names:
            rows.append(hash_values(t.column(INPUT_ROW_HASH).to_pylist()))
    for f in quarantine_files:
        t = storage.read_table(f, columns=["image_id", "reason"])
        keep = pc.and_(pc.is_valid(t.column("image_id")),
                       pc.invert(pc.starts_with(t.column("reason"), TRANSIENT)))
        quarantined.append(ids.fingerprints(t.column("image_id").filter(keep).to_numpy(zero_copy_only=False)))
    return Done(ids.sorted_set(rows), ids.sorted_set(scored), ids.sorted_set(quarantined))


def plan_work(uri: str, row_groups: list[int], offset: int, repeats: tuple, done: Done, prefix: str,
              rows_per_part: int):
    """Pass 2 over one chunk: (work rows to score, quarantined input rows, counts). Work rows carry the manifest's
    columns, the resolved URI, the input row, its hash, their part name and the part's size. An image the run
    scored from another row (relabelled since) is scored again; ``counts["changed_ids"]`` names it."""
    table = _read(uri, row_groups)
    n = table.num_rows
    rows = np.arange(offset, offset + n, dtype=np.int64)
    reason = np.full(n, None, dtype=object)
    usable = _usable(table)
    image_ids = table.column("image_id").to_numpy(zero_copy_only=False)
    reason[~usable] = np.where(pc.fill_null(pc.equal(table.column("image_id"), ""), True).to_numpy(
        zero_copy_only=False)[~usable], "missing image_id", "missing uri")
    dup_rows, first_rows = repeats
    pos = np.clip(np.searchsorted(dup_rows, rows), 0, max(len(dup_rows) - 1, 0))
    is_dup = (dup_rows[pos] == rows) & usable if len(dup_rows) else np.zeros(n, bool)
    for i in np.flatnonzero(is_dup):
        reason[i] = f"duplicate image_id (first seen at row {int(first_rows[pos[i]])})"
    bad = reason != None  # noqa: E711 - elementwise
    quarantine = pa.table({"stage": pa.array([STAGE] * int(bad.sum()), pa.string()),
                           "image_id": pa.array([i or None for i in image_ids[bad]], pa.string()),
                           "row": pa.array(rows[bad], pa.int64()),
                           "uri": pa.array([storage.redact(u) if u else None for u in
                                            table.column("uri").to_numpy(zero_copy_only=False)[bad]], pa.string()),
                           "reason": pa.array(reason[bad].tolist(), pa.string())},
                          schema=schemas.QUARANTINE.arrow())
    keep = ~bad
    id_fp, row_fp = ids.fingerprints(image_ids), row_hashes(table)
    already = keep & (ids.isin(row_fp, done.rows) | ids.isin(id_fp, done.quarantined))
    changed = keep & ~already & ids.isin(id_fp, done.scored)
    todo = keep & ~already
    work = table.filter(pa.array(todo))
    base = storage.parent(uri)
    work = work.set_column(work.column_names.index("uri"), "uri", storage.resolve_column(work.column("uri"), base))
    k = np.arange(work.num_rows) // rows_per_part
    sizes = np.bincount(k, minlength=k.max() + 1 if len(k) else 0)
    work = work.drop_columns([c for c in INTERNAL if c in work.column_names])
    work = work.append_column(ROW, pa.array(rows[todo], pa.int64()))
    work = work.append_column(ROW_HASH, pa.array(hash_text(row_fp[todo]), pa.string()))
    work = work.append_column(CHUNK, pa.array([f"{prefix}-{j:03d}" for j in k], pa.string()))
    work = work.append_column(TOTAL, pa.array(sizes[k] if len(k) else [], pa.int64()))
    return work, quarantine, {"rows": n, "quarantined": int(bad.sum()), "already_done": int(already.sum()),
                              "todo": int(todo.sum()), "parts": int(len(sizes)),
                              "changed_ids": image_ids[changed].tolist()}


@dataclass
class WorkPlan:
    kind: str
    refs: list  # object refs of work tables (manifest) or the shard rows (webdataset)
    input_rows: int | None  # None for shards (counted as they are read)
    quarantine: pa.Table  # input rows refused before scoring
    already_done: int
    parts: int
    changed: int = 0  # images scored before from another input row (relabelled): scored again


def _run_state(rdir: str) -> tuple[list[str], list[str], int]:
    """(the run's part files, its chunk quarantine files, the highest batch number used so far)."""
    pdir, sdir = storage.join(rdir, "predictions"), storage.join(rdir, "_state")
    parts = [f for f in (storage.list_files(pdir, (".parquet",)) if storage.exists(pdir) else [])
             if posixpath.basename(f).startswith("part-")]
    quar = [f for f in (storage.list_files(sdir, (".parquet",)) if storage.exists(sdir) else [])
            if re.match(r"quarantine-[bs]", posixpath.basename(f))]
    batches = [int(m.group(1)) for f in parts + quar if (m := re.search(r"-b(\d+)-", posixpath.basename(f)))]
    return parts, quar, max(batches, default=0)


def fingerprint_manifest(uri: str, storage_cfg) -> tuple[list, lineage.Fingerprint, list, int]:
    """Pass 1 as Ray tasks: (chunks, the manifest's content fingerprint, the refs of the repeated-id reducers,
    rows). Local image URIs are refused on a cluster of several nodes (each node would read its own disk)."""
    import ray

    from dermray.runtime.raysession import check_shared_storage, cluster_cpus

    pf = storage.parquet_file(uri)
    if pf.metadata.num_rows == 0:
        empty = lineage.Fingerprint(uri=storage.redact(uri), method="columns", content="empty", rows=0)
        return [], empty, [], 0
    chunks = storage.row_group_chunks(pf, 100_000, min_chunks=2 * cluster_cpus())
    partitions = max(1, min(2 * cluster_cpus(), len(chunks)))
    read = ray.remote(num_returns=2 + partitions)(plan_read)
    reduce = ray.remote(num_returns=2)(repeated_ids)
    # num_returns > 1: .remote() gives a list of refs (Ray's stubs say one ObjectRef)
    refs = [cast(list, read.remote(uri, rg, off, partitions)) for rg, off, _ in chunks]
    repeats = [reduce.remote(*[r[2 + p] for r in refs]) for p in range(partitions)]
    content, rows = lineage.TableHasher.merge(ray.get([r[1] for r in refs]))
    local = next((loc for _, loc in ray.get([r[0] for r in refs]) if loc), None)
    check_shared_storage(storage_cfg, {"image URI (in the manifest)": local})
    fp = lineage.Fingerprint(uri=storage.redact(uri), method="columns", content=content,
                             columns=pf.schema_arrow.names, rows=rows, identity=storage.identity(uri))
    return chunks, fp, repeats, rows


def plan_manifest(uri: str, chunks: list, repeats: list, rdir: str, model_id: str, sc: ScoreConfig) -> WorkPlan:
    """Pass 2 as Ray tasks: the work tables (left in the object store), the input's quarantine, the counts."""
    import ray

    parts, quar, batch = _run_state(rdir)
    done = ray.remote(done_ids).remote(parts, model_id, quar)
    rep = ray.remote(merge_repeats).remote(*[r[0] for r in repeats], *[r[1] for r in repeats])
    work = ray.remote(num_returns=3)(plan_work)
    # num_returns > 1: .remote() gives a list of refs (Ray's stubs say one ObjectRef)
    refs = [cast(list, work.remote(uri, rg, off, rep, done, f"b{batch + 1:04d}-{k:05d}", sc.rows_per_file))
            for k, (rg, off, _) in enumerate(chunks)]
    counts = ray.get([r[2] for r in refs])
    quarantine = pa.concat_tables(ray.get([r[1] for r in refs])) if refs else _quarantine_rows([])
    changed = [i for c in counts for i in c["changed_ids"]]
    if changed:
        drop_superseded(parts, model_id, changed)
    return WorkPlan("manifest", [r[0] for r, c in zip(refs, counts) if c["todo"]], sum(c["rows"] for c in counts),
                    quarantine, sum(c["already_done"] for c in counts), sum(c["parts"] for c in counts),
                    len(changed))


def drop_superseded(part_files: list[str], model_id: str, image_ids: list[str]) -> None:
    """Take the predictions of ``image_ids`` (relabelled since they were scored) out of the run's parts before they
    are scored again: one prediction per image and model. Each part is rewritten whole (atomically); an
    interruption leaves those images unscored, and the next run scores them."""
    gone = ids.sorted_set([ids.fingerprints(np.asarray(image_ids, dtype=object))])
    for f in part_files:
        t = storage.read_table(f)
        stale = ids.isin(ids.fingerprints(t.column("image_id").to_numpy(zero_copy_only=False)), gone) & \
            pc.equal(t.column("model_id"), model_id).to_numpy(zero_copy_only=False)
        if stale.all():
            storage.delete(f)
        elif stale.any():
            storage.write_table(t.filter(pa.array(~stale)), f)
    log.info("score: %d image(s) relabelled since they were scored (their input row changed): scoring them again",
             len(image_ids))


def folder_table(uri: str, labels_uri: str | None) -> tuple[pa.Table, pa.Table]:
    """A folder/prefix of images as a manifest table (image_id = file name without extension, joined with an
    optional labels table), and the files or labels that cannot be scored (a second file with the same image_id,
    a labelled image with no file)."""
    files = list(storage.list_files(uri, archive.IMAGE_SUFFIXES))
    names = [posixpath.splitext(posixpath.basename(f))[0] for f in files]
    table = pa.table({"image_id": pa.array(names, pa.string()), "uri": pa.array(files, pa.string())})
    problems: list[dict[str, Any]] = []
    dup = pd.Series(names).duplicated().to_numpy()
    for i in np.flatnonzero(dup):
        problems.append({"stage": STAGE, "image_id": names[i], "row": None, "uri": files[i],
                         "reason": "another file in the folder has the same image_id (name without extension)"})
    table = table.filter(pa.array(~dup))
    if labels_uri:
        labels = storage.read_table_any(labels_uri)
        if "image_id" not in labels.column_names:
            raise UserError(f"{storage.redact(labels_uri)}: the labels table has no 'image_id' column")
        labels = labels.set_column(labels.column_names.index("image_id"), "image_id",
                                   pc.cast(labels.column("image_id"), pa.string()))
        labels = labels.drop_columns([c for c in ("uri", "row") if c in labels.column_names])
        present = pc.is_in(labels.column("image_id"), table.column("image_id"))
        for i in np.flatnonzero(~present.to_numpy(zero_copy_only=False)):
            problems.append({"stage": STAGE, "image_id": labels.column("image_id")[i].as_py(), "row": int(i),
                             "uri": None, "reason": f"listed in {posixpath.basename(labels_uri)} but no image file "
                                                    "in the folder"})
        first = ~pd.Series(labels.column("image_id").to_pylist()).duplicated().to_numpy()
        table = table.join(labels.filter(pa.array(first)), "image_id", join_type="left outer")
    return table.sort_by("image_id"), pa.Table.from_pylist(problems, schema=schemas.QUARANTINE.arrow())


def folder_manifest(uri: str, labels_uri: str | None, rdir: str) -> tuple[str, pa.Table]:
    """``folder_table`` written under ``_state/``, so that the folder is planned like any manifest."""
    table, problems = folder_table(uri, labels_uri)
    out = storage.join(rdir, "_state", "folder_manifest.parquet")
    storage.write_table(table, out)
    return out, problems


def plan_shards(shards: list[str], rdir: str) -> WorkPlan:
    """One work row per shard whose part is not written yet."""
    present = {posixpath.basename(f) for f in _run_state(rdir)[0]}
    todo = [(s, _shard_chunk(s)) for s in shards if f"part-{_shard_chunk(s)}.parquet" not in present]
    refs = [pa.table({"uri": [s for s, _ in todo], CHUNK: [c for _, c in todo]})] if todo else []
    return WorkPlan("webdataset", refs, None, _quarantine_rows([]), len(shards) - len(todo), len(todo))


def shards_fingerprint(shards: list[str]) -> lineage.Fingerprint:
    """Shards are not read twice: their URIs with what storage says of each (ETag and size, or size and mtime)."""
    return lineage.Fingerprint(method="etag+size", content=lineage.config_hash(
        [[storage.redact(s), storage.identity(s)] for s in shards]), rows=len(shards))


def _shard_chunk(shard: str) -> str:
    return "s" + hashlib.sha1(shard.encode()).hexdigest()[:12]


def _quarantine_rows(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"stage": STAGE, **r} for r in rows], schema=schemas.QUARANTINE.arrow())


# ---- Ray Data functions (tasks and actors) -------------------------------------------------------------------------
def decode_rows(batch: dict, size: int, max_pixels: int, retry: storage.Retry, pre=None) -> dict:
    """Ray Data batch fn over work rows: read + decode + resize -> ``image`` uint8 [B, size, size, 3], ``error``
    ("" when the image is usable); the other columns pass through."""
    decoded = [archive.decode_one(d, size, max_pixels, pre) for d in archive.fetch_all(list(batch["uri"]), retry)]
    out = dict(batch)
    out["image"] = archive.stack_images([d[0] for d in decoded], size)
    out["error"] = np.array([d[1] for d in decoded], dtype=object)
    out["meta"] = np.array([""] * len(decoded), dtype=object)
    return out


def _shard_rows(shard: str, retry: storage.Retry):
    """(image_id, uri, data or None, error, meta JSON) of every sample and problem of a shard, streamed. A read
    that fails part-way for a transient reason is retried from the start, skipping what was already yielded."""
    emitted, delays = 0, retry.delays()
    while True:
        seen = 0
        try:
            with storage.open_read(shard, retry) as f:
                for kind, item in archive.iter_shard(f):
                    seen += 1
                    if seen <= emitted:
                        continue
                    emitted += 1
                    if kind == "problem":
                        member = item["member"]
                        yield (item["key"] or "", f"{shard}#{member}" if member else shard, None, item["reason"], "")
                    else:
                        yield (item["image_id"], f"{shard}#{item['member']}", item["data"], "",
                               json.dumps(item["meta"], default=str))
            return
        except UserError as e:
            yield ("", shard, None, archive.reason_of(e), "")
            return
        except storage.IO_ERRORS as e:
            delay = next(delays, None) if storage.is_transient(e) else None
            if delay is None:
                yield ("", shard, None, TRANSIENT + f"cannot read {storage.redact(shard)}: {e}", "")
                return
            time.sleep(delay)


def decode_shards(batch: dict, size: int, max_pixels: int, rows_per_batch: int, retry: storage.Retry, pre=None):
    """Ray Data batch fn over shard rows (uri, chunk): yields decoded samples in batches of ``rows_per_batch``,
    reading each shard as a stream; the last row of a shard is an END_OF_SHARD marker carrying its count."""
    for shard, chunk in zip(batch["uri"], batch[CHUNK]):
        total, buf = 0, []

        def emit(rows, end: int | None = None, chunk=chunk):
            decoded = [archive.decode_one(r[2], size, max_pixels, pre) if not r[3] else (None, r[3]) for r in rows]
            n = len(rows)
            return {"image_id": np.array([r[0] for r in rows], dtype=object),
                    "uri": np.array([r[1] for r in rows], dtype=object), ROW: np.full(n, -1, np.int64),
                    CHUNK: np.array([chunk] * n, dtype=object),
                    TOTAL: np.full(n, -1 if end is None else end, np.int64),
                    "image": archive.stack_images([d[0] for d in decoded], size),
                    "error": np.array([d[1] for d in decoded], dtype=object),
                    "meta": np.array([r[4] for r in rows], dtype=object)}

        for row in _shard_rows(shard, retry):
            buf.append(row)
            total += 1
            if len(buf) == rows_per_batch:
                yield emit(buf)
                buf = []
        if buf:
            yield emit(buf)
        yield emit([("", shard, None, END_OF_SHARD, "")], end=total)


def tta_views(x, mode: str) -> list:
    """The test-time-augmentation views of a [B, 3, S, S] batch (square images)."""
    import torch

    if mode == "none":
        return [x]
    if mode == "flips":
        return [x, torch.flip(x, dims=[3]), torch.flip(x, dims=[2])]
    rots = [torch.rot90(x, k, dims=[2, 3]) for k in range(4)]  # dihedral
    return rots + [torch.flip(r, dims=[3]) for r in rots]


TTA_VIEWS = {"none": 1, "flips": 3, "dihedral": 8}


class Predictor:
    """Ray Data actor: the ensemble's models, built once (weights checked against their sha256); ``__call__`` maps
    decoded images to the mean softmax over models and views (float32 [B, n_classes]); rows with an ``error`` pass
    through unscored."""

    def __init__(self, ensemble: Ensemble, threads: int, channels_last: bool, tta: str, use_gpu: bool,
                 amp: str = "off", slow_batch_s: float = 0.0, compile_batch: int = 0):
        import torch

        torch.set_num_threads(max(1, threads))
        # Ray hands out read-only arrays; the tensors made from them are only read (a float copy is normalised).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.models = []
        for i in range(len(ensemble.weights)):
            m = artifacts.load_member(ensemble, i, self.device)
            self.models.append(m.to(memory_format=torch.channels_last) if channels_last else m)
        self.channels_last, self.tta = channels_last, tta
        self.autocast_dtype = None
        # Before the precision is chosen: amp=auto measures _probabilities, which normalises with these.
        self.mean = torch.tensor(ensemble.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(ensemble.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.n_classes = ensemble.n_classes
        if amp == "auto":
            amp, self.precision_why = self._choose(ensemble)
        else:
            self.precision_why = f"{amp} (configured)"
        self.amp = {"off": "fp32"}.get(amp, amp)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.slow_batch_s = slow_batch_s  # tests: stretch a run so that a fault can land inside it
        # torch.compile with one static shape: every batch is padded to compile_batch images (no recompiles for
        # a short last batch or one with quarantined rows). The eager models stay for a compile that fails.
        self.compile_batch, self.eager = compile_batch, self.models
        if compile_batch:
            self.models = [torch.compile(m, dynamic=False) for m in self.models]

    def _choose(self, ensemble: Ensemble) -> tuple[str, str]:
        """``auto``: dermray/runtime/precision.py, measured on this actor's first model where the CPU has native
        bf16."""
        from dermray.runtime import precision as P

        images = np.random.default_rng(0).integers(0, 256, (8, ensemble.size, ensemble.size, 3), dtype=np.uint8)

        def measure():
            import torch

            times = []
            for dtype in (None, torch.bfloat16):
                self.autocast_dtype = dtype
                times.append(P.time_step(lambda: self._probabilities(images)))
            self.autocast_dtype = None
            return tuple(times)

        return P.choose("auto", self.device, f"score:{ensemble.arch}:{ensemble.size}:tta={self.tta}", measure)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """float32 [B, n_classes] for uint8 NHWC images."""
        n = len(images)
        if self.compile_batch and n < self.compile_batch:
            images = np.concatenate([images, np.zeros((self.compile_batch - n, *images.shape[1:]), images.dtype)])
        try:
            return self._probabilities(images)[:n]
        except Exception as e:  # noqa: BLE001 - compiling needs a C++ toolchain on the node; eager needs nothing
            if self.models is self.eager:
                raise
            log.warning("score: torch.compile failed on this node (%s: %s); scoring eager", type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            self.models, self.compile_batch = self.eager, 0
            return self._probabilities(images)[:n]

    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        import torch

        from dermray.store.models import logits_of

        with torch.inference_mode():
            # NHWC uint8 -> NCHW float32 whose memory stays NHWC: channels_last with no copy.
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
            x = (x.float() - self.mean) / self.std
            if not self.channels_last:
                x = x.contiguous()
            total: torch.Tensor | None = None
            for view in tta_views(x, self.tta):
                for m in self.models:
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                        enabled=self.autocast_dtype is not None):
                        logits = logits_of(m(view))
                    p = torch.softmax(logits.float(), dim=1)
                    total = p if total is None else total + p
            assert total is not None  # at least one view and one model
            return (total / (len(self.models) * TTA_VIEWS[self.tta])).cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        t_start = time.time()
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        probs = np.zeros((len(ok), self.n_classes), np.float32)
        if ok.any():
            probs[ok] = self.probabilities(batch["image"] if ok.all() else batch["image"][ok])
        if self.slow_batch_s:
            time.sleep(self.slow_batch_s)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probs"] = probs
        out["precision"] = np.array([self.amp] * len(ok), dtype=object)
        out["compiled"] = np.full(len(ok), bool(self.compile_batch))
        # When this batch's model work ran (wall clock): the steady rate excludes start-up and output bunching.
        out["t_model"] = np.tile(np.array([[t_start, time.time()]]), (len(ok), 1))
        return out


# ---- writing the parts ----------------------------------------------------------------------------------------------
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


class PartWriter:
    """Collects the streamed rows of each part and writes the part (and its quarantine) once all its rows are
    back: then the rows leave the driver."""

    def __init__(self, rdir: str, ens: Ensemble, tasks, membership, carry: pa.Schema | None, meter,
                 decided: Decisions):
        from dermray.core.inference import binary_task_score, membership_matrix

        self.rdir, self.ens, self.carry, self.meter, self.decided = rdir, ens, carry, meter, decided
        self.task_columns = []
        for task in tasks:
            m = membership_matrix(membership, task, ens.n_classes)
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
        storage.write_table(_quarantine_rows(qrows), storage.join(self.rdir, "_state", f"quarantine-{chunk}.parquet"))
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


# ---- the stage ----------------------------------------------------------------------------------------------------
def task_setup(cfg: RunConfig, ens: Ensemble):
    """(tasks, task_membership, the partition used, the fingerprints of the three) for the task columns;
    ([], None, None, {}) when no tasks are configured. The partition defaults to the one the model card records."""
    if not (cfg.data.tasks and cfg.data.taxonomy):
        log.info("no data.tasks / data.taxonomy: writing training-class probabilities only")
        return [], None, None, {}
    from dermray.store.definitions import load_tasks, load_taxonomy

    part = cfg.score.partition or ens.first.lineage.get("partition") or layout.partition_dir(cfg.output, cfg.run_id)
    paths = layout.partition_outputs(part)
    if not storage.exists(paths["task_membership"]):
        raise UserError(f"task columns need the partition's task_membership.parquet, not found at "
                        f"{storage.redact(paths['task_membership'])} (set score.partition)")
    classes = storage.read_table(paths["training_classes"])
    if artifacts.classes_hash(classes) != ens.classes_hash:
        raise UserError(f"the model was trained on other training classes than {storage.redact(part)} holds "
                        f"(hash {ens.classes_hash} vs {artifacts.classes_hash(classes)}): set score.partition to "
                        "its partition")
    from dermray.store.definitions import fingerprints

    tasks = load_tasks(cfg.data.tasks, load_taxonomy(cfg.data.taxonomy))
    membership = storage.read_table(paths["task_membership"])
    # The task columns are computed from all three: their names, classes and positive class, the nodes' classes.
    fps = fingerprints(cfg.data.tasks, cfg.data.taxonomy) | {"task_membership": lineage.columns_fingerprint(
        paths["task_membership"], membership, membership.column_names)}
    return tasks, membership.to_pandas(), part, fps


def preprocessing(cfg: RunConfig, ens: Ensemble):
    """The models' preprocessing (their cards must agree; transforms.color_constancy, when set, must match)."""
    if any(c.preprocess != ens.first.preprocess for c in ens.cards):
        raise UserError("the ensemble's models were trained with different preprocessing (model cards): score them "
                        "apart")
    return card_preprocess(cfg.transforms.color_constancy, ens.first.preprocess)


def score_lineage(ens: Ensemble, input_fp: lineage.Fingerprint, task_fps: dict, cfg: RunConfig) -> lineage.Lineage:
    inputs = {"model": lineage.value_fingerprint(ens.model_id), "input": input_fp} | task_fps
    # What the model cards decide: how images are prepared, at which size, the calibration and operating points.
    derived = {"input_size": ens.size, "preprocess": preprocessing(cfg, ens).as_dict(),
               "decisions": model_decisions(ens, cfg.score).as_dict()}
    return registry.stage_lineage(STAGE, cfg, inputs, derived)


def reconcile(rdir: str, now: lineage.Lineage, incremental: bool) -> None:
    """Keep, replace or refuse the run's existing output given its recorded lineage: the same lineage resumes;
    another input or model replaces the output; in incremental mode another model or setting is refused (one
    run, one model: a history must never mix two models' predictions)."""
    spec_uri = storage.join(rdir, "_state", "spec.json")
    before = lineage.read(spec_uri)
    if before is None and storage.exists(storage.join(rdir, "predictions")):
        before = lineage.Lineage(stage=STAGE, id="unknown (no lineage recorded)")
    changes = now.changes_from(before) if before is not None else []
    if before is not None and changes:
        if incremental:
            old_model = before.inputs.get("model")
            changed = [c for c in changes if not c.startswith("input ")]
            if changed:
                raise UserError(f"{storage.redact(rdir)} holds predictions of model "
                                f"{old_model.content if old_model else 'unknown'}, not of "
                                f"{now.inputs['model'].content} ({'; '.join(changed)}): incremental scoring never "
                                "mixes two models in one run; use a new run id for the new model")
        else:
            log.info("score: %s holds other predictions (%s): replacing them", storage.redact(rdir), "; ".join(changes))
            for sub in ("predictions", "_state", "quarantine.parquet", layout.SUMMARY_FILES[STAGE]):
                storage.delete(storage.join(rdir, sub))
    storage.write_text(spec_uri, json.dumps(now.to_dict(), indent=2))


COMPILE_MIN_IMAGES = 5000  # per actor: where torch.compile's 5-25 s per model pays for itself (score.compile=auto)


def compile_decision(sc: ScoreConfig, images: int | None) -> tuple[bool, str]:
    """(compile the models?, why) for ``images`` left to score (None: not known before reading the shards)."""
    if sc.compile != "auto":
        return sc.compile == "on", f"{sc.compile} (configured)"
    if images is None:
        return False, "off (auto: the number of images is not known before the shards are read)"
    per_actor = images / sc.actors
    if per_actor >= COMPILE_MIN_IMAGES:
        return True, f"on (auto: {per_actor:,.0f} images per actor)"
    return False, f"off (auto: {per_actor:,.0f} images per actor, under {COMPILE_MIN_IMAGES:,})"


def stream(plan: WorkPlan, ens: Ensemble, sc: ScoreConfig, retry: storage.Retry, writer: PartWriter, pre,
           compiling: bool = False) -> None:
    """Run the Ray Data pipeline and hand every result batch to the writer."""
    import ray.data
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = ctx.enable_progress_bars
    memory = _decode_memory(sc, ens.size)
    # The decode fns take fn_kwargs besides the batch, which Ray's stubs of map_batches do not allow for.
    if plan.kind == "webdataset":
        ds = ray.data.from_arrow(plan.refs).repartition(target_num_rows_per_block=1).map_batches(
            decode_shards, batch_size=1, num_cpus=sc.decode_cpus, memory=memory,  # type: ignore[arg-type]
            fn_kwargs={"size": ens.size, "max_pixels": sc.max_pixels, "rows_per_batch": sc.batch_size,
                       "retry": retry, "pre": pre})
    else:
        # Blocks of one model batch: the decode tasks spread over every free CPU (a big block would be decoded by
        # one task on one core while the model waits).
        ds = ray.data.from_arrow_refs(plan.refs).repartition(target_num_rows_per_block=sc.batch_size).map_batches(
            decode_rows, batch_size=None, num_cpus=sc.decode_cpus, memory=memory,  # type: ignore[arg-type]
            fn_kwargs={"size": ens.size, "max_pixels": sc.max_pixels, "retry": retry, "pre": pre})
    resources: dict[str, Any] = {"resources": dict(sc.actor_resources)} if sc.actor_resources else {}
    ds = ds.map_batches(
        Predictor, batch_size=sc.batch_size, compute=ActorPoolStrategy(size=sc.actors),
        num_cpus=sc.cpus_per_actor, num_gpus=sc.num_gpus or None,
        **resources,
        fn_constructor_kwargs={"ensemble": ens, "threads": _threads(sc), "channels_last": sc.channels_last,
                               "tta": sc.tta, "use_gpu": sc.num_gpus > 0, "amp": sc.amp,
                               "slow_batch_s": fault_hooks().slow_batch_s,
                               "compile_batch": sc.batch_size if compiling else 0})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        writer.add(batch)
    if writer.pending:
        raise RuntimeError(f"score: parts {sorted(writer.pending)} did not complete")


def _decode_memory(sc: ScoreConfig, size: int) -> int:
    """Bytes a decode task holds (a worker process, its decoded batch a few times over). Declaring it also
    keeps decoding in its own tasks: Ray Data fuses a task step into the next actor step when their resource
    requests match, and the model actor would then decode and infer one after the other."""
    # A decode worker process (Python, numpy, pyarrow, PIL, Ray) held ~410 MB at batch 8 in the tests.
    return int(sc.batch_size * size * size * 3 * 4 + 384 * 2**20)


def _threads(sc: ScoreConfig) -> int:
    if sc.torch_threads:
        return sc.torch_threads
    import ray

    # The node's CPUs shared by the actors that may land on it (Ray starts workers with OMP_NUM_THREADS=1,
    # which would leave a CPU actor on one core).
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = max((n["Resources"].get("CPU", 1) for n in nodes), default=1)
    return max(int(sc.cpus_per_actor), int(per_node // max(1, min(sc.actors, len(nodes) * per_node))))


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
    for part in _run_state(rdir)[0]:
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
    return sum(storage.parquet_file(f).metadata.num_rows for f in _run_state(rdir)[0])


def check_input(sc: ScoreConfig) -> str:
    """The input's kind (manifest | folder | webdataset), with a manifest's columns checked: before Ray starts."""
    assert sc.input is not None  # run() refuses a config without score.input
    kind = archive.detect_kind(sc.input, sc.input_kind)
    if kind != "manifest":
        return kind
    schema = storage.parquet_file(sc.input).schema_arrow
    missing = [c for c in ("image_id", "uri") if c not in schema.names]
    if missing:
        raise UserError(f"{storage.redact(sc.input)}: the manifest has no {missing[0]!r} column (columns: "
                        f"{', '.join(schema.names)})")
    for c in ("image_id", "uri"):
        t = schema.field(c).type
        t = t.value_type if pa.types.is_dictionary(t) else t
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise UserError(f"{storage.redact(sc.input)}: column {c!r} must be strings, got {t}")
    return kind


def plan(cfg: RunConfig, kind: str, rdir: str, ens: Ensemble, task_fps) -> tuple[WorkPlan, lineage.Lineage]:
    """Fingerprint the input, reconcile the run's existing output with the lineage, then plan what to score."""
    sc = cfg.score
    assert sc.input is not None  # run() refuses a config without score.input
    if kind == "webdataset":
        shards = archive.shard_list(sc.input)
        now = score_lineage(ens, shards_fingerprint(shards), task_fps, cfg)
        reconcile(rdir, now, sc.incremental)
        return plan_shards(shards, rdir), now
    uri, problems = (sc.input, _quarantine_rows([])) if kind == "manifest" else folder_manifest(
        sc.input, sc.labels, rdir)
    chunks, fp, repeats, _ = fingerprint_manifest(uri, cfg.storage)
    now = score_lineage(ens, fp, task_fps, cfg)
    reconcile(rdir, now, sc.incremental)
    work = plan_manifest(uri, chunks, repeats, rdir, ens.model_id, sc)
    work.kind = kind
    work.quarantine = pa.concat_tables([problems, work.quarantine])
    work.input_rows += problems.num_rows
    return work, now


def lineage_now(cfg: RunConfig, recorded: lineage.Lineage | None = None) -> lineage.Lineage:
    sc = cfg.score
    if not sc.input:
        raise UserError("no input given: pass --input URI (config: score.input)")
    ens = artifacts.load_ensemble(sc.checkpoints, sc.model_id)
    task_fps = task_setup(cfg, ens)[3]
    kind = archive.detect_kind(sc.input, sc.input_kind)
    if kind == "webdataset":
        fp = shards_fingerprint(archive.shard_list(sc.input))
    elif kind == "folder":
        fp = lineage.columns_fingerprint(None, table := folder_table(sc.input, sc.labels)[0], table.column_names)
    else:
        def content():
            table = storage.read_table(sc.input)
            table = pa.table({c: (pc.cast(table.column(c), pa.string()) if pa.types.is_dictionary(
                table.column(c).type) else table.column(c)) for c in table.column_names})
            return lineage.columns_fingerprint(sc.input, table, table.column_names)
        fp = lineage.reuse(recorded, "input", sc.input, content)
    return score_lineage(ens, fp, task_fps, cfg)


def run(cfg: RunConfig) -> dict:
    """Score ``score.input`` with the ``score.checkpoints`` ensemble; returns the summary (also written as JSON)."""
    from dermray.runtime.raysession import check_shared_storage, ray_session

    sc = cfg.score
    t_start = time.perf_counter()
    if not sc.input:
        raise UserError("no input given: pass --input URI (config: score.input)")
    ens = artifacts.load_ensemble(sc.checkpoints, sc.model_id)
    tasks, membership, partition, task_fps = task_setup(cfg, ens)
    preprocessing(cfg, ens)  # a config that contradicts the model card fails here, before Ray starts
    kind = check_input(sc)
    rdir = layout.predictions_dir(cfg.output, cfg.run_id)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        check_shared_storage(cfg.storage, {"output": cfg.output, "score.input": sc.input})
        work, now = plan(cfg, kind, rdir, ens, task_fps)
        progress.say("score: %s images to score with %s (%d part(s)); %s already scored", "?" if work.input_rows is
                     None else f"{work.input_rows - work.already_done - work.quarantine.num_rows:,}", ens.model_id,
                     work.parts, f"{work.already_done:,}")
        carry = None
        if work.kind != "webdataset":
            carry = pa.schema([f for f in storage.parquet_file(
                sc.input if work.kind == "manifest" else storage.join(rdir, "_state", "folder_manifest.parquet"))
                .schema_arrow if f.name not in INTERNAL])
        total = None if work.input_rows is None else work.input_rows - work.already_done - work.quarantine.num_rows
        meter = progress.Meter("score", total, every_s=5.0)
        decided = model_decisions(ens, sc)
        writer = PartWriter(rdir, ens, tasks, membership, carry, meter, decided)
        t_wall = time.time()
        compiling, compile_why = compile_decision(sc, total)
        if work.refs:
            if compiling:
                progress.say("score: torch.compile %s", compile_why)
            stream(work, ens, sc, cfg.storage.retry(), writer, preprocessing(cfg, ens), compiling)
    quarantined_total = merge_quarantine(rdir, work.quarantine)
    summary = summarise(cfg, ens, work, writer, RunFacts(rdir, now, partition, quarantined_total, t_start, t_wall))
    summary["compile"] = compile_why if not (compiling and False in writer.compiled) else \
        f"{compile_why}; some actors fell back to eager (torch.compile failed there: see the job log)"
    storage.write_text(layout.summary_uri(cfg.output, STAGE, cfg.run_id), strict_json(summary))
    return summary


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
