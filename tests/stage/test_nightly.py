"""The nightly job over a growing archive: only new images are scored, each night gets its metrics partition, and a
missed floor fails the job with its reason."""
import json
import pathlib

import pandas as pd

from dermray.cli import EXIT_FLOOR_MISSED, main

from helpers import run_job

REPO = pathlib.Path(__file__).resolve().parents[2]


def _night_manifest(d, tmp_path, name, n, missing=False, relabel=None):
    m = pd.read_parquet(d / "archive" / "manifest.parquet").head(n)
    m["uri"] = [str(d / "archive" / u) for u in m["uri"]]
    if relabel is not None:  # image id -> its new label (a diagnosis corrected since it was scored)
        m["label"] = [relabel.get(i, v) for i, v in zip(m["image_id"], m["label"])]
    if missing:
        m = pd.concat([m, pd.DataFrame([{"image_id": "lost-1", "uri": str(tmp_path / "lost-1.jpg"),
                                         "label": m["label"].iloc[0]}])], ignore_index=True)
    m.to_parquet(tmp_path / f"{name}.parquet", index=False)
    return tmp_path / f"{name}.parquet"


def test_two_nights_score_only_new_images_and_a_missed_floor_fails_the_job(score_study, ray_local, tmp_path, capsys):
    d = score_study
    common = ["--checkpoint", str(d / "out" / "train" / "r1" / "fold=0"), "--output", str(tmp_path / "out"),
              "--run-id", "nightly", "--set", f"data.tasks={d / 'in' / 'tasks.yaml'}",
              "--set", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
              "--set", f"score.partition={d / 'out' / 'partition' / 'r1'}", "--set", "evaluate.n_bootstrap=20",
              "--set", "score.batch_size=8", "--set", "score.cpus_per_actor=0.5", "--json"]
    night1 = _night_manifest(d, tmp_path, "night1", 14)
    assert main(["nightly", "--input", str(night1), "--date", "2026-11-24", *common]) == 0
    s1 = json.loads(capsys.readouterr().out)
    assert s1["scored_tonight"] == 14 and s1["already_scored"] == 0 and s1["floors_missed"] == []

    # The second night through the job script the CronJob runs (jobs/nightly_score.py), here in this process: its
    # own process is the entry-point smoke test's (tests/system/test_entrypoints.py).
    # Issue 27, finding 5: an image of the first night relabelled since (a nevus found to be a melanoma). It was
    # "already scored" by its image id, and its old label stayed the ground truth of every later evaluation.
    first = pd.read_parquet(night1)
    nevus = first.loc[first["label"] != first.loc[0, "label"], "image_id"].iloc[0]
    night2 = _night_manifest(d, tmp_path, "night2", 24, missing=True, relabel={nevus: first.loc[0, "label"]})
    code = run_job("nightly_score", ["--input", str(night2), "--date", "2026-11-25", *common, "--set",
                                  "nightly.max_quarantined_share=0.05", "--set",
                                  "nightly.min_auc={melanoma_vs_nevus: 1.01}"])
    err = capsys.readouterr().err
    assert code == EXIT_FLOOR_MISSED, err[-3000:]
    assert "Traceback" not in err and "dermray nightly: floor missed: nightly 2026-11-25" in err
    assert "1 of tonight's 12 images were quarantined" in err and "melanoma_vs_nevus AUC (all)" in err
    assert "below the floor 1.01" in err
    summary = json.loads((tmp_path / "out" / "metrics" / "nightly" / "date=2026-11-25" / "nightly_summary.json")
                         .read_text())
    assert summary["scored_tonight"] == 11 and summary["already_scored"] == 13 and summary["predictions_total"] == 24
    assert summary["changed_since_scored"] == 1, summary
    preds = pd.read_parquet(tmp_path / "out" / "predictions" / "nightly" / "predictions")
    assert len(preds) == 24 and preds["image_id"].is_unique
    assert preds.set_index("image_id").loc[nevus, "label"] == first.loc[0, "label"]
    history = pd.read_parquet(tmp_path / "out" / "metrics" / "nightly" / "history")
    assert sorted(history["date"].astype(str).unique()) == ["2026-11-24", "2026-11-25"]
    n_night = history[history.metric == "n_positive"].groupby("date", observed=True)["n"].max()
    assert n_night.loc["2026-11-25"] > n_night.loc["2026-11-24"]  # the second night evaluates all 24 images
    assert (tmp_path / "out" / "metrics" / "nightly" / "date=2026-11-25" / "report.html").exists()


def test_nightly_config_errors_are_user_errors(score_study, tmp_path, capsys):
    assert main(["nightly", "--date", "25/11/2026", "--input", "x.parquet", "--output", str(tmp_path)]) == 2
    assert "key 'nightly.date': must be YYYY-MM-DD, got '25/11/2026'" in capsys.readouterr().err
