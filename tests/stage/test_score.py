"""The scoring stage on real HAM10000 JPEGs, through real Ray Data, locally and on a real S3 (moto)."""
import io
import json
import tarfile
import time

import numpy as np
import pandas as pd
import pytest
import torch

from dermray.cli import main
from dermray.core.transforms import decode_image, eval_transform, to_array
from dermray.errors import UserError
from dermray.runtime import artifacts, faults
from dermray.runtime.config import load_config
from dermray.stages import score
from dermray.stages.score.actors import Predictor, decode_rows, decode_shards
from dermray.stages.score.plan import folder_table
from dermray.stages.score.shared import CHUNK
from dermray.stages.score.stage import COMPILE_MIN_IMAGES, compile_decision
from dermray.stages.score.summary import reason_kind
from dermray.store import models, storage

from helpers import SIZE


def cfg(d, *extra):
    return load_config(None, [
        f"data.tasks={d / 'in' / 'tasks.yaml'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
        f"score.partition={d / 'out' / 'partition' / 'r1'}", f"score.checkpoints={d / 'out' / 'train' / 'r1'}",
        "score.batch_size=8", "score.rows_per_file=10", "score.decode_cpus=0.5", "score.cpus_per_actor=0.5",
        *extra])


def eager_probs(d, uris: list[str], folds=(0, 1), flips=False) -> np.ndarray:
    """A plain PyTorch forward of the same models on the same files (no Ray, no channels_last)."""
    n_classes = len(pd.read_parquet(d / "out" / "partition" / "r1" / "training_classes.parquet"))
    x = torch.from_numpy(np.stack([to_array(eval_transform(decode_image(storage.read_bytes(u)), SIZE),
                                            models.IMAGENET_MEAN, models.IMAGENET_STD) for u in uris]))
    views = [x, torch.flip(x, dims=[3]), torch.flip(x, dims=[2])] if flips else [x]
    total = 0
    for k in folds:
        m = models.build_model("mobilenet_v3_small", n_classes,
                               weights=str(d / "out" / "train" / "r1" / f"fold={k}" / "best" / "model.pt")).eval()
        with torch.no_grad():
            for v in views:
                total = total + torch.softmax(m(v), 1)
    return (total / (len(folds) * len(views))).numpy()


def read_preds(uri) -> pd.DataFrame:
    return storage.read_table(uri).to_pandas().sort_values("image_id").reset_index(drop=True)


def test_manifest_predictions_equal_an_eager_forward_and_carry_the_manifest(score_study, ray_local, tmp_path):
    d = score_study
    s = score.run(cfg(d, f"score.input={d / 'archive' / 'manifest.parquet'}", f"output={tmp_path}", "run_id=m"))
    assert (s["input"], s["scored"], s["quarantined"], s["already_done"]) == (24, 24, 0, 0)
    assert s["files_written"] == 3 and s["models"] == 2
    df = read_preds(tmp_path / "predictions" / "m" / "predictions")
    assert len(df) == 24 and df["image_id"].is_unique
    expected = eager_probs(d, [str(d / "archive" / "images" / f"{i}.jpg") for i in df["image_id"]])
    np.testing.assert_allclose(np.stack(df["probs"]), expected, atol=1e-5)
    # The model id names the models and their weights' content.
    (model_id,) = df["model_id"].unique().tolist()
    assert __import__("re").fullmatch(r"r1/ensemble\(fold=0,1\)@[0-9a-f]{12}", model_id), model_id
    assert model_id == artifacts.load_ensemble([str(d / "out" / "train" / "r1")]).model_id
    man = pd.read_parquet(d / "archive" / "manifest.parquet").set_index("image_id").loc[df["image_id"]]
    for col in ("label", "label_source", "modality", "group_id", "dx"):
        assert df[col].tolist() == man[col].tolist()
    # Task columns through the inference algorithm: sums of training-class probabilities.
    tm = pd.read_parquet(d / "out" / "partition" / "r1" / "task_membership.parquet")
    mvn = tm[tm.task == "melanoma_vs_nevus"]
    probs = np.stack(df["probs"])
    p_mel = probs[:, mvn.loc[mvn.task_class == "melanoma", "class_index"]].sum(1)
    p_nev = probs[:, mvn.loc[mvn.task_class == "nevus", "class_index"]].sum(1)
    np.testing.assert_allclose(np.stack(df["melanoma_vs_nevus_probs"]), np.c_[p_mel, p_nev], atol=1e-6)
    np.testing.assert_allclose(df["melanoma_vs_nevus_score"], p_mel / (p_mel + p_nev), atol=1e-6)
    assert np.stack(df["three_class_probs"]).shape == (24, 3)
    assert (df["top_class"] == probs.argmax(1)).all()
    # The predictions feed the evaluation stage as they are.
    from dermray.stages import evaluate
    ev = evaluate.run(load_config(None, [f"evaluate.predictions={tmp_path / 'predictions' / 'm' / 'predictions'}",
                                         f"data.tasks={d / 'in' / 'tasks.yaml'}",
                                         f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
                                         f"evaluate.partition={d / 'out' / 'partition' / 'r1'}",
                                         f"output={tmp_path}", "run_id=m", "evaluate.n_bootstrap=20"]))
    assert any(h["task"] == "melanoma_vs_nevus" and h["metric"] == "auc" for h in ev["headline"])


def _decoded(kind: str, uri: str, labels: str | None = None) -> tuple[list[str], np.ndarray, pd.DataFrame]:
    """What score's read path makes of an input, without the actors: (image ids, decoded images uint8 [N, SIZE,
    SIZE, 3], the manifest table it scores, None for shards), sorted by image id."""
    retry = storage.DEFAULT_RETRY
    if kind == "webdataset":
        from dermray.store import archive

        rows = [b for shard in archive.shard_list(uri) for b in decode_shards(
            {"uri": [shard], CHUNK: [shard]}, SIZE, 10**8, 100, retry)]
        ids = np.concatenate([b["image_id"] for b in rows])
        images = np.concatenate([b["image"] for b in rows])
        keep = ids != ""  # the end-of-shard markers
        order = np.argsort(ids[keep], kind="stable")
        return ids[keep][order].tolist(), images[keep][order], None
    table = (folder_table(uri, labels)[0] if kind == "folder" else storage.read_table(uri)).to_pandas()
    table = table.assign(uri=[storage.resolve(u, storage.parent(uri)) if kind == "manifest" else u
                              for u in table["uri"]]).sort_values("image_id").reset_index(drop=True)
    out = decode_rows({c: table[c].to_numpy(dtype=object) for c in ("image_id", "uri")}, SIZE, 10**8, retry)
    return table["image_id"].tolist(), out["image"], table


def test_three_input_kinds_locally_and_on_s3_give_identical_predictions(score_study, ray_local, tmp_path, s3_bucket):
    """The folder and the brace-listed shards scored end to end on S3, against the known answer (a plain PyTorch
    forward of the same files; the local manifest scored end to end meets the same answer in
    test_manifest_predictions_equal_an_eager_forward_and_carry_the_manifest), and every combination of kind and
    place through the same listing and decoding code, without the actors: every combination reads the same images
    into the same pixels. (A score run per combination, six in all, cost ~100 core-seconds on 2 cores, mostly actor
    start-up.)"""
    d = score_study
    arch = d / "archive"
    for f in arch.rglob("*"):
        if f.is_file():
            storage.write_bytes(f"{s3_bucket}/archive/{f.relative_to(arch)}", f.read_bytes())
    inputs = {
        "s3_folder": [f"score.input={s3_bucket}/archive/images", f"score.labels={s3_bucket}/archive/labels.csv"],
        "s3_shards": [f"score.input={s3_bucket}/archive/shards/shard-{{000..001}}.tar"],
    }
    manifest = pd.read_parquet(arch / "manifest.parquet").sort_values("image_id").reset_index(drop=True)
    expected = eager_probs(d, [str(arch / "images" / f"{i}.jpg") for i in manifest["image_id"]])
    frames = {}
    for name, args in inputs.items():
        out = f"{s3_bucket}/out"
        s = score.run(cfg(d, *args, f"output={out}", f"run_id={name}"))
        assert s["scored"] == 24 and s["quarantined"] == 0, (name, s)
        frames[name] = read_preds(storage.join(out, "predictions", name, "predictions"))
    for name, df in frames.items():
        assert df["image_id"].tolist() == manifest["image_id"].tolist(), name
        np.testing.assert_allclose(np.stack(df["probs"]), expected, atol=1e-5, err_msg=name)
        for col in ("label", "label_source", "modality", "group_id"):
            assert df[col].tolist() == manifest[col].tolist(), (name, col)
    np.testing.assert_array_equal(np.stack(frames["s3_folder"]["probs"]), np.stack(frames["s3_shards"]["probs"]))
    assert frames["s3_shards"]["uri"].str.startswith(f"{s3_bucket}/archive/shards/shard-00").all()
    # Every combination reads what the local manifest reads.
    ids, images, manifest = _decoded("manifest", str(arch / "manifest.parquet"))
    assert ids == manifest["image_id"].tolist() and images.shape == (24, SIZE, SIZE, 3)
    for kind, uri, labels in (("manifest", f"{s3_bucket}/archive/manifest.parquet", None),
                              ("folder", str(arch / "images"), str(arch / "labels.csv")),
                              ("webdataset", str(arch / "shards"), None),
                              ("folder", f"{s3_bucket}/archive/images", f"{s3_bucket}/archive/labels.csv"),
                              ("webdataset", f"{s3_bucket}/archive/shards", None)):
        got_ids, got_images, table = _decoded(kind, uri, labels)
        assert got_ids == ids, (kind, uri)
        np.testing.assert_array_equal(got_images, images, err_msg=f"{kind} {uri}")
        if table is not None:
            for col in ("label", "label_source", "modality", "group_id"):
                assert table[col].tolist() == manifest[col].tolist(), (kind, col)


def test_bad_files_are_quarantined_with_their_reason_and_the_rest_is_scored(score_study, ray_local, tmp_path):
    d = score_study
    good = sorted((d / "archive" / "images").glob("*.jpg"))[:6]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    jpeg = good[0].read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "notimage.jpg").write_bytes(b"%PDF-1.4 this is not an image\n" * 20)
    (folder / "corrupt.jpg").write_bytes(jpeg[:200] + bytes(range(256)) * 20)
    big = tmp_path / "big.png"
    from PIL import Image
    Image.new("RGB", (600, 600), (200, 100, 50)).save(big)
    (folder / "oversized.png").write_bytes(big.read_bytes())
    rows = [{"image_id": p.stem, "uri": str(folder / p.name), "label": "x"} for p in sorted(folder.iterdir())]
    rows.append({"image_id": "missing", "uri": str(folder / "missing.jpg"), "label": "x"})
    rows.append({"image_id": good[1].stem, "uri": str(folder / good[1].name), "label": "x"})  # a repeated id
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet", index=False)
    s = score.run(cfg(d, f"score.input={tmp_path / 'm.parquet'}", f"output={tmp_path}", "run_id=bad",
                      "score.max_pixels=250000", "data.tasks=", "data.taxonomy="))
    assert s["input"] == 13 and s["scored"] == 6 and s["quarantined"] == 7
    assert s["input"] == s["scored"] + s["quarantined"] + s["already_done"]
    q = pd.read_parquet(tmp_path / "predictions" / "bad" / "quarantine.parquet").set_index("image_id")
    reasons = q["reason"].to_dict()
    assert "empty file" in reasons["zero"]
    assert "truncated" in reasons["truncated"] or "corrupt" in reasons["truncated"]
    assert "not an image" in reasons["notimage"]
    assert "corrupt" in reasons["corrupt"] or "truncated" in reasons["corrupt"] or "not an image" in reasons["corrupt"]
    assert "too large" in reasons["oversized"]
    assert "no such file" in reasons["missing"]
    assert "duplicate image_id (first seen at row" in reasons[good[1].stem]
    assert (q["stage"] == "score").all()
    # The summary and its console lines say why, counted by kind, and where the file lies (issue 29).
    kinds = {r["reason"]: r["images"] for r in s["quarantine_reasons"]}
    assert len(kinds) == 3 and sum(kinds.values()) <= 7 and all(n >= 1 for n in kinds.values())
    assert set(kinds) <= {reason_kind(r) for r in reasons.values()}
    line = next(ln for ln in score.format_summary(s).splitlines() if ln.startswith("  quarantined ("))
    assert line.endswith(str(tmp_path / "predictions" / "bad" / "quarantine.parquet"))
    assert all(f"{n} {k}" in line for k, n in kinds.items())
    df = read_preds(tmp_path / "predictions" / "bad" / "predictions")
    assert sorted(df["image_id"]) == sorted(p.stem for p in good)
    assert "melanoma_vs_nevus_score" not in df.columns  # no tasks configured: training-class probabilities only


def test_unsafe_tar_members_are_quarantined_and_never_extracted(score_study, ray_local, tmp_path):
    d = score_study
    imgs = sorted((d / "archive" / "images").glob("*.jpg"))[:3]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name, payload=b"", **kw):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            for k, v in kw.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(payload))
        add(f"{imgs[0].stem}.jpg", imgs[0].read_bytes())
        add("../escape.jpg", imgs[1].read_bytes())
        add("/etc/absolute.jpg", imgs[1].read_bytes())
        add("link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(f"sub/{imgs[2].stem}.jpg", imgs[2].read_bytes())
        add(f"sub/{imgs[2].stem}.json", json.dumps({"image_id": imgs[2].stem, "label": "y"}).encode())
        add("nolabel.json", b'{"label": "z"}')
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    s = score.run(cfg(d, f"score.input={tmp_path / 's.tar'}", f"output={tmp_path}", "run_id=tar"))
    assert s["scored"] == 2 and s["quarantined"] == 4 and s["input"] == 6
    q = pd.read_parquet(tmp_path / "predictions" / "tar" / "quarantine.parquet")
    text = " | ".join(q["reason"])
    assert text.count("unsafe member path") == 2 and "symlink" in text and "no image member" in text
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()
    df = read_preds(tmp_path / "predictions" / "tar" / "predictions")
    assert sorted(df["image_id"]) == sorted([imgs[0].stem, imgs[2].stem])
    assert df.set_index("image_id").loc[imgs[2].stem, "label"] == "y"


def test_rerun_is_idempotent_incremental_adds_only_new_images_and_tta_matches_eager(score_study, ray_local, tmp_path):
    d = score_study
    man = pd.read_parquet(d / "archive" / "manifest.parquet")
    man.head(14).to_parquet(tmp_path / "night1.parquet", index=False)
    man.to_parquet(tmp_path / "night2.parquet", index=False)
    for p in (tmp_path / "night1.parquet", tmp_path / "night2.parquet"):  # URIs relative to the archive
        t = pd.read_parquet(p)
        t["uri"] = [str(d / "archive" / u) for u in t["uri"]]
        t.to_parquet(p, index=False)
    one = [f"score.checkpoints={d / 'out' / 'train' / 'r1' / 'fold=0'}", f"output={tmp_path}", "run_id=nightly"]
    s1 = score.run(cfg(d, *one, f"score.input={tmp_path / 'night1.parquet'}"))
    assert s1["scored"] == 14 and s1["model_id"].startswith("r1/fold=0@")
    again = score.run(cfg(d, *one, f"score.input={tmp_path / 'night1.parquet'}"))
    assert again["scored"] == 0 and again["already_done"] == 14 and again["files_written"] == 0
    s2 = score.run(cfg(d, *one, f"score.input={tmp_path / 'night2.parquet'}", "score.incremental=true"))
    assert s2["scored"] == 10 and s2["already_done"] == 14 and s2["run_scored_total"] == 24
    df = read_preds(tmp_path / "predictions" / "nightly" / "predictions")
    assert len(df) == 24 and df["image_id"].is_unique
    np.testing.assert_allclose(np.stack(df["probs"]), eager_probs(d, list(df["uri"]), folds=(0,)), atol=1e-5)
    # Without --incremental, another input replaces the run's output.
    s3 = score.run(cfg(d, *one, f"score.input={tmp_path / 'night1.parquet'}", "score.tta=flips"))
    assert s3["scored"] == 14 and s3["run_scored_total"] == 14
    df = read_preds(tmp_path / "predictions" / "nightly" / "predictions")
    np.testing.assert_allclose(np.stack(df["probs"]), eager_probs(d, list(df["uri"]), folds=(0,), flips=True),
                               atol=1e-5)


def test_compiled_models_score_what_eager_ones_score_and_auto_compiles_only_large_runs(score_study, ray_local,
                                                                                        tmp_path):
    """score.compile=on: torch.compile'd models, batches padded to one static shape (the archive's 24 images in
    batches of 10: a short last batch), give the eager probabilities; auto leaves a small run eager and says why."""
    d = score_study
    one = [f"score.checkpoints={d / 'out' / 'train' / 'r1' / 'fold=0'}", f"output={tmp_path}",
           f"score.input={d / 'archive' / 'manifest.parquet'}", "score.batch_size=10"]
    compiled = score.run(cfg(d, *one, "run_id=compiled", "score.compile=on"))
    assert compiled["scored"] == 24 and compiled["compile"] == "on (configured)"
    df = read_preds(tmp_path / "predictions" / "compiled" / "predictions")
    np.testing.assert_allclose(np.stack(df["probs"]), eager_probs(d, list(df["uri"]), folds=(0,)), atol=1e-5)
    auto = score.run(cfg(d, *one, "run_id=auto"))
    assert auto["compile"] == f"off (auto: 24 images per actor, under {COMPILE_MIN_IMAGES:,})"
    assert compile_decision(cfg(d, *one, "score.actors=2").score, 2 * COMPILE_MIN_IMAGES)[0]


def test_user_errors(score_study, tmp_path, capsys):
    d = score_study
    with pytest.raises(UserError, match="no checkpoint given"):
        score.run(load_config(None, [f"score.input={d / 'archive' / 'manifest.parquet'}"]))
    with pytest.raises(UserError, match="no fold=<k>/model_card.json below it"):
        artifacts.load_ensemble([str(tmp_path)])
    with pytest.raises(UserError, match="no model_card.json for checkpoint"):
        artifacts.load_ensemble([str(tmp_path / "model.pt")])
    with pytest.raises(UserError, match="score.tta"):
        score.run(cfg(d, f"score.input={d / 'archive' / 'manifest.parquet'}", "score.tta=rot45"))
    with pytest.raises(UserError, match="key 'score.amp' must be one of 'auto', 'bf16', 'fp16' or 'off'"):
        score.run(cfg(d, f"score.input={d / 'archive' / 'manifest.parquet'}", "score.amp=fp8"))
    assert main(["score", "--input", str(tmp_path / "nothing"), "--checkpoint", str(d / "out" / "train" / "r1"),
                 "--output", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_killed_scoring_actor_is_replaced_and_the_output_is_complete(score_study, ray_local, tmp_path, monkeypatch):
    """SIGKILL the Ray Data actor holding the model part-way: Ray restarts it, its batches are retried, and every
    image is scored exactly once."""
    import threading

    import psutil

    d = score_study
    monkeypatch.setenv(faults.ENV, json.dumps({"slow_batch_s": 0.5}))
    result, killed = {}, []

    def run():
        result["s"] = score.run(cfg(d, f"score.input={d / 'archive' / 'manifest.parquet'}", f"output={tmp_path}",
                                    "run_id=ak", "score.batch_size=4", "score.rows_per_file=4"))

    t = threading.Thread(target=run)
    t.start()
    parts = tmp_path / "predictions" / "ak" / "predictions"
    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        if parts.exists() and any(parts.glob("part-*.parquet")):
            for p in psutil.Process().children(recursive=True):  # this test's Ray only
                if any("MapWorker(MapBatches(Predictor))" in c for c in p.cmdline()):
                    p.kill()
                    killed.append(p.pid)
        time.sleep(0.05)
    t.join(300)
    assert killed, "no scoring actor was found to kill"
    s = result["s"]
    assert s["scored"] == 24 and s["quarantined"] == 0
    df = read_preds(tmp_path / "predictions" / "ak" / "predictions")
    assert len(df) == 24 and df["image_id"].is_unique


def test_bf16_autocast_stays_close_to_fp32(score_study):
    """The actor's own code on the study's fold models (their sharpness is a trained model's, which the bound
    needs): score.amp=bf16 (opt-in) moves no probability by more than 0.05. (Error rows passing through unscored:
    tests/unit/test_predictor.py.)"""
    ens = artifacts.load_ensemble([str(score_study / "out" / "train" / "r1")])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, ens.size, ens.size, 3), dtype=np.uint8)
    clean = {"image": images, "error": np.array([""] * 6, dtype=object), "image_id": np.arange(6).astype(str)}
    p = Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False, amp="off")(clean)["probs"]
    bf16 = Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False, amp="bf16")(clean)["probs"]
    assert np.abs(bf16 - p).max() < 0.05 and not np.array_equal(bf16, p)
