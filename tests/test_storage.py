import os

import pyarrow as pa
import pytest

from dermray import storage
from dermray.errors import UserError

TABLE = pa.table({"a": [1, 2, 3], "b": ["x", "y", None]})


@pytest.fixture(params=["local", "file", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    if request.param == "file":
        return "file://" + str(tmp_path)
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip_tables_bytes_and_listing(base):
    uri = storage.join(base, "t", "table.parquet")
    storage.write_table(TABLE, uri)
    assert storage.read_table(uri).equals(TABLE)
    assert storage.read_table(uri, columns=["b"]).column_names == ["b"]
    storage.write_bytes(storage.join(base, "t", "x.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(base, "t", "x.bin")) == b"\x00\x01"
    listed = list(storage.list_files(storage.join(base, "t"), (".parquet",)))
    assert len(listed) == 1 and listed[0].endswith("table.parquet")
    # Re-running replaces; no temporary objects stay behind.
    storage.write_table(TABLE.slice(0, 1), uri)
    assert storage.read_table(uri).num_rows == 1
    assert [os.path.basename(p) for p in storage.list_files(storage.join(base, "t"))] == ["table.parquet", "x.bin"]


def test_failed_streaming_write_leaves_the_old_table(base):
    uri = storage.join(base, "table.parquet")
    storage.write_table(TABLE, uri)

    def broken():
        yield TABLE
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        storage.write_table_batches(TABLE.schema, broken(), uri)
    assert storage.read_table(uri).equals(TABLE)
    assert [os.path.basename(p) for p in storage.list_files(base)] == ["table.parquet"]


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
