"""`dermray doctor`: one line per check, against a real S3 API (moto) and the in-process Ray."""
import json

import boto3

from dermray.cli import main


def test_doctor_checks_ray_torch_s3_and_weights_and_leaves_no_probe(s3_bucket, s3_server, capsys):
    prefix = f"{s3_bucket}/runs"
    assert main(["doctor", "--s3", prefix, "--json", "--set", "train.weights=none"]) == 0
    checks = json.loads(capsys.readouterr().out)
    assert [c["check"] for c in checks] == ["ray", "torch", "s3", "weights"]
    assert all(c["status"] == "ok" for c in checks), checks
    by = {c["check"]: c["detail"] for c in checks}
    assert by["ray"].startswith("Ray 2.") and "auth mode" in by["ray"]
    assert "threads" in by["torch"] and "train.amp=" in by["torch"]
    assert "readable and writable" in by["s3"] and s3_server["AWS_ENDPOINT_URL"] in by["s3"]
    listed = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).list_objects_v2(
        Bucket=s3_bucket[len("s3://"):])
    assert listed.get("KeyCount", 0) == 0  # the probe object was deleted


def test_doctor_fails_in_one_line_per_failed_check_and_exits_2(s3_server, tmp_path, capsys):
    missing = tmp_path / "no-such-weights.pt"
    rc = main(["doctor", "--s3", "s3://dermray-no-such-bucket-here/x", "--set", f"train.weights={missing}"])
    out = capsys.readouterr()
    assert rc == 2
    lines = [ln for ln in out.out.splitlines() if ln.startswith("doctor: ")]
    assert len(lines) == 4, out.out
    failed = [ln for ln in lines if " fail " in ln]
    assert [ln.split()[1] for ln in failed] == ["s3", "weights"], lines
    assert "2 check(s) failed" in out.err
