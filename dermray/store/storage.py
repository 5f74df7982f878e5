"""One place for every byte dermray reads or writes: local paths, ``file://`` and ``s3://`` URIs.

The S3 endpoint comes from the standard ``AWS_ENDPOINT_URL`` variable (and credentials from the usual AWS chain);
no credential ever appears in a message. Table writes are atomic for readers: the table is written to a temporary
object beside its final name and then moved into place in one step (``os.replace`` locally, a single server-side
copy on S3), so a reader sees the old table or the new one, never half of one; re-running replaces.

Reads are retried with exponential backoff when the error is transient (a refused or dropped connection, a
timeout, an S3 5xx or throttling answer): ``Retry`` says how often (``storage.retries`` in the run config, handed
to the workers), tenacity retries, ``is_transient`` says what is transient. What is still failing after the retries
raises ``TransientReadError``; a permanent failure (no such object, permission denied) raises a plain ``UserError``
at once. Callers that quarantine tell the two apart, so a re-run retries what was transient.

Why one module over 400 lines: every storage operation (local and S3) behind one URI interface and one retry
policy; a caller imports one module and cannot reach a path that skips the retries.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import random
import threading
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tenacity

from dermray.errors import UserError

SUPPORTED_SCHEMES = ("", "file", "s3")


# A URI's scheme is RFC 3986's as urlsplit reads it, not fsspec's protocol (fsspec.utils.get_protocol, url_to_fs),
# which is what precedes the first "://" or "::", as written: fsspec takes "S3://b/k" for an unknown protocol "S3"
# (url_to_fs: "Protocol not known") and " s3://b" for " s3", and "gs:b/k" or "http:foo" for local files, which
# dermray refuses by name. resolve_column mirrors this reading in Arrow compute, row for row (tests/unit).
def _check_scheme(uri: str) -> str:
    scheme = urlparse(str(uri)).scheme
    # A one-letter scheme is a Windows drive letter, i.e. a local path.
    if len(scheme) == 1:
        return ""
    if scheme not in SUPPORTED_SCHEMES:
        raise UserError(f"unsupported URI scheme {scheme!r} in {redact(uri)!r}: use a local path, file:// or s3://")
    return scheme


def redact(uri: str) -> str:
    """The URI with any user:password@ part removed, for messages."""
    parsed = urlparse(str(uri))
    if parsed.username or parsed.password:
        return parsed._replace(netloc=parsed.hostname or "").geturl()
    return str(uri)


def is_s3(uri: str) -> bool:
    return _check_scheme(uri) == "s3"


def local_path(uri: str) -> str:
    """The filesystem path of a local path or ``file://`` URI."""
    scheme = _check_scheme(uri)
    if scheme == "s3":
        raise ValueError(f"{uri} is not local")
    if scheme == "file":
        # Not fsspec's LocalFileSystem._strip_protocol: it reads file://host/x as host/x below the working directory
        # and leaves FILE:///x as it is (a path starting "FILE:").
        # Nor urlparse's path: it cuts a file name at "#" (a fragment) or "?" (a query).
        rest = str(uri)[len("file:"):]
        if rest.startswith("///"):  # file:///x
            return rest[2:]
        if not rest.startswith("//"):  # file:x, file:/x
            return rest
        host, _, path = rest[2:].partition("/")  # file://host/x
        return f"//{host}/{path}"
    return os.fspath(uri)


_S3_FILESYSTEMS: dict[tuple, object] = {}
_S3_LOCK = threading.Lock()


def s3_filesystem():
    """The s3fs filesystem of this process, honouring ``AWS_ENDPOINT_URL`` and the usual AWS variables.

    One per process and per AWS environment, reused by every operation: a fresh one per operation built a botocore
    client each time (~178 ms of CPU per small read or write, against ~17 ms reused; tests/unit/test_storage.py).
    The process id is part of the key because a forked child (a Ray worker) cannot use its parent's event loop."""
    import s3fs

    aws = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), aws)
    with _S3_LOCK:
        fs = _S3_FILESYSTEMS.get(key)
        if fs is None:
            # botocore reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and AWS_DEFAULT_REGION itself, not AWS_REGION
            # (botocore 1.43.117, aiobotocore 3.10.0, s3fs 2026.9.0: the client's endpoint_url and region_name with
            # each variable set alone): only that one is handed over.
            client_kwargs = {}
            if not os.environ.get("AWS_DEFAULT_REGION") and os.environ.get("AWS_REGION"):
                client_kwargs["region_name"] = os.environ["AWS_REGION"]
            # No config_kwargs={"retries": ...}: botocore's own retries stay what the AWS settings say
            # (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE, the profile), which an explicit one would override. They retry one
            # S3 request, unseen by Retry's verdict (quarantined as transient or not) and attempt count; the tests
            # set AWS_MAX_ATTEMPTS=1 (tests/conftest.py) so that what rides out their outages is Retry alone.
            fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False)
            _S3_FILESYSTEMS[key] = fs
        return fs


def _s3_path(uri: str) -> str:
    """bucket/key of an s3:// URI by s3fs's own rule (``_strip_protocol``, which every s3fs call applies to its
    path), the scheme lower-cased first: URI schemes are case-insensitive (RFC 3986; ``_check_scheme``), fsspec's
    protocols are not."""
    import s3fs

    scheme, colon, rest = str(uri).partition(":")
    return s3fs.S3FileSystem._strip_protocol(scheme.lower() + colon + rest)


def filesystem(uri: str):
    """(fsspec filesystem, path within it) for a URI."""
    scheme = _check_scheme(uri)
    if scheme == "s3":
        return s3_filesystem(), _s3_path(uri)
    import fsspec

    return fsspec.filesystem("file"), os.path.abspath(local_path(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    if _check_scheme(base) in ("s3", "file"):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if _check_scheme(uri) in ("s3", "file"):
        return posixpath.dirname(str(uri).rstrip("/"))
    return os.path.dirname(os.path.abspath(uri))


def resolve(uri: str, base_dir: str) -> str:
    """A URI relative to ``base_dir`` made absolute; absolute paths and URIs are returned unchanged."""
    scheme = _check_scheme(uri)
    if scheme or os.path.isabs(uri):
        return uri
    return join(base_dir, uri)


# urlsplit's scheme, as _check_scheme sees it: after tabs and newlines are removed and leading controls and spaces
# stripped, a letter, then letters, digits, "+", "-" or "." up to the first ":". Kept equal to urlsplit row for row.
_URL_NOISE = "[\t\r\n]"
_SCHEME = r"^[\x00-\x20]*(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):"


def _scheme_column(uris: pa.Array) -> pa.Array:
    """Each URI's scheme, lower case, as ``_check_scheme`` reads it (null where there is none; one letter is a
    Windows drive)."""
    scheme = pc.utf8_lower(pc.struct_field(pc.extract_regex(pc.replace_substring_regex(uris, _URL_NOISE, ""),
                                                            _SCHEME), [0]))
    return pc.if_else(pc.fill_null(pc.greater(pc.utf8_length(scheme), 1), False), scheme, pa.scalar(None, pa.string()))


def _string_column(uris: pa.Array | pa.ChunkedArray) -> pa.Array:
    return (uris if isinstance(uris, pa.ChunkedArray) else pa.chunked_array([uris])).cast(pa.string()).combine_chunks()


def resolve_column(uris: pa.Array | pa.ChunkedArray, base_dir: str) -> pa.Array:
    """``resolve`` over a column of URIs in Arrow compute, without a Python object per row (a 10M-row manifest
    stays columnar): for every non-empty URI the same string as ``resolve(u, base_dir)``; nulls and empty strings
    are left as they are. An unsupported scheme anywhere in the column raises the ``UserError`` of ``resolve``."""
    # Hand-written on purpose: 1M URIs (half relative, a quarter s3://, a quarter absolute) cost 0.27 s of CPU here,
    # 1.57 s with fsspec.utils.get_protocol per row and 3.51 s with resolve per row (timeit, process time, best of 3;
    # Intel Xeon, 2 cores, pyarrow 26.0.1, Python 3.11).
    uris = _string_column(uris)
    scheme = _scheme_column(uris)
    for name in pc.unique(scheme.drop_null()).to_pylist():
        if name not in SUPPORTED_SCHEMES:
            _check_scheme(uris.filter(pc.equal(scheme, name))[0].as_py())
    relative = pc.and_(pc.is_null(scheme), pc.invert(pc.starts_with(uris, "/")))
    relative = pc.fill_null(pc.and_(relative, pc.greater(pc.utf8_length(uris), 0)), False)
    if not pc.any(relative).as_py():
        return uris
    prefix = join(base_dir, "")  # the base with the one separator join puts before a relative part
    return pc.if_else(relative, pc.binary_join_element_wise(prefix, uris, ""), uris)


def first_local(uris: pa.Array | pa.ChunkedArray) -> str | None:
    """The first non-empty URI of a column that is not on S3 (``is_s3`` false), or None: what the multi-node
    guard checks, found without a Python object per row."""
    uris = _string_column(uris)
    local = pc.and_(pc.fill_null(pc.not_equal(_scheme_column(uris), "s3"), True), pc.greater(pc.utf8_length(uris), 0))
    hits = uris.filter(pc.fill_null(local, False))
    return hits[0].as_py() if len(hits) else None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _wrap_io(uri, "check", lambda: fs.exists(path), DEFAULT_RETRY)


def _io_errors() -> tuple:
    # s3fs passes some botocore errors through unwrapped (e.g. EndpointConnectionError when the endpoint is down).
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


IO_ERRORS = _io_errors()


class TransientReadError(UserError):
    """A read that kept failing for a reason that may pass (connection, timeout, S3 5xx or throttling)."""


class _Backoff(tenacity.wait_exponential):
    """tenacity's exponential wait (``multiplier * 2**k`` after the (k + 1)-th failed attempt, at most ``max``) times
    a jitter of +-25 %: the schedule dermray had. tenacity's own jittered waits are other schedules:
    wait_random_exponential draws from 0 up to the cap (a retry at once into an outage), wait_exponential_jitter
    adds up to a fixed number of seconds whatever the step."""

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return super().__call__(retry_state) * (0.75 + 0.5 * random.random())


def _retried(e: BaseException) -> bool:
    return isinstance(e, IO_ERRORS) and is_transient(e)


@dataclass(frozen=True)
class Retry:
    """How transient read errors are retried: ``retries`` more attempts after the first, waiting
    ``base_s * 2**k`` (with jitter, at most ``max_s``) before attempt k + 1."""
    retries: int = 5
    base_s: float = 0.25
    max_s: float = 8.0

    def retrying(self) -> tenacity.Retrying:
        """This policy as a tenacity controller: transient I/O errors (``is_transient``, dermray's classification)
        retried, anything else raised at once, and the last error raised as it is when the attempts run out, for
        the caller to word. (A fresh controller per call: ~16 us, against >= 24 us for the cheapest read it guards,
        a 20 kB local file, and milliseconds for an S3 read; measured with timeit, Intel Xeon, 2 cores.)"""
        return tenacity.Retrying(stop=tenacity.stop_after_attempt(self.retries + 1),
                                 wait=_Backoff(multiplier=self.base_s, max=self.max_s),
                                 retry=tenacity.retry_if_exception(_retried), reraise=True)

    def delays(self) -> Iterator[float]:
        """The waits between the attempts of a read that never succeeds: what ``retrying`` sleeps, drawn afresh."""
        retrying = self.retrying()
        for k in range(self.retries):
            state = tenacity.RetryCallState(retrying, None, (), {})
            state.attempt_number = k + 1
            yield retrying.wait(state)


DEFAULT_RETRY = Retry()
NO_RETRY = Retry(retries=0)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling", "ThrottlingException",
                    "TooManyRequests", "InternalError", "ServiceUnavailable", "RequestLimitExceeded"}


def _botocore_permanent() -> tuple:
    """botocore's errors of configuration, not of the moment: no credentials, no region, bad parameters."""
    try:
        from botocore import exceptions as bx
    except ImportError:
        return ()
    names = ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError",
             "UnknownServiceError", "InvalidRegionError")
    return tuple(getattr(bx, n) for n in names if hasattr(bx, n))


_CONFIGURATION_ERRORS = _botocore_permanent()


def is_transient(e: BaseException) -> bool:
    """Whether an I/O error may pass when retried: connections and timeouts, HTTP 5xx, 408 and 429, S3's
    throttling codes. Missing objects, permissions, other 4xx answers and botocore's configuration errors (no
    credentials, no region) are permanent."""
    if isinstance(e, _PERMANENT) or any(isinstance(x, _CONFIGURATION_ERRORS) for x in (e, e.__cause__,
                                                                                         e.__context__) if x):
        return False
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("NoSuchKey", "NoSuchBucket", "404", "AccessDenied", "403"):
                return False
            return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES or code.startswith("5")
    if isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR):
        return False
    return True  # connection refused/reset, timeouts, botocore connection errors, an OSError from a hiccup


def _io_error(uri: str, verb: str, e: Exception, attempts: int = 1) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"cannot {verb} {redact(uri)}: no such file or object")
    if isinstance(e, PermissionError):
        return UserError(f"cannot {verb} {redact(uri)}: permission denied")
    # botocore messages may quote request details but never secrets; keep the first line.
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if verb != "write" and is_transient(e):
        tries = f"{attempts} attempts" if attempts > 1 else "1 attempt (retries off)"
        return TransientReadError(f"cannot {verb} {redact(uri)} after {tries}: {first}")
    return UserError(f"cannot {verb} {redact(uri)}: {first}")


def _wrap_io(uri: str, verb: str, fn, retry: Retry = NO_RETRY):
    """``fn()``, retried per ``retry`` on transient errors; I/O errors become UserErrors naming ``uri``."""
    attempts = 0

    def attempt():
        nonlocal attempts
        attempts += 1
        return fn()

    try:
        return retry.retrying()(attempt)
    except IO_ERRORS as e:
        raise _io_error(uri, verb, e, attempts) from e


def read_bytes(uri: str, retry: Retry = DEFAULT_RETRY) -> bytes:
    fs, path = filesystem(uri)
    return _wrap_io(uri, "read", lambda: fs.cat_file(path), retry)


@contextlib.contextmanager
def open_read(uri: str, retry: Retry = DEFAULT_RETRY):
    """A binary file object for streaming reads (opened with retries; later reads are the caller's)."""
    fs, path = filesystem(uri)
    f = _wrap_io(uri, "read", lambda: fs.open(path, "rb"), retry)
    try:
        yield f
    finally:
        f.close()


def identity(uri: str) -> str | None:
    """What storage says identifies an object's version without reading it: S3's ETag and size, a local file's
    size and modification time (ns); for a folder, the same of every file below it. None when it does not exist."""
    fs, path = filesystem(uri)

    def one(p: str, info: dict) -> str:
        if is_s3(uri):
            return f"{posixpath.basename(p)}:{str(info.get('ETag', '')).strip(chr(34))}:{info.get('size')}"
        st = os.stat(p)
        return f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns}"

    def read():
        if not fs.exists(path):
            return None
        if fs.isdir(path):
            return ";".join(one(p, i) for p, i in sorted(fs.find(path, detail=True).items()))
        return one(path, fs.info(path))

    return _wrap_io(uri, "check", read, DEFAULT_RETRY)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (temporary object, then one move)."""
    with _atomic_target(uri) as (fs, tmp):
        _wrap_io(uri, "write", lambda: fs.pipe_file(tmp, data))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def _atomic_target(uri: str):
    """Yield (fs, temporary path) beside ``uri``; on success move it onto ``uri``, on failure remove it."""
    fs, path = filesystem(uri)
    directory = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if not is_s3(uri):
        os.makedirs(directory, exist_ok=True)
    tmp = posixpath.join(directory, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        yield fs, tmp
        if is_s3(uri):
            # A server-side copy creates the final object in one step; then drop the temporary one.
            _wrap_io(uri, "write", lambda: fs.copy(tmp, path))
            fs.rm(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, or a folder / prefix of Parquet files (in path order; names starting with ``_`` or ``.``
    are markers, not data), into one Arrow table."""
    fs, path = filesystem(uri)

    def _read():
        if not fs.isdir(path):
            return _read_parquet(fs, path, columns, uri)
        parts = [p for p in sorted(fs.find(path)) if not posixpath.basename(p).startswith(("_", "."))]
        tables = [_read_parquet(fs, p, columns, fs.unstrip_protocol(p) if is_s3(uri) else p) for p in parts]
        if not tables:
            raise UserError(f"{redact(uri)}: a folder without Parquet files")
        return pa.concat_tables(tables, promote_options="default")

    try:
        return _wrap_io(uri, "read", _read, DEFAULT_RETRY)
    except pa.ArrowInvalid as e:
        raise UserError(f"cannot read {redact(uri)} as Parquet: {e}") from e


def _read_parquet(fs, path: str, columns: list[str] | None, uri: str) -> pa.Table:
    # ParquetFile reads on this thread. pq.read_table / pyarrow.dataset hand the Python file object to Arrow's I/O
    # threads, which drop its last reference later and need the GIL to do it: a process that exits right after a
    # read then aborts (SIGABRT at interpreter exit, about one run in two; tests/system/test_processes.py). A local
    # file is opened by Arrow itself (no Python file object at all: the folder case still aborted about once in 160
    # contended runs with one), and the reader is closed here, on this thread, before the file.
    with (fs.open(path, "rb") if is_s3(uri) else contextlib.nullcontext(path)) as source:
        with pq.ParquetFile(source) as pf:
            if columns is not None:
                missing = [c for c in columns if c not in pf.schema_arrow.names]
                if missing:
                    raise UserError(f"{redact(uri)}: missing column(s) {missing}; it has {pf.schema_arrow.names}")
            return pf.read(columns=columns)


def pyarrow_fs(fs):
    """An fsspec filesystem wrapped for pyarrow (datasets, Ray Data's readers)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def parquet_file(uri: str) -> pq.ParquetFile:
    """An open ParquetFile (metadata and row groups on demand). Raises UserError for a corrupt or missing file."""
    fs, path = filesystem(uri)
    try:
        data = _wrap_io(uri, "read", lambda: fs.open(path, "rb"), DEFAULT_RETRY)
        return pq.ParquetFile(data)
    except pa.ArrowInvalid as e:
        raise UserError(f"cannot read {redact(uri)} as Parquet: {e}") from e


def row_group_chunks(pf: pq.ParquetFile, target_rows: int, min_chunks: int = 1) -> list[tuple[list[int], int, int]]:
    """A Parquet file's row groups grouped into chunks of about ``target_rows`` rows (at least ``min_chunks`` when
    there are enough row groups; a row group is never split): (row group indices, first row, rows) each."""
    md = pf.metadata
    target = max(1, min(target_rows, -(-md.num_rows // max(1, min_chunks))))
    chunks: list[tuple[list[int], int, int]] = []
    current: list[int] = []
    start, size, offset = 0, 0, 0
    for i in range(md.num_row_groups):
        n = md.row_group(i).num_rows
        if current and size + n > target:
            chunks.append((current, start, size))
            current, start, size = [], offset, 0
        current.append(i)
        size += n
        offset += n
    if current:
        chunks.append((current, start, size))
    return chunks


def write_table(table: pa.Table, uri: str) -> None:
    """Write one Arrow table as a single Parquet file, atomically."""
    write_table_batches(table.schema, [table], uri)


class TableSink:
    """An open Parquet file being streamed to; see ``table_sink``."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema):
        self._writer, self.schema, self.rows = writer, schema, 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows


@contextlib.contextmanager
def table_sink(uri: str, schema: pa.Schema):
    """Stream Arrow tables into one Parquet file at ``uri``; it appears atomically when the block ends without an
    error (and not at all otherwise). Memory stays at one input table: this is how a driver writes a table whose
    rows it never holds at once."""
    with _atomic_target(uri) as (fs, tmp):
        try:
            with fs.open(tmp, "wb") as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
                yield TableSink(writer, schema)
        except IO_ERRORS as e:
            raise _io_error(uri, "write", e) from e


def write_table_batches(schema: pa.Schema, tables: Iterable[pa.Table], uri: str) -> int:
    """Stream Arrow tables (each cast to ``schema``) into one Parquet file, atomically. Returns rows written."""
    with table_sink(uri, schema) as sink:
        for t in tables:
            sink.write(t)
    return sink.rows


def read_table_any(uri: str) -> pa.Table:
    """Read Parquet or CSV (by extension) into an Arrow table."""
    if str(uri).lower().endswith(".csv"):
        import pyarrow.csv as pcsv

        data = read_bytes(uri)
        try:
            return pcsv.read_csv(io.BytesIO(data))
        except pa.ArrowInvalid as e:
            raise UserError(f"cannot read {redact(uri)} as CSV: {e}") from e
    return read_table(uri)


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> Iterator[str]:
    """URIs of the files under a folder or prefix, optionally filtered by suffix (case-insensitive)."""
    fs, path = filesystem(uri)
    found = _wrap_io(uri, "list", lambda: fs.find(path), DEFAULT_RETRY)
    for p in sorted(found):
        if suffixes and not p.lower().endswith(suffixes):
            continue
        yield fs.unstrip_protocol(p) if is_s3(uri) else p


def arrow_filesystem(uri: str):
    """(pyarrow filesystem or None, path) for libraries that take pyarrow filesystems (Ray Train, Ray Data).
    Local paths give (None, absolute path); S3 honours AWS_ENDPOINT_URL."""
    if not is_s3(uri):
        return None, os.path.abspath(local_path(uri))
    from pyarrow import fs as pafs

    # Arrow's AWS SDK reads the region (AWS_DEFAULT_REGION, then AWS_REGION) but not AWS_ENDPOINT_URL(_S3): pyarrow
    # 26.0.1 sent a request with only AWS_ENDPOINT_URL set to s3.us-east-1.amazonaws.com. The endpoint is handed
    # over from the variables botocore reads for s3fs, in its order (the S3 one first).
    kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs), _s3_path(uri)
