
import pyarrow as pa
import pytest

from dermray.errors import UserError
from dermray.store import storage

TABLE = pa.table({"a": [1, 2, 3], "b": ["x", "y", None]})


def test_streaming_write_counts_rows(tmp_path):
    uri = str(tmp_path / "s.parquet")
    assert storage.write_table_batches(TABLE.schema, [TABLE, TABLE.slice(0, 0), TABLE], uri) == 6
    assert storage.read_table(uri).num_rows == 6


def test_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        storage.read_table(str(tmp_path / "missing.parquet"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="as Parquet"):
        storage.read_table(str(bad))
    with pytest.raises(UserError, match="as Parquet"):
        storage.parquet_file(str(bad))
    for uri in ("http://example.com/x.parquet", "ftp://h/x", "gs://b/x"):
        with pytest.raises(UserError, match="unsupported URI scheme"):
            storage.read_bytes(uri)


def test_redact_drops_credentials():
    assert storage.redact("s3://AKIAXXX:secret@bucket/key") == "s3://bucket/key"
    assert storage.redact("s3://bucket/key") == "s3://bucket/key"


def test_missing_columns_are_named(tmp_path):
    uri = str(tmp_path / "t.parquet")
    storage.write_table(TABLE, uri)
    with pytest.raises(UserError, match="missing column.*'nope'"):
        storage.read_table(uri, columns=["a", "nope"])


# -- resolve_column: the columnar resolve gives resolve's answer, row for row ----------------------------------------

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_URI_PARTS = st.sampled_from(["s3://", "S3://", "file://", "file:", "/", "C:", "c:/", "a/b:", "x+y-z.q:", " ", "\t",
                              "\n", "\r", "\x01", "//", "s", "3://", "img", ".jpg", "ü", ":", "./", "../", "s3:"])
_URIS = st.lists(_URI_PARTS, min_size=1, max_size=6).map("".join) | st.text(min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@example(uris=["s\t3://b/k", " S3://b/k", "\x01file:///x", "C:/x", "a/b:c", "x.jpg"], base="/m")
@given(uris=st.lists(_URIS, min_size=1, max_size=8),
       base=st.sampled_from(["/data/manifests", "/", "s3://bucket/prefix", "s3://bucket/prefix/", "file:///srv/m"]))
def test_resolve_column_is_resolve_row_for_row(uris, base):
    try:
        expected = [storage.resolve(u, base) for u in uris]
    except UserError:
        with pytest.raises(UserError, match="unsupported URI scheme"):
            storage.resolve_column(pa.array(uris), base)
        return
    except ValueError:  # urlsplit's own complaints (an unclosed IPv6 bracket): not URIs either way
        return
    assert storage.resolve_column(pa.array(uris), base).to_pylist() == expected


def test_resolve_column_leaves_nulls_and_empty_strings_and_takes_chunked_columns():
    column = pa.chunked_array([pa.array(["a.jpg", None]), pa.array(["", "s3://b/k"])])
    assert storage.resolve_column(column, "/m").to_pylist() == ["/m/a.jpg", None, "", "s3://b/k"]


def test_resolve_column_names_the_first_uri_with_an_unsupported_scheme():
    with pytest.raises(UserError, match=r"unsupported URI scheme 'gs' in 'gs://b/one.jpg'"):
        storage.resolve_column(pa.array(["a.jpg", "gs://b/one.jpg", "gs://b/two.jpg"]), "/m")


@settings(max_examples=200, deadline=None)
@example(uris=["", "S3://b/k", "s\t3://b/k", "/x.jpg"])
@given(uris=st.lists(_URIS, min_size=0, max_size=6))
def test_first_local_is_the_first_non_empty_uri_that_is_not_on_s3(uris):
    try:
        expected = next((u for u in uris if u and not storage.is_s3(u)), None)
    except (UserError, ValueError):
        return
    assert storage.first_local(pa.array(uris, pa.string())) == expected


def test_a_process_reuses_one_s3_filesystem_per_endpoint_and_a_forked_child_makes_its_own(monkeypatch):
    """A fresh s3fs filesystem per operation built a botocore client each time: ~178 ms of CPU per read or write
    (moto on loopback, AMD EPYC), against ~17 ms with one filesystem reused. One per process (a forked child, i.e.
    another pid, makes its own: the parent's event loop does not survive a fork) and per endpoint and credentials."""
    import os

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    first = storage.s3_filesystem()
    assert storage.s3_filesystem() is first
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    other = storage.s3_filesystem()
    assert other is not first  # its client's endpoint: the next test
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")
    keyed = storage.s3_filesystem()
    assert keyed is not other
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)
    child = storage.s3_filesystem()
    assert child is not keyed and storage.filesystem("s3://bucket/key")[0] is child


def test_the_s3_clients_take_the_endpoint_and_region_from_the_aws_variables(monkeypatch):
    """botocore reads AWS_ENDPOINT_URL and AWS_DEFAULT_REGION itself; AWS_REGION, which it does not read, dermray hands
    over, and pyarrow (which reads no endpoint variable) gets the endpoint. Checked on the clients the reads use,
    built but not called: no network."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")  # no look-up of credentials elsewhere (instance metadata)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:3")
    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    fs = storage.s3_filesystem()
    fs.connect()
    assert (fs.s3.meta.endpoint_url, fs.s3.meta.region_name) == ("http://127.0.0.1:3", "eu-west-2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # the first of the two, as before
    fs = storage.s3_filesystem()
    fs.connect()
    assert fs.s3.meta.region_name == "eu-west-1"
    arrow, path = storage.arrow_filesystem("s3://bucket/runs/r1")
    options = arrow.__reduce__()[1][0]
    assert (options["endpoint_override"], options["scheme"], path) == ("127.0.0.1:3", "http", "bucket/runs/r1")
    assert storage.filesystem("S3://bucket/runs/r1/")[1] == "bucket/runs/r1"  # schemes are case-insensitive


def test_a_local_file_uri_keeps_a_hash_or_question_mark_in_its_name():
    """A file named a#1.jpg or b?.jpg is a file like any other: a URI parser that reads "#" as a fragment and "?"
    as a query made file:///data/a#1.jpg the path /data/a (another file, or none)."""
    from dermray.store import storage

    assert storage.local_path("file:///data/a#1.jpg") == "/data/a#1.jpg"
    assert storage.local_path("FILE:///data/b?.jpg") == "/data/b?.jpg"
    assert storage.local_path("file://host/share/c#2.jpg") == "//host/share/c#2.jpg"
    assert storage.local_path("/data/a#1.jpg") == "/data/a#1.jpg"
