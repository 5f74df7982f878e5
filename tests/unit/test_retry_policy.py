"""Which storage errors are transient (retried with backoff by ``storage.Retry``) and which are permanent, how the
backoff grows, and score's shard stream resuming after a dropped read: no server. Real outages of a real S3 server:
tests/stage/test_retries.py."""
import contextlib
import errno
import io

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
)

from dermray.errors import UserError
from dermray.stages.score import actors
from dermray.store import storage

from helpers import shard_bytes


# ---- pure: which errors are transient, how the backoff grows -------------------------------------------------
def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} ({status})"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def s3fs_translated(e: ClientError) -> BaseException:
    """The exception s3fs raises for ``e`` (a FileNotFoundError, PermissionError or OSError caused by it)."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(e)


@pytest.mark.parametrize("make, transient", [
    (lambda: ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
    (lambda: EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),  # botocore: endpoint down
    (lambda: ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (lambda: TimeoutError("read timed out"), True),
    (lambda: client_error("ServiceUnavailable", 503), True),
    (lambda: client_error("503", 503), True),
    (lambda: client_error("SlowDown", 503), True),
    (lambda: client_error("InternalError", 500), True),
    (lambda: client_error("Throttling", 400), True),
    (lambda: client_error("NoSuchKey", 404), False),
    (lambda: client_error("NoSuchBucket", 404), False),
    (lambda: client_error("AccessDenied", 403), False),
    (lambda: client_error("403", 403), False),
    (lambda: client_error("Forbidden", 403), False),  # a 403 of another code: 4xx is permanent
    (lambda: FileNotFoundError(errno.ENOENT, "no such file"), False),
    (lambda: PermissionError(errno.EACCES, "denied"), False),
    (lambda: OSError(errno.ENOENT, "gone"), False),
], ids=["refused", "endpoint-down", "reset", "timeout", "503", "503-code", "slowdown", "500", "throttling",
        "nosuchkey", "nosuchbucket", "403-accessdenied", "403-code", "403-forbidden", "filenotfound", "eacces",
        "enoent"])
def test_is_transient_tells_passing_errors_from_permanent_ones(make, transient):
    e = make()
    assert storage.is_transient(e) is transient
    if isinstance(e, ClientError):  # the same answer through s3fs's translation (what storage.read_bytes sees)
        translated = s3fs_translated(e)
        assert storage.is_transient(translated) is transient, (type(translated), translated)


def test_retry_delays_double_with_jitter_up_to_the_cap():
    r = storage.Retry(retries=6, base_s=0.5, max_s=4.0)
    for _ in range(50):
        d = list(r.delays())
        assert len(d) == 6
        for k, x in enumerate(d):
            nominal = min(4.0, 0.5 * 2 ** k)
            assert 0.75 * nominal <= x <= 1.25 * nominal, (k, x)
    assert list(storage.Retry(retries=0).delays()) == []
    assert storage.DEFAULT_RETRY.retries == 5  # the default rides out ~6-10 s of outage


class Flaky:
    """A callable failing with ``errors`` in turn, then returning "ok"; counts its calls."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.fixture()
def no_sleep(monkeypatch):
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)  # what the retries sleep with (tenacity's default)
    return slept


def test_transient_errors_are_retried_until_they_pass(no_sleep):
    fn = Flaky(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), s3fs_translated(client_error("SlowDown", 503)),
               EndpointConnectionError(endpoint_url="http://x"))
    assert storage._wrap_io("s3://b/k", "read", fn, storage.Retry(retries=5, base_s=0.1)) == "ok"
    assert fn.calls == 4 and len(no_sleep) == 3
    assert no_sleep[0] < no_sleep[1] < no_sleep[2]  # backoff grows (jitter is +-25 %, the steps are x2)


def test_retries_run_out_with_a_transient_error_naming_the_object_and_the_attempts(no_sleep):
    fn = Flaky(*[ConnectionRefusedError(errno.ECONNREFUSED, "refused")] * 10)
    with pytest.raises(storage.TransientReadError, match=r"cannot read s3://b/k after 4 attempts"):
        storage._wrap_io("s3://b/k", "read", fn, storage.Retry(retries=3, base_s=0.1))
    assert fn.calls == 4 and len(no_sleep) == 3


@pytest.mark.parametrize("error, message", [
    (s3fs_translated(client_error("NoSuchKey", 404)), "no such file or object"),
    (s3fs_translated(client_error("AccessDenied", 403)), "permission denied"),
    (client_error("AccessDenied", 403), "AccessDenied"),
])
def test_permanent_errors_fail_at_once_and_are_not_marked_transient(no_sleep, error, message):
    fn = Flaky(error)
    with pytest.raises(UserError, match=message) as e:
        storage._wrap_io("s3://b/k", "read", fn, storage.Retry(retries=5))
    assert not isinstance(e.value, storage.TransientReadError)
    assert fn.calls == 1 and no_sleep == []


def test_a_transient_error_stays_transient_when_retries_are_off(no_sleep):
    fn = Flaky(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    with pytest.raises(storage.TransientReadError):
        storage._wrap_io("s3://b/k", "read", fn, storage.Retry(retries=0))


@pytest.mark.parametrize("make", [
    lambda: NoCredentialsError(), lambda: NoRegionError(), lambda: ParamValidationError(report="bad key"),
], ids=["no-credentials", "no-region", "param-validation"])
def test_configuration_errors_are_not_transient(make):
    assert storage.is_transient(make()) is False


# ---- score's shard stream: a read dropped part-way resumes after what was already yielded --------------------------
class DroppingShard:
    """``storage.open_read`` for one tar shard whose first ``drops`` opens lose the connection after ``at`` bytes."""

    def __init__(self, data: bytes, at: int, drops: int):
        self.data, self.at, self.drops, self.opens = data, at, drops, 0

    def __call__(self, uri, retry):
        self.opens += 1
        return contextlib.nullcontext(io.BufferedReader(Cut(self.data, self.at if self.opens <= self.drops else None)))


class Cut(io.RawIOBase):
    """A byte stream in 512-byte reads that raises ConnectionResetError at byte ``at`` (None: never)."""

    def __init__(self, data: bytes, at: int | None):
        self.stream, self.at = io.BytesIO(data), at

    def readable(self):
        return True

    def readinto(self, b):
        if self.at is not None and self.stream.tell() >= self.at:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        chunk = self.stream.read(min(len(b), 512))
        b[:len(chunk)] = chunk
        return len(chunk)


def shard_samples(n: int) -> list:
    return [(f"img{i}", bytes([i]) * 3000, {"i": i}) for i in range(n)]


@pytest.mark.parametrize("drops", [1, 2])
def test_a_shard_read_dropped_part_way_resumes_without_repeating_a_sample(monkeypatch, no_sleep, drops):
    shard = DroppingShard(shard_bytes(shard_samples(8)), at=25_000, drops=drops)  # ~41 kB: dropped in the middle
    monkeypatch.setattr(storage, "open_read", shard)
    rows = list(actors._shard_rows("s3://b/shard.tar", storage.Retry(retries=3, base_s=0.1)))
    assert [r[0] for r in rows] == [f"img{i}" for i in range(8)] and all(r[3] == "" for r in rows)
    assert [r[2] for r in rows] == [bytes([i]) * 3000 for i in range(8)]
    assert shard.opens == drops + 1 and len(no_sleep) == drops


def test_a_shard_read_that_keeps_dropping_ends_in_one_transient_row(monkeypatch, no_sleep):
    shard = DroppingShard(shard_bytes(shard_samples(8)), at=25_000, drops=10)
    monkeypatch.setattr(storage, "open_read", shard)
    rows = list(actors._shard_rows("s3://b/shard.tar", storage.Retry(retries=2, base_s=0.1)))
    ids = [r[0] for r in rows[:-1]]  # what was read before the first drop (tar reads 10 kB records), once
    assert ids and ids == [f"img{i}" for i in range(len(ids))] and len(ids) < 8
    assert rows[-1][:3] == ("", "s3://b/shard.tar", None)
    assert rows[-1][3].startswith("transient: cannot read s3://b/shard.tar: ") and "reset" in rows[-1][3]
    assert shard.opens == 3 and len(no_sleep) == 2
