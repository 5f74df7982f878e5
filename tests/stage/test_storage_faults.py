"""Object-storage outages: the S3 server stopped during writes and restarted. A write either succeeds or fails with
a clear message naming the object; readers never see a partial table; after the restart the same write succeeds."""
import time

import pyarrow as pa
import pytest

from dermray.errors import UserError
from dermray.store import storage


@pytest.fixture()
def flaky_s3(s3_servers):
    """The session's S3 server, which the test stops and starts again (moto keeps its objects in this process, so
    they survive the restart); up again when the test ends."""
    server = s3_servers["session"]
    server.client().create_bucket(Bucket="flaky")
    yield server
    if not server.up:
        server.start()


def test_a_write_during_an_outage_fails_clearly_and_leaves_the_old_table_whole(flaky_s3):
    uri = "s3://flaky/out/metrics.parquet"
    old = pa.table({"x": list(range(100))})
    storage.write_table(old, uri)
    flaky_s3.stop()
    t0 = time.time()
    with pytest.raises(UserError) as e:
        storage.write_table(pa.table({"x": list(range(1000))}), uri)
    assert "s3://flaky/out/metrics.parquet" in str(e.value) and time.time() - t0 < 120
    flaky_s3.start()
    assert storage.read_table(uri).equals(old)  # the old table, whole: never a partial one
    names = [f for f in storage.list_files("s3://flaky/out")]
    assert names == ["s3://flaky/out/metrics.parquet"], names  # no temporary object left visible by name
    new = pa.table({"x": list(range(1000))})
    storage.write_table(new, uri)  # after the restart the same write succeeds
    assert storage.read_table(uri).equals(new)
