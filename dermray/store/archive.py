"""The image archives dermray scores: a manifest (Parquet), a folder or prefix of image files, or tar shards in
WebDataset layout; reading and decoding their images, safely. No Ray: the scoring and saliency stages call these
from their tasks.

WebDataset shards are read as a stream, one member at a time (``tarfile`` stream mode): nothing is extracted to
disk and a shard never has to fit in memory. A sample is the adjacent members sharing a key (the member path up to
the first dot of its base name): its image is the first image member, its labels the ``.json`` member. Members that
are not regular files (symlinks, devices), have absolute or ``..`` paths, or are larger than ``MAX_MEMBER_BYTES``
are reported as problems, never read.
"""
from __future__ import annotations

import json
import posixpath
import re
import tarfile
from typing import IO, Iterator

import numpy as np

from dermray.errors import UserError
from dermray.store import storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
WDS_META = ("label", "label_source", "modality", "group_id")  # WebDataset .json keys that become columns
MAX_MEMBER_BYTES = 256 * 1024 * 1024


# ---- what the input is -------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """WebDataset shard patterns: ``shard-{000..009}.tar`` -> ten names (zero padding kept), and ``{a,b}`` lists,
    as WebDataset itself expands them (the braceexpand package)."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern, escape=False))


def detect_kind(uri: str, kind: str) -> str:
    """manifest | folder | webdataset: ``kind`` unless it is "auto", else from the URI (and a listing)."""
    if kind != "auto":
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
    return "webdataset" if any(n.endswith(".tar") for n in names) else "folder"


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


# ---- reading images ------------------------------------------------------------------------------------------------
def fetch_all(uris: list[str], retry: storage.Retry = storage.DEFAULT_RETRY) -> list:
    """Bytes of each URI, or the UserError that reading it raised (TransientReadError when retries ran out).
    Object stores are latency-bound: S3 objects are fetched in threads."""
    def fetch(u):
        try:
            return storage.read_bytes(u, retry)
        except UserError as e:
            return e
    if uris and storage.is_s3(uris[0]):
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(fetch, uris))
    return [fetch(u) for u in uris]


TRANSIENT = "transient: "  # quarantine reasons of images a re-run tries again


def reason_of(error: Exception) -> str:
    """The quarantine reason of a read error: transient ones are marked so that a re-run retries them."""
    return (TRANSIENT if isinstance(error, storage.TransientReadError) else "") + str(error)


def decode_one(data, size: int, max_pixels: int, pre=None):
    """(uint8 [size, size, 3] or None, "" or the reason it cannot be used) for bytes or a read error; ``pre``: the
    model card's preprocessing (transforms.Preprocess)."""
    from dermray.core.transforms import NO_PREPROCESS, ImageDecodeError, decode_image, eval_transform

    if isinstance(data, Exception):
        return None, reason_of(data)
    try:
        img = eval_transform(decode_image(data, max_pixels), size, pre or NO_PREPROCESS)
        return np.asarray(img, dtype=np.uint8), ""
    except ImageDecodeError as e:
        return None, str(e)


def stack_images(images: list, size: int) -> np.ndarray:
    blank = np.zeros((size, size, 3), np.uint8)
    if not images:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([blank if im is None else im for im in images])


# ---- WebDataset shards ---------------------------------------------------------------------------------------------
def _unsafe(m: tarfile.TarInfo) -> str | None:
    """Why a member is never read: an absolute or '..' path, or not a regular file."""
    norm = posixpath.normpath(m.name)
    if m.name.startswith("/") or norm.startswith("..") or "/../" in f"/{m.name}/":
        return "unsafe member path (absolute or '..'): not read"
    if not m.isfile():
        kind = "symlink" if m.issym() else "hard link" if m.islnk() else "special file"
        return f"tar member is a {kind}, not a regular file"
    return None


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    """The bytes of a regular file member (``_unsafe`` turns every other kind away before this)."""
    f = tar.extractfile(m)
    assert f is not None  # extractfile is None only for members that are not regular files or links
    return f.read()


def _finish(s: dict) -> tuple[str, dict] | None:
    """A grouped sample -> ("sample", ...) or ("problem", ...) (None for a sample whose problem was reported)."""
    meta = {}
    if s["json"] is not None:
        try:
            meta = json.loads(s["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            return "problem", {"key": s["key"], "member": s["json_name"], "reason": f"unreadable labels JSON: {e}"}
    image_id = str(meta.get("image_id") or s["key"])
    if s["image"] is None:
        if s["too_big"]:
            return None
        return "problem", {"key": image_id, "member": s["key"], "reason": "no image member for this key in the shard"}
    return "sample", {"key": s["key"], "image_id": image_id, "member": s["image_name"], "data": s["image"],
                      "meta": meta}


def iter_shard(fileobj: IO[bytes]) -> Iterator[tuple[str, dict]]:
    """Yields ("sample", {key, image_id, member, data, meta}) and ("problem", {key, member, reason}) in the order of
    the tar stream, holding one sample's members at a time. A stream that is not a tar archive yields one problem;
    other I/O errors (a dropped connection) are raised, for the caller to retry."""
    current: dict | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for m in tar:
                if m.isdir():
                    continue
                unsafe = _unsafe(m)
                if unsafe:
                    yield "problem", {"key": m.name, "member": m.name, "reason": unsafe}
                    continue
                norm = posixpath.normpath(m.name)
                base = posixpath.basename(norm)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = posixpath.join(posixpath.dirname(norm), stem)
                if current is not None and current["key"] != key:
                    done = _finish(current)
                    if done:
                        yield done
                    current = None
                if current is None:
                    current = {"key": key, "image": None, "image_name": None, "json": None, "json_name": None,
                               "too_big": False}
                ext = "." + ext.lower()
                if m.size > MAX_MEMBER_BYTES:
                    yield "problem", {"key": key, "member": m.name,
                                      "reason": f"tar member larger than {MAX_MEMBER_BYTES} bytes"}
                    current["too_big"] = True
                elif ext in IMAGE_SUFFIXES and current["image"] is None:
                    current["image"], current["image_name"] = _read_member(tar, m), m.name
                elif ext == ".json":
                    current["json"], current["json_name"] = _read_member(tar, m), m.name
    except (tarfile.TarError, EOFError) as e:
        yield "problem", {"key": None, "member": None, "reason": f"not a readable tar archive: {e}"}
        return
    if current is not None:
        done = _finish(current)
        if done:
            yield done
