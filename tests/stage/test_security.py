"""Secrets never leak: a run whose S3 credentials and Ray token are planted secrets writes them nowhere - not in
its outputs, summaries, model cards, reports or console output."""
import pathlib

from dermray.cli import main
from dermray.store import storage

SECRET = "PLANTED-s3cr3t-9f8e7d6c5b4a"


def test_planted_credentials_appear_in_nothing_a_run_writes(score_study, ray_local, s3_bucket, tmp_path,
                                                            monkeypatch, capsys):
    d = score_study
    for f in (d / "archive").rglob("*"):
        if f.is_file():
            storage.write_bytes(f"{s3_bucket}/archive/{f.relative_to(d / 'archive')}", f.read_bytes())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any key; the driver signs with this one
    monkeypatch.setenv("RAY_AUTH_TOKEN", SECRET)
    out = tmp_path / "out"
    common = ["--set", f"data.tasks={d / 'in' / 'tasks.yaml'}",
              "--set", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}"]
    assert main(["score", "--checkpoint", str(d / "out" / "train" / "r1" / "fold=0"), "--input",
                 f"{s3_bucket}/archive/manifest.parquet", "--output", str(out), "--run-id", "sec", *common,
                 "--set", f"score.partition={d / 'out' / 'partition' / 'r1'}", "--set", "score.cpus_per_actor=0.5",
                 "--json"]) == 0
    assert main(["evaluate", "--predictions", str(out / "predictions" / "sec" / "predictions"), "--partition",
                 str(d / "out" / "partition" / "r1"), "--output", str(out), "--run-id", "sec", "--set",
                 "evaluate.n_bootstrap=20", *common]) == 0
    # A failing run's message names the object, not the credentials.
    assert main(["score", "--checkpoint", str(d / "out" / "train" / "r1" / "fold=0"), "--input",
                 f"{s3_bucket}/archive/nothing.parquet", "--output", str(out), "--run-id", "sec2"]) == 2
    console = capsys.readouterr()
    assert SECRET not in console.out + console.err
    written = [p for p in pathlib.Path(out).rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in written) and any(p.name == "score_summary.json" for p in written)
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p
