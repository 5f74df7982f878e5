"""Lineage: what produced an output, recorded beside it, so that a re-run reuses an output only when what produced
it is what would produce it now, and otherwise says what changed.

A lineage record (``Lineage``) holds, for every input of a stage, a content fingerprint; the hash of the stage's
effective config (the keys that change its outputs); and the versions of dermray (with its git commit when known),
Ray, torch and torchvision. Its ``id`` covers the stage, the inputs' fingerprints and the config hash - not the
versions, which are recorded for the auditor but do not by themselves invalidate an output.

Fingerprints (``Fingerprint.method`` says which):
- ``columns``: a table's content in the columns the stage uses, hashed while the stage reads them anyway. The rows
  are cut into fixed blocks of ``BLOCK_ROWS`` by their position in the table, each block hashed with sha256 (value
  lengths and bytes per column), the block digests hashed in order: the same table gives the same fingerprint
  whatever its row groups, files or the chunks it was read in (``TableHasher`` merges chunks hashed in parallel).
- ``sha256``: a file's bytes (model weights, a YAML file, a small table read whole).
- ``etag+size`` / ``mtime+size``: an object's identity as storage reports it, recorded beside a content
  fingerprint: when the identity is unchanged, a later check trusts the recorded content and does not re-read it.

Pure logic plus ``storage`` reads; no Ray.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from collections import defaultdict
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from dermray.store import storage

# Small enough that the rows of the two blocks a chunk boundary may cut (which travel to the driver with every
# fingerprinted column) stay a few thousand whatever the row groups; 1 << 16 sent about half of every DuckDB-written
# (122,880-row) chunk. Hashing 1M rows of 7 columns: 0.081 s at 1 << 16, 0.097 s at 1 << 12, 0.154 s at 1 << 10.
BLOCK_ROWS = 1 << 12
SHORT = 16  # hex digits kept of a sha256 in records and messages
# 2: the config holds every value the stage declares, by section ({"train": {"lr": ...}}; dermray/runtime/
# registry.py). 1 (records without "format"): the keys each stage picked by hand, unsectioned ({"lr": ...}).
FORMAT = 2


# ---- tables ------------------------------------------------------------------------------------------------------
def _string_stream(arr: pa.Array) -> tuple[bytes, bytes]:
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if arr.null_count:
        mask = np.asarray(arr.is_null())
        arr = pc.fill_null(arr, "" if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) else b"")
    else:
        mask = None
    width = np.int64 if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset:arr.offset + len(arr) + 1]
    lengths = np.diff(offsets).astype(np.int64)
    if mask is not None:
        lengths[mask] = -1
    data = arr.buffers()[2]
    body = b"" if data is None or len(arr) == 0 else data[int(offsets[0]):int(offsets[-1])].to_pybytes()
    return lengths.tobytes(), body


def _column_stream(arr: pa.Array) -> tuple[bytes, bytes]:
    """(lengths or validity, values) of one column slice: a canonical byte form, the same for the same values
    whatever the slice's offset in its buffers."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return _string_stream(arr)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = np.asarray(pc.list_value_length(arr).fill_null(-1), dtype=np.int64)
        values = pc.list_flatten(arr)
        return lengths.tobytes(), _column_stream(values)[1]
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t):
        valid = np.asarray(arr.is_valid(), dtype=np.int8)
        canonical = pa.float64() if pa.types.is_floating(t) else pa.int64()
        # uint64 past 2**63 keeps its bits (a safe cast would refuse it); every other integer fits int64 exactly
        values = np.asarray(pc.fill_null(arr.cast(canonical, safe=t != pa.uint64()), 0)).tobytes()
        return valid.tobytes(), values
    return _string_stream(arr.cast(pa.string()))


def _block_digest(table: pa.Table, columns: list[str]) -> bytes:
    h = hashlib.sha256()
    for name in columns:
        col = table.column(name).combine_chunks() if name in table.column_names else None
        h.update(name.encode() + b"\0")
        if col is None:
            h.update(b"<absent>")
            continue
        lengths, values = _column_stream(col)
        h.update(len(lengths).to_bytes(8, "little") + lengths)
        h.update(len(values).to_bytes(8, "little") + values)
    return h.digest()


class TableHasher:
    """Content fingerprint of a table's ``columns`` from chunks that may be hashed in different processes: ``add``
    each chunk with its first row's position, ``partial`` gives what to send back, ``merge`` combines them. Whole
    blocks are hashed where they lie; the rows of a block cut by a chunk boundary travel as a small table."""

    def __init__(self, columns: Iterable[str]):
        self.columns = list(columns)
        self.blocks: dict[int, bytes] = {}
        self.pieces: dict[int, list[tuple[int, pa.Table]]] = defaultdict(list)
        self.rows = 0

    def add(self, table: pa.Table, row_offset: int) -> None:
        n = table.num_rows
        self.rows = max(self.rows, row_offset + n)
        pos = row_offset
        while pos < row_offset + n:
            block = pos // BLOCK_ROWS
            end = min((block + 1) * BLOCK_ROWS, row_offset + n)
            seg = table.slice(pos - row_offset, end - pos)
            if pos == block * BLOCK_ROWS and end == (block + 1) * BLOCK_ROWS:
                self.blocks[block] = _block_digest(seg, self.columns)
            else:
                self.pieces[block].append((pos, seg.select([c for c in self.columns if c in seg.column_names])))
            pos = end

    def partial(self) -> tuple:
        return self.columns, self.rows, self.blocks, dict(self.pieces)

    @staticmethod
    def merge(partials: list[tuple]) -> tuple[str, int]:
        """(fingerprint hex, rows) of the whole table from the partials of all its chunks."""
        columns = partials[0][0] if partials else []
        rows = max((p[1] for p in partials), default=0)
        blocks: dict[int, bytes] = {}
        pieces: dict[int, list] = defaultdict(list)
        for _, _, b, p in partials:
            blocks.update(b)
            for k, v in p.items():
                pieces[k].extend(v)
        for block, parts in pieces.items():
            parts.sort(key=lambda x: x[0])
            blocks[block] = _block_digest(pa.concat_tables([t for _, t in parts], promote_options="default"), columns)
        n_blocks = -(-rows // BLOCK_ROWS)
        missing = [b for b in range(n_blocks) if b not in blocks]
        if missing:
            raise RuntimeError(f"fingerprint: blocks {missing[:5]} were never hashed (a chunk is missing)")
        h = hashlib.sha256(json.dumps({"columns": columns, "rows": rows, "block_rows": BLOCK_ROWS}).encode())
        for b in range(n_blocks):
            h.update(blocks[b])
        return h.hexdigest(), rows


def table_fingerprint(table: pa.Table, columns: Iterable[str] | None = None) -> str:
    """The ``columns`` fingerprint of a table held whole (equal to the one its chunks give through TableHasher)."""
    hasher = TableHasher(columns if columns is not None else table.column_names)
    hasher.add(table, 0)
    return TableHasher.merge([hasher.partial()])[0]


# ---- records -----------------------------------------------------------------------------------------------------
class Fingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: Optional[str] = None  # redacted
    method: str  # columns | sha256 | etag+size | mtime+size | value
    content: str  # hex digest (or the value itself for method "value")
    columns: Optional[list[str]] = None
    rows: Optional[int] = None
    identity: Optional[str] = None  # storage's identity of the object when the content was hashed

    @property
    def short(self) -> str:
        return self.content[:8]


def columns_fingerprint(uri: str | None, table: pa.Table, columns: list[str], identity: str | None = None
                        ) -> Fingerprint:
    return Fingerprint(uri=storage.redact(uri) if uri else None, method="columns",
                       content=table_fingerprint(table, columns), columns=list(columns), rows=table.num_rows,
                       identity=identity)


def bytes_fingerprint(uri: str | None, data: bytes, identity: str | None = None) -> Fingerprint:
    return Fingerprint(uri=storage.redact(uri) if uri else None, method="sha256",
                       content=hashlib.sha256(data).hexdigest(), identity=identity)


def file_fingerprint(uri: str) -> Fingerprint:
    return bytes_fingerprint(uri, storage.read_bytes(uri), storage.identity(uri))


def value_fingerprint(value: Any) -> Fingerprint:
    """A fingerprint of a value that is its own content (a model id, a list of shard URIs)."""
    return Fingerprint(method="value", content=config_hash(value) if not isinstance(value, str) else value)


def config_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:SHORT]


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, Optional[str]]:
    """dermray (and its git commit when known), Ray, torch, torchvision and Python versions, without importing
    the libraries."""
    import platform
    from importlib import metadata

    from dermray import __version__

    out: dict[str, Optional[str]] = {"dermray": __version__, "git_commit": git_commit(),
                                     "python": platform.python_version()}
    for name in ("ray", "torch", "torchvision", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> Optional[str]:
    """``DERMRAY_GIT_COMMIT`` (set by an image build), else the checkout's HEAD when dermray runs from one."""
    if os.environ.get("DERMRAY_GIT_COMMIT"):
        return os.environ["DERMRAY_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", here],
                           capture_output=True, text=True, timeout=5)
    return out.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


class Lineage(BaseModel):
    """What produced a stage's output."""
    model_config = ConfigDict(extra="forbid")
    stage: str
    inputs: dict[str, Fingerprint] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    config_hash: str = ""
    versions: dict[str, Optional[str]] = Field(default_factory=dict)
    id: str = ""
    format: int = 1

    @classmethod
    def of(cls, stage: str, inputs: dict[str, Fingerprint], config: dict[str, Any]) -> "Lineage":
        key = {"stage": stage, "inputs": {k: v.content for k, v in sorted(inputs.items())},
               "config": config_hash(config)}
        return cls(stage=stage, inputs=inputs, config=config, config_hash=config_hash(config), versions=versions(),
                   id=config_hash(key), format=FORMAT)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> "Lineage":
        return cls.model_validate(data)

    def changes_from(self, old: "Lineage") -> list[str]:
        """What differs between ``old`` (recorded) and this lineage (now), one phrase each; empty when equal."""
        if old.id == self.id:
            return []
        out = []
        for name in sorted(set(old.inputs) | set(self.inputs)):
            a, b = old.inputs.get(name), self.inputs.get(name)
            if a is None:
                out.append(f"{name} added")
            elif b is None:
                out.append(f"{name} no longer an input")
            elif a.content != b.content:
                out.append(f"{name} changed ({a.short} -> {b.short})")
        if old.format < self.format:
            out += _older_changes(_flat(old.config), _flat(self.config))
            return out
        for key in sorted(set(_flat(old.config)) | set(_flat(self.config))):
            a, b = _flat(old.config).get(key, "<unset>"), _flat(self.config).get(key, "<unset>")
            if a != b:
                out.append(f"{key} {a!r} -> {b!r}")
        return out or [f"lineage {old.id} -> {self.id}"]


def _older_changes(old: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings a format-1 record holds that differ now: each of its keys is the same key now or its last
    part ("lr" is "train.lr", "preprocess.power" "derived.preprocess.power"). A key it holds that has no single
    match now, and a value it did not record, are taken as they are: an upgrade alone changes nothing."""
    out = []
    for key, value in sorted(old.items()):
        matches = [k for k in now if k == key or k.endswith("." + key)]
        if len(matches) == 1 and now[matches[0]] != value:
            out.append(f"{matches[0]} {value!r} -> {now[matches[0]]!r}")
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def reuse(recorded: Optional[Lineage], name: str, uri: str, compute, columns: Optional[list[str]] = None
          ) -> Fingerprint:
    """Input ``name``'s recorded fingerprint when storage says the object at ``uri`` is the same version it was
    (ETag and size, or size and mtime, unchanged) and, for a table, it covered the same ``columns``: no second read.
    Otherwise ``compute()`` - the content decides."""
    if recorded is not None:
        fp = recorded.inputs.get(name)
        if (fp is not None and fp.identity and (columns is None or fp.columns == list(columns))
                and fp.identity == storage.identity(uri)):
            return fp
    return compute()


def read(uri: str) -> Optional[Lineage]:
    """The lineage recorded at ``uri`` (a lineage JSON or a summary with a ``lineage`` key), None when absent."""
    if not storage.exists(uri):
        return None
    data = json.loads(storage.read_text(uri))
    data = data.get("lineage", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or "stage" not in data:
        return None
    return Lineage.from_dict(data)
