"""Planning the work: tasks over the manifest's row groups (or the tar shards) fingerprint the input, quarantine
rows without an id or URI and repeated ids, leave out what this model has already scored in this run and cut the
rest into parts."""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core import ids
from dermray.errors import UserError
from dermray.runtime.config import ScoreConfig
from dermray.stages.score.shared import CHUNK, INPUT_ROW_HASH, INTERNAL, ROW, ROW_HASH, STAGE, TOTAL, log
from dermray.store import archive, lineage, schemas, storage
from dermray.store.archive import TRANSIENT


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
    # params: a Ray task: the object refs among its arguments are resolved by Ray only at the top level
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


def run_state(rdir: str) -> tuple[list[str], list[str], int]:
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

    parts, quar, batch = run_state(rdir)
    done = ray.remote(done_ids).remote(parts, model_id, quar)
    rep = ray.remote(merge_repeats).remote(*[r[0] for r in repeats], *[r[1] for r in repeats])
    work = ray.remote(num_returns=3)(plan_work)
    # num_returns > 1: .remote() gives a list of refs (Ray's stubs say one ObjectRef)
    refs = [cast(list, work.remote(uri, rg, off, rep, done, f"b{batch + 1:04d}-{k:05d}", sc.rows_per_file))
            for k, (rg, off, _) in enumerate(chunks)]
    counts = ray.get([r[2] for r in refs])
    quarantine = pa.concat_tables(ray.get([r[1] for r in refs])) if refs else quarantine_rows([])
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
    present = {posixpath.basename(f) for f in run_state(rdir)[0]}
    todo = [(s, _shard_chunk(s)) for s in shards if f"part-{_shard_chunk(s)}.parquet" not in present]
    refs = [pa.table({"uri": [s for s, _ in todo], CHUNK: [c for _, c in todo]})] if todo else []
    return WorkPlan("webdataset", refs, None, quarantine_rows([]), len(shards) - len(todo), len(todo))


def shards_fingerprint(shards: list[str]) -> lineage.Fingerprint:
    """Shards are not read twice: their URIs with what storage says of each (ETag and size, or size and mtime)."""
    return lineage.Fingerprint(method="etag+size", content=lineage.config_hash(
        [[storage.redact(s), storage.identity(s)] for s in shards]), rows=len(shards))


def _shard_chunk(shard: str) -> str:
    return "s" + hashlib.sha1(shard.encode()).hexdigest()[:12]


def quarantine_rows(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"stage": STAGE, **r} for r in rows], schema=schemas.QUARANTINE.arrow())
