"""Object-storage outages: the S3 server stopped during writes and restarted. A write either succeeds or fails with
a clear message naming the object; readers never see a partial table; after the restart the same write succeeds."""
import time

import boto3
import pyarrow as pa
import pytest

from dermray import storage
from dermray.errors import UserError

from helpers import free_port


@pytest.fixture()
def flaky_s3(monkeypatch):
    """A dedicated moto server on a fixed port that the test may stop and restart (moto keeps its state in the
    process, so objects survive the restart)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail within seconds, not minutes, while the server is down
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="flaky")
    state = {"server": server, "port": port}

    def restart():
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        state["server"].start()

    state["restart"] = restart
    yield state
    state["server"].stop()


def test_a_write_during_an_outage_fails_clearly_and_leaves_the_old_table_whole(flaky_s3):
    uri = "s3://flaky/out/metrics.parquet"
    old = pa.table({"x": list(range(100))})
    storage.write_table(old, uri)
    flaky_s3["server"].stop()
    t0 = time.time()
    with pytest.raises(UserError) as e:
        storage.write_table(pa.table({"x": list(range(1000))}), uri)
    assert "s3://flaky/out/metrics.parquet" in str(e.value) and time.time() - t0 < 120
    flaky_s3["restart"]()
    assert storage.read_table(uri).equals(old)  # the old table, whole: never a partial one
    names = [f for f in storage.list_files("s3://flaky/out")]
    assert names == ["s3://flaky/out/metrics.parquet"], names  # no temporary object left visible by name
    new = pa.table({"x": list(range(1000))})
    storage.write_table(new, uri)  # after the restart the same write succeeds
    assert storage.read_table(uri).equals(new)
