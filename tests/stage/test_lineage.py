"""Lineage: outputs carry what produced them and are never silently reused. Each of the issue's findings is a test
that failed on the code before (which decided "already done" from names and paths)."""
import json
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dermray.cli import main
from dermray.errors import UserError
from dermray.runtime import artifacts, faults, layout, registry
from dermray.runtime.config import load_config
from dermray.stages import score, train
from dermray.stages.train.plan import plan

from helpers import write_fold


# ---- train: a checkpoint of another partition or recipe is never resumed -------------------------------------------
@pytest.fixture(scope="module")
def inputs(study, tmp_path_factory):
    """The shared study's inputs (d/in), with outputs of this module's own under d/out."""
    d = tmp_path_factory.mktemp("lineage_study")
    (d / "in").symlink_to(study["data"], target_is_directory=True)
    return d


def test_retraining_after_a_repartition_is_refused_and_force_trains_without_leakage(study, ray_local, tmp_path,
                                                                                     monkeypatch):
    """The study's trained folds (a copy), then the same run id partitioned again with another seed: same classes,
    other folds."""
    import study as shared_study

    out, run = tmp_path / "out", shared_study.RUN
    for stage in ("partition", "train"):
        shutil.copytree(study["out"] / stage / run, out / stage / run)
    first = pd.read_parquet(out / "partition" / run / "labels.parquet")
    data, settings = study["data"], shared_study.run_config(study["dir"])["partition"]
    assert main(["partition", "--manifest", str(data / "manifest.parquet"), "--taxonomy",
                 str(data / "taxonomy.parquet"), "--tasks", str(data / "tasks.yaml"), "--max-class-size",
                 str(settings["max_class_size"]), "--folds", str(settings["folds"]), "--seed", "5", "--output",
                 str(out), "--run-id", run]) == 0
    second = pd.read_parquet(out / "partition" / run / "labels.parquet")
    moved = (first.set_index("image_id")["fold"] != second.set_index("image_id")["fold"]).mean()
    assert moved > 0.3

    def cfg(*extra):
        return load_config(str(study["config"]), [f"output={out}", "train.folds=[0]", *extra])

    with pytest.raises(UserError, match=r"^fold 0: labels changed \([0-9a-f]{8} -> [0-9a-f]{8}\); use a new run id, "
                                        r"or --force to retrain from scratch$"):
        train.run(cfg())
    consumed = tmp_path / "consumed-{fold}"
    monkeypatch.setenv(faults.ENV, json.dumps({"consumed_file": str(consumed)}))
    s = train.run(cfg("train.force=true", "train.epochs=1"))
    assert s["per_fold"][0]["epochs"] == 1
    seen = set((tmp_path / "consumed-0").read_text().split())
    validation = set(second.loc[second["fold"] == 0, "image_id"])
    assert seen and not (seen & validation), "fold 0 trained on images of its own validation fold"
    # It trained on the other folds' images (less the inner split that chose its epoch).
    others = set(second.loc[second["fold"] != 0, "image_id"])
    assert seen <= others and len(seen) >= 0.7 * len(others)
    card = artifacts.read_card(str(out / "train" / run / "fold=0" / "model_card.json"))
    assert card.lineage["id"] == s["per_fold"][0]["lineage_id"]
    # Another learning rate is another recipe: refused as well, naming the setting.
    with pytest.raises(UserError, match=r"fold 0: train.lr 0\.001 -> 0\.003"):
        train.run(cfg("train.epochs=1", "train.lr=0.003"))


# ---- score: a retrained model re-scores; weights replaced behind the card are refused ------------------------------
def _score_cfg(d, out, *extra):
    return load_config(None, [
        f"data.tasks={d / 'in' / 'tasks.yaml'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
        f"score.checkpoints={out / 'train' / 'r1'}", f"score.input={d / 'archive' / 'manifest.parquet'}",
        f"output={out}", "run_id=s", "score.batch_size=8", "score.rows_per_file=10", "score.cpus_per_actor=0.5",
        "score.decode_cpus=0.5", *extra])


def _copy_models(d, out):
    shutil.copytree(d / "out" / "train" / "r1", out / "train" / "r1")


def test_a_retrained_model_rescoring_the_same_run_replaces_every_prediction(score_study, ray_local, tmp_path):
    d, out = score_study, tmp_path / "out"
    _copy_models(d, out)
    s1 = score.run(_score_cfg(d, out))
    classes = pq.read_table(d / "out" / "partition" / "r1" / "training_classes.parquet")
    for k in (0, 1):  # retrain in place: same paths, same model names, other weights
        write_fold(out / "train" / "r1" / f"fold={k}", classes, seed=10 + k, partition=d / "out" / "partition" / "r1")
    s2 = score.run(_score_cfg(d, out))
    assert s2["model_id"] != s1["model_id"] and s2["model_id"].split("@")[0] == s1["model_id"].split("@")[0]
    assert (s2["scored"], s2["already_done"]) == (24, 0)
    preds = pd.read_parquet(out / "predictions" / "s" / "predictions")
    assert len(preds) == 24 and set(preds["model_id"]) == {s2["model_id"]}


def test_weights_replaced_after_the_card_was_written_are_refused(score_study, tmp_path):
    d, out = score_study, tmp_path / "out"
    _copy_models(d, out)
    ens = artifacts.load_ensemble([str(out / "train" / "r1" / "fold=0")])
    shutil.copy(d / "out" / "train" / "r1" / "fold=1" / "best" / "model.pt",
                out / "train" / "r1" / "fold=0" / "best" / "model.pt")
    with pytest.raises(UserError, match="the weights changed since they were identified"):
        artifacts.load_member(ens, 0)


def test_nightly_across_a_retrain_is_refused_with_one_line_naming_both_models(score_study, ray_local, tmp_path,
                                                                              capsys):
    d, out = score_study, tmp_path / "out"
    _copy_models(d, out)
    args = ["nightly", "--checkpoint", str(out / "train" / "r1" / "fold=0"), "--input",
            str(d / "archive" / "manifest.parquet"), "--output", str(out), "--run-id", "nightly",
            "--set", f"data.tasks={d / 'in' / 'tasks.yaml'}", "--set", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
            "--set", "evaluate.n_bootstrap=20", "--set", "score.cpus_per_actor=0.5"]
    assert main([*args, "--date", "2026-11-24"]) == 0
    old = artifacts.load_ensemble([str(out / "train" / "r1" / "fold=0")]).model_id
    classes = pq.read_table(d / "out" / "partition" / "r1" / "training_classes.parquet")
    write_fold(out / "train" / "r1" / "fold=0", classes, seed=99, partition=d / "out" / "partition" / "r1")
    new = artifacts.load_ensemble([str(out / "train" / "r1" / "fold=0")]).model_id
    capsys.readouterr()
    assert main([*args, "--date", "2026-11-25"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress goes to stderr too: the refusal is its last line
    assert (err[-1].startswith("dermray nightly: error:") and old in err[-1] and new in err[-1]
            and "never mixes two models" in err[-1])
    assert not any("Traceback" in line for line in err)
    history = pd.read_parquet(out / "metrics" / "nightly" / "history")
    assert set(history["date"].astype(str)) == {"2026-11-24"}  # the refused night wrote no history
    preds = pd.read_parquet(out / "predictions" / "nightly" / "predictions")
    assert set(preds["model_id"]) == {old}


# ---- pipeline: a new run id gets its own partition; every stage's lineage is checked --------------------------------
def test_a_pipeline_with_a_new_run_id_and_another_class_size_uses_a_new_partition(inputs, ray_local):
    d = inputs
    base = [f"data.manifest={d / 'in' / 'manifest.parquet'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
            f"data.tasks={d / 'in' / 'tasks.yaml'}", f"output={d / 'pipe'}", "pipeline.stages=[partition]",
            "partition.folds=2"]
    from dermray.apps import pipeline

    a = pipeline.run(load_config(None, [*base, "run_id=A", "partition.max_class_size=100"]))
    b = pipeline.run(load_config(None, [*base, "run_id=B", "partition.max_class_size=5"]))
    assert a["stages"][0]["status"] == b["stages"][0]["status"] == "ran"
    classes = {r: len(pd.read_parquet(d / "pipe" / "partition" / r / "training_classes.parquet")) for r in "AB"}
    assert classes["B"] > classes["A"], classes
    assert plan(load_config(None, [*base, "run_id=B"])).partition == layout.partition_dir(str(d / "pipe"), "B")
    # The same run with another setting re-runs the partition and says why.
    again = pipeline.run(load_config(None, [*base, "run_id=A", "partition.max_class_size=7"]))
    assert again["stages"][0]["status"] == "ran" and "max_class_size 100 -> 7" in again["stages"][0]["why"]
    same = pipeline.run(load_config(None, [*base, "run_id=A", "partition.max_class_size=7"]))
    assert same["stages"][0]["status"] == "skipped (done)"


def test_the_study_s_lineage_chain_holds_link_by_link(study, capsys):
    """`dermray lineage` on the shared study: every stage with its inputs' fingerprints, the folds' models, and
    every link holding (the ensemble that scored is the run's, the metrics are those of the predictions)."""
    from dermray.apps import lineage_report

    chain = lineage_report.chain(str(study["out"]), "c")
    assert list(chain["stages"]) == ["partition", "train", "score", "evaluate", "saliency"]
    assert [f["fold"] for f in chain["stages"]["train"]["folds"]] == ["0", "1"]
    assert chain["links"] and all(link["holds"] for link in chain["links"]), chain["links"]
    text = lineage_report.format_chain(chain)
    assert "BROKEN" not in text and all(stage in text for stage in chain["stages"])
    capsys.readouterr()
    assert main(["lineage", "--output", str(study["out"]), "--run-id", "nope"]) == 2
    assert "no stage outputs for run 'nope'" in capsys.readouterr().err


def test_a_fold_model_replaced_by_another_fold_s_weights_is_caught_by_every_stage_and_by_lineage(study, tmp_path,
                                                                                                  capsys):
    """Issue 27, finding 4: fold 0's best/model.pt replaced by fold 1's (a copy gone wrong) in a finished run. The
    model id came from the card's sha256, never from the file, so every stage skipped and `dermray lineage` said
    ok on every link. Now the weights are identified by their bytes: the pipeline refuses in one line naming the
    file, and the lineage report marks the links that depend on the model broken."""
    import yaml

    import study as shared_study

    d = tmp_path
    shutil.copytree(study["out"], d / "out", symlinks=True)
    (d / "data").symlink_to(study["data"], target_is_directory=True)
    (d / "run.yaml").write_text(yaml.safe_dump(shared_study.run_config(d)))
    fold0, fold1 = (d / "out" / "train" / shared_study.RUN / f"fold={k}" / "best" / "model.pt" for k in (0, 1))
    shutil.copy(fold1, fold0)
    capsys.readouterr()
    assert main(["lineage", "--output", str(d / "out"), "--run-id", shared_study.RUN]) == 0
    text = capsys.readouterr().out
    broken = [ln for ln in text.splitlines() if ln.startswith("BROKEN")]
    assert any("train -> predictions" in ln for ln in broken), text
    assert any("model -> saliency" in ln for ln in broken), text
    assert "fold=0/best/model.pt" in text and "model card" in text, text
    for stage in ("score", "saliency"):
        assert main([stage, "--config", str(d / "run.yaml")]) == 2, stage
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "fold=0/best/model.pt" in err and "model card" in err, (stage, err)
    # The stages after training (the copy's image paths differ from the study's, so train would see new images).
    assert main(["pipeline", "--config", str(d / "run.yaml"), "--set", "pipeline.stages=[score,evaluate,saliency]",
                 "--set", f"pipeline.test_manifest={d / 'data' / 'test_manifest.parquet'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fold=0/best/model.pt" in err and "model card" in err, err


# ---- issue 27's findings, at the CLI, on copies of the shared study --------------------------------------------------
def _study_copy(study, d, stages=("partition", "train", "score", "evaluate")):
    """The study's outputs of ``stages`` copied to d/out, and its run config (d/run.yaml) with every output path
    moved there. The inputs stay the study's own files: their URIs are part of the lineage."""
    import yaml

    import study as shared_study

    for stage in stages:
        shutil.copytree(shared_study.stage_root(study["out"], stage), shared_study.stage_root(d / "out", stage))
    text = yaml.safe_dump(shared_study.run_config(study["dir"])).replace(str(study["out"]), str(d / "out"))
    (d / "run.yaml").write_text(text)
    return d


def _pipeline(d, *settings) -> dict:
    import study as shared_study

    args = ["pipeline", "--config", str(d / "run.yaml")]
    for s in settings:
        args += ["--set", s]
    assert main(args) == 0
    s = json.loads((d / "out" / "pipeline" / shared_study.RUN / "pipeline_summary.json").read_text())
    return {r["stage"]: r for r in s["stages"]}


def test_a_changed_subgroup_column_is_evaluated_again_not_skipped(study, tmp_path):
    """Issue 27, finding 2: a subgroup column of the scored images changed (the test manifest corrected, the
    images re-scored); the predictions' fingerprint covered only the columns of predictions.USED_COLUMNS, so
    evaluate said "skipped (unchanged)" and kept the old subgroup metrics."""
    d = _study_copy(study, tmp_path)
    evaluate_only = ("pipeline.stages=[evaluate]", "evaluate.subgroups=[profile]")
    assert _pipeline(d, *evaluate_only)["evaluate"]["status"] == "ran"
    assert _pipeline(d, *evaluate_only)["evaluate"]["status"] == "skipped (done)"
    parts = sorted((d / "out" / "predictions" / "c" / "predictions").glob("part-*.parquet"))
    assert len({p for part in parts for p in pq.read_table(part, columns=["profile"])["profile"].to_pylist()}) > 1
    for part in parts:  # what a corrected manifest, scored again, gives: every image of profile "melanoma"
        table = pq.read_table(part)
        pq.write_table(table.set_column(table.column_names.index("profile"), "profile", pa.array(
            ["melanoma"] * table.num_rows, table.schema.field("profile").type)), part)
    again = _pipeline(d, *evaluate_only)["evaluate"]
    assert again["status"] == "ran" and "predictions changed" in again["why"], again
    metrics = pd.read_parquet(d / "out" / "metrics" / "c" / "metrics.parquet")
    assert {s for s in metrics["subset"] if s.startswith("profile=")} == {"profile=melanoma"}


def test_a_changed_task_or_decision_setting_relocks_and_rescores(study, tmp_path):
    """Issue 27, finding 1: the positive class of melanoma_vs_nevus swapped in the tasks file re-ran partition and
    evaluate but skipped train and score: the predictions kept the old task columns and evaluate applied the old
    locked threshold to the new task. Train locks the decisions from the tasks, evaluate.target_sensitivity, the
    readers file and the test manifest's labels; score writes task columns from the tasks: each is in the lineage
    of the stage that reads it."""
    import yaml

    from dermray.apps import pipeline

    d = _study_copy(study, tmp_path)
    tasks = yaml.safe_load((study["data"] / "tasks.yaml").read_text())
    assert tasks["tasks"]["melanoma_vs_nevus"]["positive"] == "melanoma"
    tasks["tasks"]["melanoma_vs_nevus"]["positive"] = "nevus"
    (d / "swapped.yaml").write_text(yaml.safe_dump(tasks))
    run = ("pipeline.stages=[partition,train,score,evaluate]",
           f"pipeline.test_manifest={study['data'] / 'test_manifest.parquet'}")
    _pipeline(d, *run)
    before = pd.read_parquet(d / "out" / "predictions" / "c" / "predictions").set_index("image_id")
    card = d / "out" / "train" / "c" / "fold=0" / "model_card.json"
    old_points = {(p["task"], p["name"]): p["threshold"] for p in json.loads(card.read_text())["operating_points"]}
    stages = _pipeline(d, *run, f"data.tasks={d / 'swapped.yaml'}")
    assert {s: r["status"] for s, r in stages.items()} == dict.fromkeys(stages, "ran"), stages
    assert "tasks changed" in stages["train"]["why"] and "tasks changed" in stages["score"]["why"], stages
    after = pd.read_parquet(d / "out" / "predictions" / "c" / "predictions").set_index("image_id")
    score = "melanoma_vs_nevus_score"
    inside = before[score].notna()
    assert inside.sum() > 5
    pd.testing.assert_series_equal(after.loc[inside[inside].index, score], 1 - before.loc[inside, score],
                                   atol=1e-5, check_names=False)
    new_points = {(p["task"], p["name"]): p["threshold"] for p in json.loads(card.read_text())["operating_points"]}
    mvn = [k for k in new_points if k[0] == "melanoma_vs_nevus"]
    assert mvn and all(new_points[k] != old_points.get(k) for k in mvn), (old_points, new_points)
    # The other inputs of the locked decisions: each change is named by train's lineage (without running it).
    cfg = load_config(str(d / "run.yaml"), [*run, f"data.tasks={d / 'swapped.yaml'}"])
    readers = pd.read_parquet(study["data"] / "readers.parquet")
    readers.assign(decision=1 - readers["decision"]).to_parquet(d / "readers.parquet")
    for setting, named in ((("evaluate.target_sensitivity=0.8",), "evaluate.target_sensitivity 0.95 -> 0.8"),
                           ((f"evaluate.readers={d / 'readers.parquet'}",), "readers changed")):
        changed = load_config(str(d / "run.yaml"), [*run, f"data.tasks={d / 'swapped.yaml'}", *setting])
        again, why, _ = pipeline.decide("train", pipeline.stage_config(changed, "train"), False)
        assert again and named in why, (setting, why)
    assert pipeline.decide("train", pipeline.stage_config(cfg, "train"), False)[:2] == (False, "unchanged")


def test_a_new_training_manifest_under_a_trained_run_id_leaves_the_partition_as_it_was(study, tmp_path, capsys):
    """Issue 27, finding 3: the training manifest changed under the same run id (13 images relabelled). The
    pipeline re-ran partition, overwriting labels.parquet, before train refused; the images then had another
    class than the models were trained on, and `dermray lineage` said ok on partition -> train. Now the pipeline
    builds the new partition aside, asks train whether it can run on it, and refuses before anything is replaced;
    a partition replaced by hand (`dermray partition` under the run id) is a broken link."""
    d = _study_copy(study, tmp_path, ("partition", "train"))
    manifest = pd.read_parquet(study["data"] / "manifest.parquet")
    manifest["uri"] = [str(study["data"] / u) for u in manifest["uri"]]  # the same images, absolute URIs
    nevi = manifest.index[manifest["label"] == "benign:benign melanocytic lesions:congenital nevus"][:13]
    manifest.loc[nevi, "label"] = "malignant:malignant melanoma:acral lentiginous melanoma"
    manifest.to_parquet(d / "manifest.parquet", index=False)
    labels = d / "out" / "partition" / "c" / "labels.parquet"
    held = {p: p.read_bytes() for p in labels.parent.glob("*")}
    capsys.readouterr()
    assert main(["pipeline", "--config", str(d / "run.yaml"), "--set", "pipeline.stages=[partition,train]",
                 "--set", f"data.manifest={d / 'manifest.parquet'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the lines before: progress
    assert err.startswith("dermray pipeline: error: ") and "fold 0: " in err and "labels changed" in err, err
    assert "left as it was" in err and "--force" in err, err
    assert {p: p.read_bytes() for p in labels.parent.glob("*")} == held, "the partition was replaced"
    assert not list((d / "out").rglob("_staged*")), "the partition built aside was left behind"
    # A partition replaced under the run id by hand: `dermray lineage` marks the link broken, naming the folds.
    settings = yaml_settings(d)
    assert main(["partition", "--manifest", str(d / "manifest.parquet"), "--taxonomy", settings["taxonomy"],
                 "--tasks", settings["tasks"], "--max-class-size", "12", "--folds", "2", "--output", str(d / "out"),
                 "--run-id", "c"]) == 0
    capsys.readouterr()
    assert main(["lineage", "--output", str(d / "out"), "--run-id", "c"]) == 0
    text = capsys.readouterr().out
    broken = [ln for ln in text.splitlines() if ln.startswith("BROKEN")]
    assert any("partition -> train" in ln and "fold 0" in ln and "fold 1" in ln for ln in broken), text


def yaml_settings(d) -> dict:
    import yaml

    return yaml.safe_load((d / "run.yaml").read_text())["data"]


def _as_older_record(lin: dict, **settings) -> dict:
    """A lineage record as dermray wrote it before every declared value was in it (format 1): the train keys it
    picked by hand, unsectioned, another id."""
    config = {k: v for k, v in lin["config"]["train"].items() if k in ("lr", "epochs", "batch_size", "seed")}
    return {k: v for k, v in lin.items() if k != "format"} | {
        "config": config | {"fold": lin["config"]["fold"]} | settings, "id": "older-" + lin["id"][:8]}


def test_folds_recorded_by_an_older_dermray_are_kept_when_their_settings_are_those_of_now(study, tmp_path):
    """Issue 27: every declared value is in the lineage now, so a fold's lineage id changed with the upgrade. A
    fold finished by the older dermray, from the same rows and with the settings it recorded equal to those of
    now, is kept (not trained again, its records take the new lineage); one whose recorded learning rate differs
    is refused naming it."""
    import study as shared_study

    d = _study_copy(study, tmp_path, stages=("partition", "train"))
    run_dir = d / "out" / "train" / shared_study.RUN
    folds = sorted(run_dir.glob("fold=*"))
    weights = {f: (f / "best" / "model.pt").stat().st_mtime_ns for f in folds}
    for f in folds:
        older = _as_older_record(json.loads((f / "lineage.json").read_text()))
        (f / "lineage.json").write_text(json.dumps(older))
        record = json.loads((f / "fold_result.json").read_text())
        (f / "fold_result.json").write_text(json.dumps(record | {"lineage_id": older["id"]}))
    cfg = load_config(str(d / "run.yaml"))
    summary = registry.run("train", cfg)
    assert {f: (f / "best" / "model.pt").stat().st_mtime_ns for f in folds} == weights  # not trained again
    for f in folds:
        now = json.loads((f / "lineage.json").read_text())
        assert now["format"] == 2 and json.loads((f / "fold_result.json").read_text())["lineage_id"] == now["id"]
    assert len(summary["per_fold"]) == len(folds)
    first = folds[0]
    (first / "lineage.json").write_text(json.dumps(_as_older_record(json.loads((first / "lineage.json").read_text()),
                                                                    lr=0.5)))
    with pytest.raises(UserError, match=rf"^fold {first.name[len('fold='):]}: train.lr 0.5 -> 0.001; use a new run id"):
        registry.run("train", cfg)
