"""Storage, model weights and importers against the real S3 server (moto): the same behaviour as on a local disk."""
import io
import os

import pandas as pd
import pyarrow as pa
import pytest
import torch

from dermray.apps import importers
from dermray.cli import main
from dermray.store import models, storage

from helpers import write_image

TABLE = pa.table({"a": [1, 2, 3], "b": ["x", "y", None]})


def test_weights_from_a_file_on_s3(s3_bucket):
    torch.manual_seed(1)
    imagenet_like = models.spec("mobilenet_v3_small").build().state_dict()
    buf = io.BytesIO()
    torch.save(imagenet_like, buf)
    uri = f"{s3_bucket}/weights/mobilenet_v3_small-imagenet.pth"
    storage.write_bytes(uri, buf.getvalue())
    m = models.build_model("mobilenet_v3_small", 7, weights=uri)
    for k, v in m.state_dict().items():
        if not k.startswith("classifier.3."):
            assert torch.equal(v, imagenet_like[k]), k
    assert m.classifier[3].out_features == 7
    # A fine-tuned dermray state_dict with the same number of classes loads whole, head included.
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "epoch": 3}, buf)
    storage.write_bytes(f"{s3_bucket}/ckpt.pt", buf.getvalue())
    again = models.build_model("mobilenet_v3_small", 7, weights=f"{s3_bucket}/ckpt.pt")
    assert torch.equal(again.classifier[3].weight, m.classifier[3].weight)


def test_import_folder_on_s3(s3_bucket, s3_server, tmp_path, capsys):
    """Images, labels and a YAML mapping under an S3 prefix; outputs written back to S3. The ISIC importer finds
    the same PNG/BMP objects."""
    import json

    import boto3

    from dermray.store import storage

    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    keys = {"S1": "hosp/images/S1.png", "S2": "hosp/images/sub/S2.BMP", "S3": "hosp/images/S3.jpeg"}
    for i, (_image_id, key) in enumerate(keys.items()):
        fmt = {"png": "PNG", "bmp": "BMP", "jpeg": "JPEG"}[key.rsplit(".", 1)[1].lower()]
        write_image(tmp_path / key, fmt, seed=i)
        client.upload_file(str(tmp_path / key), bucket, key)
    client.put_object(Bucket=bucket, Key="hosp/images-other/S9.png", Body=b"a neighbouring prefix, not listed")
    labels = "image_id,diagnosis,lesion_id,dx_type\nS1,mel,L1,histo\nS2,nv,L2,consensus\nS3,seb k,L3,histo\n"
    client.put_object(Bucket=bucket, Key="hosp/labels.csv", Body=labels.encode())
    client.put_object(Bucket=bucket, Key="hosp/mapping.yaml",
                      Body=b"mel: 'Malignant:Malignant melanocytic proliferations (Melanoma)'\nnv: Nevus\n")
    hosp = f"{s3_bucket}/hosp"
    assert main(["import", "folder", "--images", f"{hosp}/images/", "--labels", f"{hosp}/labels.csv", "--mapping",
                 f"{hosp}/mapping.yaml", "--output", f"{hosp}/in", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows_in"], summary["manifest_rows"], summary["quarantined"]) == (3, 2, 1)
    assert summary["unmapped_labels"] == {"seb k": 1}
    m = storage.read_table(f"{s3_bucket}/hosp/in/manifest.parquet").to_pandas().set_index("image_id")
    assert dict(m["uri"]) == {"S1": f"{s3_bucket}/{keys['S1']}", "S2": f"{s3_bucket}/{keys['S2']}"}
    assert dict(m["label_source"]) == {"S1": "biopsy", "S2": "clinical"} and (m["source"] == "images").all()
    q = storage.read_table(f"{s3_bucket}/hosp/in/quarantine.parquet").to_pandas()
    assert list(q["reason"]) == ["label 'seb k' is not in the mapping mapping.yaml"]
    assert list(q["uri"]) == [f"{s3_bucket}/{keys['S3']}"]
    meta = tmp_path / "isic.csv"
    pd.DataFrame({"isic_id": ["S1", "S2", "S4"], "diagnosis_1": ["Benign"] * 3}).to_csv(meta, index=False)
    r = importers.import_isic(str(meta), f"{s3_bucket}/hosp/images")
    assert dict(zip(r.manifest["image_id"], r.manifest["uri"])) == {
        "S1": f"{s3_bucket}/{keys['S1']}", "S2": f"{s3_bucket}/{keys['S2']}"}
    assert list(r.quarantine["reason"]) == [f"image file not found in {s3_bucket}/hosp/images"]


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


def test_a_folder_of_parquet_files_reads_as_one_table_in_path_order(base):
    folder = storage.join(base, "parts")
    storage.write_table(TABLE.slice(2), storage.join(folder, "part-b.parquet"))
    storage.write_table(TABLE.slice(0, 2), storage.join(folder, "part-a.parquet"))
    storage.write_bytes(storage.join(folder, "_SUCCESS"), b"")  # markers and hidden files are not data
    storage.write_bytes(storage.join(folder, ".part-c.parquet.crc"), b"\x00")
    assert storage.read_table(folder).equals(TABLE)
    assert storage.read_table(folder, columns=["b"]).column_names == ["b"]


def test_the_servers_request_log_stays_off_stderr(s3_bucket, s3_server, capsys, monkeypatch):
    """moto's server thread logs every request through werkzeug, which binds a stream handler of its own to
    whatever sys.stderr is when its first line is logged: in a test run, one test's captured stream. That test's
    stream closes; a later line - a background run's request - then prints a 'Logging error' into another test's
    output (a CI run failed on exactly that). Replayed: werkzeug's first line, logged while this test captures."""
    import logging

    import boto3
    import werkzeug._internal

    requests_log = logging.getLogger("werkzeug")
    monkeypatch.setattr(requests_log, "handlers",
                        [h for h in requests_log.handlers if type(h).__name__ != "_ColorStreamHandler"])
    monkeypatch.setattr(werkzeug._internal, "_logger", None)  # as if this were the session's first request
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=s3_bucket[len("s3://"):], Key="log-probe", Body=b"x")
    assert capsys.readouterr().err == ""
    assert not [h for h in requests_log.handlers if isinstance(h, logging.StreamHandler)]


def test_a_missing_output_bucket_is_named_before_any_work(study, s3_server, capsys):
    """Issue 29: a missing output bucket was found after 83 s of partition work, as "cannot write
    .../near_duplicates.parquet: no such file or object". Now the stage refuses at once, naming the bucket, and
    reads nothing (the study's inputs exist; only the bucket is missing)."""
    import time
    import uuid

    bucket = f"dermray-absent-{uuid.uuid4().hex[:8]}"
    data = study["data"]
    t0 = time.time()
    code = main(["partition", "--manifest", str(data / "manifest.parquet"), "--taxonomy",
                 str(data / "taxonomy.parquet"), "--tasks", str(data / "tasks.yaml"), "--output",
                 f"s3://{bucket}/out"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.time() - t0 < 10, err
    assert err.endswith(f"partition: output s3://{bucket}/out: bucket '{bucket}' does not exist, or these "
                        "credentials cannot see it (create it first, or choose another output)"), err
