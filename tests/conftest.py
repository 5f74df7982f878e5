"""Shared fixtures: real data (skipped cleanly when ../shared/data is absent), in-process Ray, a real S3 server."""
from __future__ import annotations

import os
import pathlib
import socket

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
HAM = SHARED_DATA / "ham10000"
ISIC_TAXONOMY = SHARED_DATA / "isic-taxonomy" / "diagnosis_nodes.csv"


@pytest.fixture(scope="session")
def ham_dir() -> pathlib.Path:
    if not (HAM / "labels.csv").exists():
        pytest.skip(f"HAM10000 data not found at {HAM} (set DERMRAY_SHARED_DATA)")
    return HAM


@pytest.fixture(scope="session")
def isic_taxonomy_csv() -> pathlib.Path:
    if not ISIC_TAXONOMY.exists():
        pytest.skip(f"ISIC taxonomy not found at {ISIC_TAXONOMY}")
    return ISIC_TAXONOMY


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One in-process Ray for the test session (2 CPUs), shut down at the end. Started after the S3 server so that
    its workers inherit AWS_ENDPOINT_URL."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's threaded server) on 127.0.0.1, with AWS_ENDPOINT_URL pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server):
    import uuid

    import boto3

    name = f"dermray-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
