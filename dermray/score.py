"""Scoring stage: trained fold models over an archive of images with Ray Data -> predictions Parquet.

Pipeline: the driver builds the list of work (manifest rows, a folder's images, or tar shards) and splits it into
chunks of ``score.rows_per_file`` images (one tar shard per chunk); Ray Data tasks read, decode and resize the
images (uint8, the evaluation transform of training); an actor pool (``map_batches(Predictor,
compute=ActorPoolStrategy)``) holds the model(s), built once per actor from the checkpoint(s), and averages the
softmax of every fold model (the ensemble) and every test-time-augmentation view; the driver streams the results
and writes each chunk, once complete, as one Parquet part (atomically), its quarantined images beside it.

Outputs under ``<output>/predictions/<run_id>/``: ``predictions/part-*.parquet`` (one table: read the folder),
``quarantine.parquet``, ``score_summary.json``; ``_state/`` holds what a re-run needs. A re-run of the same run
skips the images already written (a crash loses at most the chunks in flight, never duplicates); a run with another
input or model replaces the old output, unless ``score.incremental``, which only adds the images this model_id has
not scored yet (the nightly case).

Columns: ``image_id``, ``model_id``, ``probs`` (list<float32> over training classes, class_index order),
``top_class``, per task ``<task>_probs`` (task-class probabilities through the paper's inference algorithm) and
for binary tasks ``<task>_score`` (P(pos) / (P(pos) + P(neg))), then the manifest's columns (label, label_source,
modality, group_id, uri, ...) carried through.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dermray import schemas, storage
from dermray.config import RunConfig, ScoreConfig
from dermray.errors import UserError

log = logging.getLogger("dermray.score")
STAGE = "score"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
WDS_META = ("label", "label_source", "modality", "group_id")  # WebDataset .json keys that become columns
MAX_MEMBER_BYTES = 256 * 1024 * 1024


# ---- models ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ensemble:
    """The fold models to average: their weights files and what their model cards say."""
    weights: tuple[str, ...]
    cards: tuple[dict, ...]
    arch: str
    n_classes: int
    size: int  # input pixels, square
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes_hash: str
    model_id: str

    @property
    def classes(self) -> list[dict]:
        return self.cards[0]["training_classes"]


def _card_for(uri: str) -> tuple[str, dict]:
    """(weights URI, model card) for a fold directory or a model.pt inside one."""
    if uri.endswith(".pt"):
        here = storage.parent(uri)
        candidates = [storage.join(here, "model_card.json"), storage.join(storage.parent(here), "model_card.json")]
        weights = uri
    else:
        candidates = [storage.join(uri, "model_card.json")]
        weights = storage.join(uri, "best", "model.pt")
    for c in candidates:
        if storage.exists(c):
            return weights, json.loads(storage.read_text(c))
    raise UserError(f"no model_card.json for checkpoint {storage.redact(uri)}: pass a fold directory written by "
                    "`dermray train` (…/train/<run>/fold=<k>), its best/model.pt, or the run directory")


def resolve_checkpoints(uris: list[str]) -> list[tuple[str, dict]]:
    """Expand each URI (a train run directory -> its cross-validation folds) to (weights, card) pairs."""
    out = []
    for uri in uris:
        uri = uri.strip().rstrip("/")
        if not uri:
            continue
        if not uri.endswith(".pt") and not storage.exists(storage.join(uri, "model_card.json")):
            cards = [c for c in storage.list_files(uri, ("model_card.json",))
                     if posixpath.basename(posixpath.dirname(c)).startswith("fold=")]
            cv = [c for c in cards if not c.endswith("fold=all/model_card.json")]
            if not (cv or cards):
                raise UserError(f"checkpoint {storage.redact(uri)}: no fold=<k>/model_card.json below it (is it a "
                                "`dermray train` output?)")
            out.extend(_card_for(storage.parent(c)) for c in (cv or cards))
        else:
            out.append(_card_for(uri))
    if not out:
        raise UserError("no checkpoint given: pass --checkpoint URI[,URI...] (config: score.checkpoints)")
    return out


def load_ensemble(uris: list[str], model_id: str | None = None) -> Ensemble:
    from dermray.models import spec

    pairs = resolve_checkpoints(uris)
    cards = [c for _, c in pairs]
    first = cards[0]
    for (w, c) in pairs[1:]:
        for key in ("classes_hash", "architecture", "input_size"):
            if c.get(key) != first.get(key):
                raise UserError(f"checkpoints cannot be averaged: {storage.redact(w)} has {key} {c.get(key)!r}, "
                                f"the first has {first.get(key)!r}")
    s = spec(first["architecture"])
    if model_id is None:
        ids = [c.get("model_id", "?") for c in cards]
        if len(ids) == 1:
            model_id = ids[0]
        else:
            runs = {i.rsplit("/", 1)[0] for i in ids}
            folds = ",".join(i.rsplit("fold=", 1)[-1] for i in ids)
            model_id = f"{runs.pop() if len(runs) == 1 else 'models'}/ensemble(fold={folds})"
    norm = first.get("normalisation", {})
    return Ensemble(tuple(w for w, _ in pairs), tuple(cards), s.name, len(first["training_classes"]),
                    int(first.get("input_size") or s.input_size), tuple(norm.get("mean", s.mean)),
                    tuple(norm.get("std", s.std)), first["classes_hash"], model_id)


# ---- inputs ------------------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """WebDataset shard patterns: ``shard-{000..009}.tar`` -> ten names (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [x for i in range(int(lo), int(hi) + 1) for x in expand_braces(f"{head}{i:0{width}d}{tail}")]


def detect_kind(uri: str, kind: str) -> str:
    if kind != "auto":
        if kind not in ("manifest", "folder", "webdataset"):
            raise UserError(f"score.input_kind must be auto, manifest, folder or webdataset, got {kind!r}")
        return kind
    low = uri.lower()
    if low.endswith(".parquet"):
        return "manifest"
    if low.endswith((".tar", ".txt")) or re.search(r"\{\d+\.\.\d+\}", uri):
        return "webdataset"
    if not storage.exists(uri):
        raise UserError(f"score input {storage.redact(uri)}: no such file, folder or prefix")
    fs, path = storage.filesystem(uri)
    names = [posixpath.basename(p).lower() for p in fs.ls(path, detail=False)]
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    return "folder"


def shard_list(uri: str) -> list[str]:
    """Shard URIs from a .tar, a brace pattern, a .txt list (one URI per line, relative to the list) or a folder."""
    if re.search(r"\{\d+\.\.\d+\}", uri):
        return expand_braces(uri)
    if uri.lower().endswith(".tar"):
        return [uri]
    if uri.lower().endswith(".txt"):
        base = storage.parent(uri)
        lines = [ln.strip() for ln in storage.read_text(uri).splitlines()]
        return [storage.resolve(ln, base) for ln in lines if ln and not ln.startswith("#")]
    shards = list(storage.list_files(uri, (".tar",)))
    if not shards:
        raise UserError(f"score input {storage.redact(uri)}: no .tar shards in it")
    return shards


def _quarantine_rows(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"stage": STAGE, **r} for r in rows], schema=schemas.QUARANTINE.arrow())


def manifest_items(uri: str) -> tuple[pa.Table, list[dict]]:
    """(items, quarantine rows): the manifest with resolved URIs and its row numbers; rows with a missing id or uri
    and repeated image_ids are quarantined (the first occurrence is scored)."""
    table = storage.read_table(uri)
    source = storage.redact(uri)
    missing = [c for c in ("image_id", "uri") if c not in table.column_names]
    if missing:
        raise UserError(f"{source}: the manifest has no {missing[0]!r} column (columns: {', '.join(table.column_names)})")
    for c in ("image_id", "uri"):
        if not pa.types.is_string(table.schema.field(c).type) and not pa.types.is_large_string(table.schema.field(c).type):
            raise UserError(f"{source}: column {c!r} must be strings, got {table.schema.field(c).type}")
    base = storage.parent(uri)
    ids = table.column("image_id").to_pylist()
    uris = table.column("uri").to_pylist()
    quarantine, keep, first_row = [], [], {}
    for i, (image_id, u) in enumerate(zip(ids, uris)):
        if image_id is None or image_id == "":
            quarantine.append({"image_id": None, "row": i, "uri": u, "reason": "missing image_id"})
        elif u is None or u == "":
            quarantine.append({"image_id": image_id, "row": i, "uri": None, "reason": "missing uri"})
        elif image_id in first_row:
            quarantine.append({"image_id": image_id, "row": i, "uri": u,
                               "reason": f"duplicate image_id (first seen at row {first_row[image_id]})"})
        else:
            first_row[image_id] = i
            keep.append(i)
    table = table.take(pa.array(keep, pa.int64()))
    resolved = [storage.resolve(u, base) for u in table.column("uri").to_pylist()]
    table = table.set_column(table.column_names.index("uri"), "uri", pa.array(resolved, pa.string()))
    return table.append_column("row", pa.array(keep, pa.int64())), quarantine


def folder_items(uri: str, labels_uri: str | None) -> tuple[pa.Table, list[dict]]:
    """Images under a folder/prefix (image_id = file name without extension), joined with an optional labels table;
    labelled images that are not in the folder are quarantined as missing."""
    files = list(storage.list_files(uri, IMAGE_SUFFIXES))
    ids = [posixpath.splitext(posixpath.basename(f))[0] for f in files]
    table = pa.table({"image_id": pa.array(ids, pa.string()), "uri": pa.array(files, pa.string())})
    quarantine = []
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        for i in np.flatnonzero(dup):
            quarantine.append({"image_id": ids[i], "row": None, "uri": files[i],
                               "reason": "another file in the folder has the same image_id (name without extension)"})
        table = table.filter(pa.array(~dup))
    if labels_uri:
        labels = storage.read_table_any(labels_uri)
        if "image_id" not in labels.column_names:
            raise UserError(f"{storage.redact(labels_uri)}: the labels table has no 'image_id' column")
        labels = labels.set_column(labels.column_names.index("image_id"), "image_id",
                                   pc.cast(labels.column("image_id"), pa.string()))
        labels = labels.drop_columns([c for c in ("uri", "row") if c in labels.column_names])
        present = set(table.column("image_id").to_pylist())
        for i, image_id in enumerate(labels.column("image_id").to_pylist()):
            if image_id not in present:
                quarantine.append({"image_id": image_id, "row": i, "uri": None,
                                   "reason": f"listed in {posixpath.basename(labels_uri)} but no image file in the folder"})
        labels = labels.filter(pc.invert(pd.Series(labels.column("image_id").to_pylist()).duplicated().to_numpy()))
        table = table.join(labels, "image_id", join_type="left outer").sort_by("image_id")
    return table.append_column("row", pa.array([None] * table.num_rows, pa.int64())), quarantine


# ---- Ray Data functions (run in tasks and actors) ------------------------------------------------------------------
def _fetch_all(uris: list[str]) -> list:
    """Bytes of each URI, or the UserError that reading it raised. Object stores are latency-bound: fetch in threads."""
    def fetch(u):
        try:
            return storage.read_bytes(u)
        except UserError as e:
            return e
    if uris and storage.is_s3(uris[0]):
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(fetch, uris))
    return [fetch(u) for u in uris]


def _decode_one(data, size: int, max_pixels: int):
    """(uint8 [size, size, 3] or None, error or "")."""
    from dermray.transforms import ImageDecodeError, decode_image, eval_transform

    if isinstance(data, Exception):
        return None, str(data)
    try:
        img = eval_transform(decode_image(data, max_pixels), size)
        return np.asarray(img, dtype=np.uint8), ""
    except ImageDecodeError as e:
        return None, str(e)


def _stack(images: list, size: int) -> np.ndarray:
    blank = np.zeros((size, size, 3), np.uint8)
    return np.stack([blank if im is None else im for im in images]) if images else np.zeros((0, size, size, 3),
                                                                                           np.uint8)


def decode_rows(batch: dict, size: int, max_pixels: int) -> dict:
    """Ray Data batch fn over work rows (image_id, uri, row, chunk, chunk_total): read + decode + resize ->
    ``image`` uint8 [B, size, size, 3], ``error`` ("" when the image is usable); other columns pass through."""
    decoded = [_decode_one(d, size, max_pixels) for d in _fetch_all(list(batch["uri"]))]
    out = {k: v for k, v in batch.items()}
    out["image"] = _stack([d[0] for d in decoded], size)
    out["error"] = np.array([d[1] for d in decoded], dtype=object)
    out["meta"] = np.array([""] * len(decoded), dtype=object)
    return out


def read_shard(data: bytes, shard: str) -> tuple[list[dict], list[dict]]:
    """A WebDataset tar in memory -> (samples {key, image_id, member, data, meta}, problems {key, member, reason}).

    Nothing is extracted to disk; members that are not regular files (symlinks, devices), have absolute or ``..``
    paths, or are larger than 256 MB are reported, not read. A sample is the files sharing a key (the member path
    up to the first dot of its base name); its image is the first image member, its labels the ``.json`` member."""
    samples: dict[str, dict] = {}
    problems = []
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        return [], [{"key": None, "member": None, "reason": f"not a readable tar archive: {e}"}]
    for m in members:
        name = m.name
        if m.isdir():
            continue
        norm = posixpath.normpath(name)
        if name.startswith("/") or norm.startswith("..") or "/../" in f"/{name}/":
            problems.append({"key": name, "member": name, "reason": "unsafe member path (absolute or '..'): not read"})
            continue
        if not m.isfile():
            kind = "symlink" if m.issym() else "hard link" if m.islnk() else "special file"
            problems.append({"key": name, "member": name, "reason": f"tar member is a {kind}, not a regular file"})
            continue
        base = posixpath.basename(norm)
        if base.startswith("."):
            continue
        stem, _, ext = base.partition(".")
        key = posixpath.join(posixpath.dirname(norm), stem)
        s = samples.setdefault(key, {"key": key, "image": None, "json": None})
        ext = "." + ext.lower()
        if m.size > MAX_MEMBER_BYTES:
            problems.append({"key": key, "member": name, "reason": f"tar member larger than {MAX_MEMBER_BYTES} bytes"})
            s["too_big"] = True
            continue
        if ext in IMAGE_SUFFIXES and s["image"] is None:
            s["image"] = m
        elif ext == ".json":
            s["json"] = m
    out = []
    for key, s in samples.items():
        meta = {}
        if s["json"] is not None:
            try:
                meta = json.loads(tar.extractfile(s["json"]).read().decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError) as e:
                problems.append({"key": key, "member": s["json"].name, "reason": f"unreadable labels JSON: {e}"})
                continue
        image_id = str(meta.get("image_id") or key)
        if s["image"] is None:
            if not s.get("too_big"):
                problems.append({"key": image_id, "member": key, "reason": "no image member for this key in the shard"})
            continue
        out.append({"key": key, "image_id": image_id, "member": s["image"].name,
                    "data": tar.extractfile(s["image"]).read(), "meta": meta})
    return out, problems


def decode_shards(batch: dict, size: int, max_pixels: int, rows_per_batch: int):
    """Ray Data batch fn over shard rows (uri, chunk): yields decoded samples in batches of ``rows_per_batch`` (a
    shard is read once, whole; its sample count is every row's ``chunk_total``, so the driver knows when it is done)."""
    for shard, chunk in zip(batch["uri"], batch["chunk"]):
        try:
            samples, problems = read_shard(storage.read_bytes(shard), shard)
        except UserError as e:
            samples, problems = [], [{"key": None, "member": None, "reason": str(e)}]
        total = len(samples) + len(problems)
        rows = [{"image_id": p["key"] or "", "uri": f"{shard}#{p['member']}" if p["member"] else shard,
                 "data": None, "error": p["reason"], "meta": ""} for p in problems]
        rows += [{"image_id": s["image_id"], "uri": f"{shard}#{s['member']}", "data": s["data"], "error": "",
                  "meta": json.dumps({k: s["meta"].get(k) for k in s["meta"]}, default=str)} for s in samples]
        for i in range(0, len(rows), rows_per_batch):
            part = rows[i:i + rows_per_batch]
            decoded = [_decode_one(r["data"], size, max_pixels) if not r["error"] else (None, r["error"])
                       for r in part]
            yield {"image_id": np.array([r["image_id"] for r in part], dtype=object),
                   "uri": np.array([r["uri"] for r in part], dtype=object),
                   "row": np.full(len(part), -1, np.int64), "chunk": np.array([chunk] * len(part), dtype=object),
                   "chunk_total": np.full(len(part), total, np.int64),
                   "image": _stack([d[0] for d in decoded], size),
                   "error": np.array([d[1] for d in decoded], dtype=object),
                   "meta": np.array([r["meta"] for r in part], dtype=object)}
        if total == 0:  # an empty shard still completes its chunk
            yield {"image_id": np.array([""], dtype=object), "uri": np.array([shard], dtype=object),
                   "row": np.array([-1], np.int64), "chunk": np.array([chunk], dtype=object),
                   "chunk_total": np.array([0], np.int64), "image": _stack([None], size),
                   "error": np.array(["<empty shard>"], dtype=object), "meta": np.array([""], dtype=object)}


def tta_views(x, mode: str) -> list:
    """The test-time-augmentation views of a [B, 3, S, S] batch (square images)."""
    import torch

    if mode == "none":
        return [x]
    if mode == "flips":
        return [x, torch.flip(x, dims=[3]), torch.flip(x, dims=[2])]
    if mode == "dihedral":
        rots = [torch.rot90(x, k, dims=[2, 3]) for k in range(4)]
        return rots + [torch.flip(r, dims=[3]) for r in rots]
    raise ValueError(mode)


class Predictor:
    """Ray Data actor: the ensemble's models, built once; ``__call__`` maps decoded images to the mean softmax over
    models and views (float32 [B, n_classes]); rows with an ``error`` are passed through unscored."""

    def __init__(self, ensemble: Ensemble, threads: int, channels_last: bool, tta: str, use_gpu: bool,
                 amp: str = "off", slow_batch_s: float = 0.0):
        import torch

        from dermray.models import build_model

        torch.set_num_threads(max(1, threads))
        # Ray hands out read-only arrays; the tensors made from them are only read (a float copy is normalised).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.models = []
        for w in ensemble.weights:
            m = build_model(ensemble.arch, ensemble.n_classes, weights=w).to(self.device).eval()
            if channels_last:
                m = m.to(memory_format=torch.channels_last)
            self.models.append(m)
        self.channels_last, self.tta = channels_last, tta
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "off"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.mean = torch.tensor(ensemble.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(ensemble.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.n_classes = ensemble.n_classes
        self.slow_batch_s = slow_batch_s  # tests: stretch a run so that a fault can land inside it

    def __call__(self, batch: dict) -> dict:
        import torch

        from dermray.models import logits_of

        t_start = time.time()
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        probs = np.zeros((len(ok), self.n_classes), np.float32)
        if ok.any():
            with torch.inference_mode():
                # NHWC uint8 -> NCHW float32 whose memory stays NHWC: channels_last with no copy.
                images = batch["image"] if ok.all() else batch["image"][ok]  # a mask copies the whole batch
                x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
                x = (x.float() - self.mean) / self.std
                if not self.channels_last:
                    x = x.contiguous()
                total = None
                for view in tta_views(x, self.tta):
                    for m in self.models:
                        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                            enabled=self.autocast_dtype is not None):
                            logits = logits_of(m(view))
                        p = torch.softmax(logits.float(), dim=1)
                        total = p if total is None else total + p
                probs[ok] = (total / (len(self.models) * len(tta_views(x[:0], self.tta)))).cpu().numpy()
        if self.slow_batch_s:
            time.sleep(self.slow_batch_s)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probs"] = probs
        # When this batch's model work ran (wall clock): the steady rate excludes start-up and output bunching.
        out["t_model"] = np.tile(np.array([[t_start, time.time()]]), (len(ok), 1))
        return out


# ---- the stage ----------------------------------------------------------------------------------------------------
def run_dir(cfg: RunConfig) -> str:
    return storage.join(cfg.output, "predictions", cfg.run_id)


def _done(rdir: str, model_id: str) -> tuple[set, set, int]:
    """(image_ids already scored by model_id, image_ids quarantined by earlier chunks, last batch number)."""
    scored, quarantined, batch = set(), set(), 0
    pdir = storage.join(rdir, "predictions")
    for f in (storage.list_files(pdir, (".parquet",)) if storage.exists(pdir) else []):
        name = posixpath.basename(f)
        if name.startswith("."):
            continue
        m = re.match(r"part-b(\d+)-", name)
        if m:
            batch = max(batch, int(m.group(1)))
        t = storage.read_table(f, columns=["image_id", "model_id"])
        scored.update(t.filter(pc.equal(t.column("model_id"), model_id)).column("image_id").to_pylist())
    sdir = storage.join(rdir, "_state")
    for f in (storage.list_files(sdir, (".parquet",)) if storage.exists(sdir) else []):
        name = posixpath.basename(f)
        if name.startswith("quarantine-b") or name.startswith("quarantine-s"):
            m = re.match(r"quarantine-b(\d+)-", name)
            if m:
                batch = max(batch, int(m.group(1)))
            quarantined.update(x for x in storage.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
                               if x is not None)
    return scored, quarantined, batch


def _signature(kind: str, items: pa.Table | None, shards: list[str] | None, ens: Ensemble, sc: ScoreConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([kind, ens.model_id, list(ens.weights), sc.tta, ens.size]).encode())
    if items is not None:
        h.update(pd.util.hash_pandas_object(items.select(["image_id", "uri"]).to_pandas(), index=False)
                 .to_numpy().tobytes())
    else:
        h.update("\n".join(shards).encode())
    return h.hexdigest()[:16]


def _task_setup(cfg: RunConfig, ens: Ensemble):
    """Tasks and membership for the task columns, or ([], None) when no tasks are configured."""
    if not (cfg.data.tasks and cfg.data.taxonomy):
        log.info("no data.tasks / data.taxonomy: writing training-class probabilities only")
        return [], None
    from dermray.tasks import load_tasks
    from dermray.taxonomy import load_taxonomy
    from dermray.train import classes_hash

    part = cfg.score.partition or storage.join(cfg.output, "partition")
    tm_uri = storage.join(part, "task_membership.parquet")
    if not storage.exists(tm_uri):
        raise UserError(f"task columns need the partition's task_membership.parquet, not found at "
                        f"{storage.redact(tm_uri)} (set score.partition)")
    classes = storage.read_table(storage.join(part, "training_classes.parquet"))
    if classes_hash(classes) != ens.classes_hash:
        raise UserError(f"the model was trained on other training classes than {storage.redact(part)} holds "
                        f"(hash {ens.classes_hash} vs {classes_hash(classes)}): set score.partition to its partition")
    tasks = load_tasks(cfg.data.tasks, load_taxonomy(cfg.data.taxonomy))
    return tasks, storage.read_table(tm_uri).to_pandas()


def _threads(sc: ScoreConfig) -> int:
    if sc.torch_threads:
        return sc.torch_threads
    import ray

    # The node's CPUs shared by the actors that may land on it (Ray starts workers with OMP_NUM_THREADS=1,
    # which would leave a CPU actor on one core).
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = max((n["Resources"].get("CPU", 1) for n in nodes), default=1)
    return max(int(sc.cpus_per_actor), int(per_node // max(1, min(sc.actors, len(nodes) * per_node))))


class _Writer:
    """Collects the streamed rows of each chunk and writes the chunk when all its rows have arrived."""

    def __init__(self, rdir: str, ens: Ensemble, items: pa.Table | None, tasks, membership, skip_ids: set):
        self.rdir, self.ens, self.items, self.tasks, self.membership = rdir, ens, items, tasks, membership
        self.skip_ids = skip_ids
        self.pending: dict[str, list[dict]] = {}
        self.received: dict[str, int] = {}
        self.scored = self.quarantined = self.skipped = self.files = 0
        self.t_model = [np.inf, -np.inf]  # first model batch start, last model batch end (epoch seconds)
        self.node_ids = [c["node_id"] for c in ens.classes]

    def add(self, batch: dict) -> None:
        if len(batch["t_model"]):
            self.t_model = [min(self.t_model[0], float(batch["t_model"][:, 0].min())),
                            max(self.t_model[1], float(batch["t_model"][:, 1].max()))]
        chunks = batch["chunk"]
        for chunk in pd.unique(chunks):
            sel = chunks == chunk
            self.pending.setdefault(chunk, []).append({k: v[sel] for k, v in batch.items()})
            self.received[chunk] = self.received.get(chunk, 0) + int(sel.sum())
            if self.received[chunk] >= int(batch["chunk_total"][sel][0]):
                self.flush(chunk)

    def flush(self, chunk: str) -> None:
        parts = self.pending.pop(chunk)
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        real = np.array([not (e == "<empty shard>") for e in cols["error"]], bool)
        cols = {k: v[real] for k, v in cols.items()}
        bad = np.array([e != "" for e in cols["error"]], bool)
        skip = np.array([i in self.skip_ids for i in cols["image_id"]], bool) & ~bad
        good = ~bad & ~skip
        qrows = [{"image_id": i or None, "row": int(r) if r >= 0 else None, "uri": storage.redact(u), "reason": e}
                 for i, r, u, e in zip(cols["image_id"][bad], cols["row"][bad], cols["uri"][bad], cols["error"][bad])]
        storage.write_table(_quarantine_rows(qrows), storage.join(self.rdir, "_state", f"quarantine-{chunk}.parquet"))
        table = self.predictions_table({k: v[good] for k, v in cols.items()})
        storage.write_table(table, storage.join(self.rdir, "predictions", f"part-{chunk}.parquet"))
        self.scored += table.num_rows
        self.quarantined += len(qrows)
        self.skipped += int(skip.sum())
        self.files += 1
        log.info("score: chunk %s written: %d scored, %d quarantined", chunk, table.num_rows, len(qrows))

    def predictions_table(self, cols: dict) -> pa.Table:
        from dermray.evaluate import binary_score, task_probabilities

        n = len(cols["image_id"])
        probs = np.asarray(cols["probs"], np.float32).reshape(n, self.ens.n_classes)
        order = np.argsort(cols["image_id"].astype(str), kind="stable")
        probs = probs[order]
        cols = {k: v[order] for k, v in cols.items()}
        top = probs.argmax(axis=1) if n else np.zeros(0, np.int64)
        data = {
            "image_id": pa.array(cols["image_id"].tolist(), pa.string()),
            "model_id": pa.array([self.ens.model_id] * n, pa.string()),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), self.ens.n_classes)
            .cast(pa.list_(pa.float32())),
            "top_class": pa.array(top, pa.int32()),
            "top_node": pa.array([self.node_ids[i] for i in top], pa.string()),
        }
        for task in self.tasks:
            tp = task_probabilities(probs.astype(np.float64), self.membership, task).astype(np.float32)
            data[f"{task.name}_probs"] = pa.FixedSizeListArray.from_arrays(
                pa.array(tp.reshape(-1)), len(task.classes)).cast(pa.list_(pa.float32()))
            if task.is_binary:
                pos = task.class_names.index(task.positive)
                data[f"{task.name}_score"] = pa.array(binary_score(tp, pos).astype(np.float32))
        if self.items is not None:
            carry = self.items.take(pa.array(cols["item"].astype(np.int64)))
            for name in carry.column_names:
                if name not in data and name != "item":
                    data[name] = carry.column(name)
        else:
            metas = [json.loads(m) if m else {} for m in cols["meta"]]
            for key in WDS_META:
                data[key] = pa.array([None if m.get(key) is None else str(m[key]) for m in metas], pa.string())
            data["uri"] = pa.array(cols["uri"].tolist(), pa.string())
        return pa.table(data)


def run(cfg: RunConfig) -> dict:
    """Score ``score.input`` with the ``score.checkpoints`` ensemble; returns the summary (also written as JSON)."""
    from dermray.raysession import ray_session

    sc = cfg.score
    t_start = time.perf_counter()
    if not sc.input:
        raise UserError("no input given: pass --input URI (config: score.input)")
    if sc.tta not in ("none", "flips", "dihedral"):
        raise UserError(f"score.tta must be none, flips or dihedral, got {sc.tta!r}")
    if sc.amp not in ("auto", "bf16", "fp16", "off"):
        raise UserError(f"score.amp must be auto, bf16, fp16 or off, got {sc.amp!r}")
    if sc.batch_size < 1 or sc.actors < 1 or sc.rows_per_file < 1:
        raise UserError("score.batch_size, score.actors and score.rows_per_file must be at least 1")
    ens = load_ensemble(sc.checkpoints, sc.model_id)
    tasks, membership = _task_setup(cfg, ens)
    kind = detect_kind(sc.input, sc.input_kind)
    rdir = run_dir(cfg)
    items, shards, input_q = None, None, []
    if kind == "manifest":
        items, input_q = manifest_items(sc.input)
    elif kind == "folder":
        items, input_q = folder_items(sc.input, sc.labels)
    else:
        shards = shard_list(sc.input)
    n_input = (items.num_rows if items is not None else 0) + len(input_q)
    signature = _signature(kind, items, shards, ens, sc)
    spec_uri = storage.join(rdir, "_state", "spec.json")
    if storage.exists(spec_uri) and not sc.incremental:
        if json.loads(storage.read_text(spec_uri)).get("signature") != signature:
            log.info("score: %s holds another input or model: replacing it", storage.redact(rdir))
            for sub in ("predictions", "_state", "quarantine.parquet", "score_summary.json"):
                storage.delete(storage.join(rdir, sub))
    storage.write_text(spec_uri, json.dumps({"signature": signature, "model_id": ens.model_id, "kind": kind,
                                             "input": storage.redact(sc.input)}))
    storage.write_table(_quarantine_rows(input_q), storage.join(rdir, "_state", "quarantine-input.parquet"))
    scored_ids, quarantined_ids, last_batch = _done(rdir, ens.model_id)
    batch_no = last_batch + 1
    work, done_before = [], 0
    if items is not None:
        items = items.append_column("item", pa.array(np.arange(items.num_rows), pa.int64()))
        done_mask = np.array([i in scored_ids or i in quarantined_ids for i in items.column("image_id").to_pylist()],
                             bool)
        done_before = int(done_mask.sum())
        todo = items.filter(pa.array(~done_mask)) if done_before else items
        for k, start in enumerate(range(0, todo.num_rows, sc.rows_per_file)):
            chunk = todo.slice(start, sc.rows_per_file)
            name = f"b{batch_no:04d}-{k:05d}"
            work.append(pa.table({"image_id": chunk.column("image_id"), "uri": chunk.column("uri"),
                                  "row": pc.fill_null(chunk.column("row"), -1), "item": chunk.column("item"),
                                  "chunk": pa.array([name] * chunk.num_rows, pa.string()),
                                  "chunk_total": pa.array([chunk.num_rows] * chunk.num_rows, pa.int64())}))
    else:
        present = {posixpath.basename(f) for f in (storage.list_files(storage.join(rdir, "predictions"), (".parquet",))
                                                     if storage.exists(storage.join(rdir, "predictions")) else [])}
        for shard in shards:
            name = "s" + hashlib.sha1(shard.encode()).hexdigest()[:12]
            if f"part-{name}.parquet" in present:
                done_before += 1
                continue
            work.append(pa.table({"uri": [shard], "chunk": [name]}))
    summary = {"stage": STAGE, "run_id": cfg.run_id, "model_id": ens.model_id, "input_kind": kind,
               "models": len(ens.weights), "arch": ens.arch, "tta": sc.tta}
    writer = _Writer(rdir, ens, items, tasks, membership, scored_ids | quarantined_ids)
    t_wall = time.time()
    if work:
        with ray_session(cfg.ray.address, cfg.ray.num_cpus):
            _stream(work, kind, ens, sc, writer)
    quarantine = _merge_quarantine(rdir)
    scored_total = sum(storage.parquet_file(f).metadata.num_rows
                       for f in storage.list_files(storage.join(rdir, "predictions"), (".parquet",))
                       if not posixpath.basename(f).startswith(".")) if storage.exists(
                           storage.join(rdir, "predictions")) else 0
    if kind == "webdataset":
        n_input = writer.scored + writer.quarantined + writer.skipped
    processed = writer.scored + writer.quarantined + writer.skipped
    summary.update({
        "input": n_input, "shards": len(shards) if shards else None,
        "shards_done_before": done_before if shards else None,
        "already_done": done_before if items is not None else writer.skipped,
        "scored": writer.scored, "quarantined": writer.quarantined + len(input_q),
        "files_written": writer.files, "run_scored_total": scored_total, "run_quarantined_total": quarantine,
        "images_per_s": round(processed / (time.perf_counter() - t_start), 2) if work else None,
        # From the first model batch's start to the last one's end: the pipeline's rate once running (the
        # benchmark's figure); start-up (Ray, actors, models, first decode) is the time before it.
        "steady_images_per_s": round(processed / (writer.t_model[1] - writer.t_model[0]), 2)
        if work and writer.t_model[1] > writer.t_model[0] else None,
        "startup_s": round(writer.t_model[0] - t_wall, 2) if work and np.isfinite(writer.t_model[0]) else None,
        "seconds": round(time.perf_counter() - t_start, 2),
        "outputs": {"predictions": storage.join(rdir, "predictions"),
                    "quarantine": storage.join(rdir, "quarantine.parquet")},
    })
    if items is not None and summary["input"] != summary["already_done"] + summary["scored"] + summary["quarantined"]:
        raise RuntimeError(f"score: counts do not add up: {summary}")  # a bug, never a user error
    storage.write_text(storage.join(rdir, "score_summary.json"), json.dumps(summary, indent=2, default=str))
    return summary


def _decode_memory(sc: ScoreConfig, size: int) -> int:
    """Bytes a decode task holds (a worker process, its decoded batch a few times over). Declaring it also
    keeps decoding in its own tasks: Ray Data fuses a task step into the next actor step when their resource
    requests match, and the model actor would then decode and infer one after the other."""
    return int(sc.batch_size * size * size * 3 * 4 + 128 * 2**20)


def _stream(work: list[pa.Table], kind: str, ens: Ensemble, sc: ScoreConfig, writer: _Writer) -> None:
    """Run the Ray Data pipeline and hand every result batch to the writer."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from dermray.raysession import blocks_of

    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = ctx.enable_progress_bars
    if kind == "webdataset":
        ds = ray.data.from_arrow(work).map_batches(
            decode_shards, batch_size=1, num_cpus=sc.decode_cpus, memory=_decode_memory(sc, ens.size),
            fn_kwargs={"size": ens.size, "max_pixels": sc.max_pixels, "rows_per_batch": sc.batch_size})
    else:
        # One block per model batch: the decode tasks spread over every free CPU (one big block would be decoded
        # by one task on one core while the model waits: the naive pipeline's problem).
        ds = ray.data.from_arrow(blocks_of(pa.concat_tables(work), sc.batch_size)).map_batches(
            decode_rows, batch_size=None, num_cpus=sc.decode_cpus, memory=_decode_memory(sc, ens.size),
            fn_kwargs={"size": ens.size, "max_pixels": sc.max_pixels})
    ds = ds.map_batches(
        Predictor, batch_size=sc.batch_size, compute=ActorPoolStrategy(size=sc.actors),
        num_cpus=sc.cpus_per_actor, num_gpus=sc.num_gpus or None,
        fn_constructor_kwargs={"ensemble": ens, "threads": _threads(sc), "channels_last": sc.channels_last,
                               "tta": sc.tta, "use_gpu": sc.num_gpus > 0, "amp": sc.amp,
                               "slow_batch_s": float(os.environ.get("DERMRAY_TEST_SLOW_BATCH_S", "0"))})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        writer.add(batch)
    if writer.pending:
        raise RuntimeError(f"score: chunks {sorted(writer.pending)} did not complete")


def _merge_quarantine(rdir: str) -> int:
    """All quarantine parts of the run -> quarantine.parquet (atomically). Returns its rows."""
    sdir = storage.join(rdir, "_state")
    parts = [f for f in storage.list_files(sdir, (".parquet",)) if posixpath.basename(f).startswith("quarantine-")]
    tables = [storage.read_table(f) for f in parts]
    table = pa.concat_tables(tables) if tables else _quarantine_rows([])
    storage.write_table(table, storage.join(rdir, "quarantine.parquet"))
    return table.num_rows


def format_summary(s: dict) -> str:
    if s["input_kind"] == "webdataset":
        head = (f"score: {s['shards']} shards ({s['shards_done_before']} done before): {s['scored']} scored + "
                f"{s['quarantined']} quarantined + {s['already_done']} already scored")
    else:
        head = (f"score: {s['input']} images = {s['scored']} scored + {s['quarantined']} quarantined + "
                f"{s['already_done']} done before")
    lines = [head + f" ({s['seconds']} s)",
             f"  model {s['model_id']} ({s['arch']}, {s['models']} model(s), tta {s['tta']})",
             f"  run totals: {s['run_scored_total']} predictions, {s['run_quarantined_total']} quarantined",
             f"  outputs: {s['outputs']['predictions']}"]
    if s.get("images_per_s"):
        lines.insert(1, f"  {s['images_per_s']} images/s overall, first results after {s['startup_s']} s")
    return "\n".join(lines)
