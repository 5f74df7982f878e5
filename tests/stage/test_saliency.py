"""The saliency stage on real images with a small trained model, over Ray Data, writing to a real S3 (moto)."""
import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dermray.cli import main
from dermray.errors import UserError
from dermray.runtime.config import load_config
from dermray.stages import saliency, score
from dermray.stages.saliency.sanity import RISE_TOLERANCE
from dermray.store import storage

from helpers import train_small_fold


@pytest.fixture(scope="module")
def trained(score_study, ray_local, tmp_path_factory):
    """A mobilenet fine-tuned a little on the study's 40 images, and its predictions on the 24-image archive."""
    d = score_study
    t = tmp_path_factory.mktemp("saliency")
    labels = pd.read_parquet(d / "out" / "partition" / "r1" / "labels.parquet").merge(
        pd.read_parquet(d / "in" / "manifest.parquet")[["image_id", "uri"]], on="image_id")
    classes = pq.read_table(d / "out" / "partition" / "r1" / "training_classes.parquet")
    train_small_fold(t / "fold=0", classes, labels["uri"].tolist(), labels["class_index"].tolist(), steps=60)
    score.run(load_config(None, [
        f"score.input={d / 'archive' / 'manifest.parquet'}", f"score.checkpoints={t / 'fold=0'}", f"output={t}",
        "run_id=p", f"data.tasks={d / 'in' / 'tasks.yaml'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
        f"score.partition={d / 'out' / 'partition' / 'r1'}", "score.batch_size=8", "score.cpus_per_actor=0.5"]))
    return t


def cfg(d, t, *extra):
    return load_config(None, [
        f"saliency.checkpoints={t / 'fold=0'}", f"saliency.predictions={t / 'predictions' / 'p' / 'predictions'}",
        f"data.tasks={d / 'in' / 'tasks.yaml'}", f"data.taxonomy={d / 'in' / 'taxonomy.parquet'}",
        f"saliency.partition={d / 'out' / 'partition' / 'r1'}", "saliency.cpus_per_actor=0.5", "saliency.k=2",
        "saliency.smooth_samples=4", "saliency.ig_steps=8", *extra])


def test_maps_index_gallery_and_sanity_written_to_s3(score_study, ham_dir, trained, s3_bucket):
    d, t = score_study, trained
    s = saliency.run(cfg(d, t, f"output={s3_bucket}/out", "run_id=s1",
                         "saliency.methods=[gradient,smoothgrad,integrated_gradients,gradcam]",
                         "saliency.tasks=[melanoma_vs_nevus]",
                         f"saliency.masks={ham_dir}/masks/{{image_id}}_segmentation.png",
                         "saliency.audit_size=4", "saliency.sanity_levels=3"))
    rdir = f"{s3_bucket}/out/saliency/s1"
    index = storage.read_table(f"{rdir}/saliency_index.parquet").to_pandas()
    # top-2 and bottom-2 melanoma-vs-nevus scores, four methods each
    assert s["selected"] == 4 and len(index) == 16 == s["maps"]
    assert set(index["method"]) == {"gradient", "smoothgrad", "integrated_gradients", "gradcam"}
    assert (index["target"] == "melanoma").all() and set(index["reason"]) == {"top", "bottom"}
    top = index[index.reason == "top"]["score"].min()
    assert top >= index[index.reason == "bottom"]["score"].max()
    for r in index.itertuples():
        png = Image.open(io.BytesIO(storage.read_bytes(r.png_uri)))
        original = Image.open(ham_dir / "images" / f"{r.image_id}.jpg")
        factor = -(-256 // original.size[1])  # small images are enlarged to 256 px or more
        assert png.format == "PNG" and png.size == (2 * original.size[0] * factor + 4, original.size[1] * factor)
        m = np.load(io.BytesIO(storage.read_bytes(r.npy_uri)))
        assert m.dtype == np.float16 and m.shape == (original.size[1], original.size[0])
        assert 0.0 <= r.inside_lesion <= 1.0
    sanity = storage.read_table(f"{rdir}/sanity.parquet").to_pandas()
    assert set(sanity["method"]) == set(index["method"]) and sanity.groupby("method").size().eq(3).all()
    # The randomisation test lowers similarity for the gradient and Grad-CAM maps of a trained model.
    for method in ("gradient", "gradcam"):
        rows = sanity[sanity.method == method].sort_values("level")
        assert rows["spearman"].iloc[-1] < 0.5 and rows["ssim"].iloc[-1] < 0.5, rows
        if method == "gradient":
            assert not rows["flagged"].any()
        elif rows["flagged"].any():
            # Grad-CAM's ReLU blanks a map whose weighted activations are all negative, which a fully randomised
            # network may give for some images (it does on some CPUs, not others: the kernels round differently),
            # and its similarity may rise with randomisation: then the verdict is "inconclusive", never a pass,
            # and it says why.
            rose = rows["spearman"].iloc[-1] > rows["spearman"].iloc[0] + RISE_TOLERANCE
            assert rows["constant_maps"].iloc[-1] > 0 or rose, rows
            assert s["flagged"][method].startswith("inconclusive"), s
            assert s["sanity_conclusive"] is False
        assert rows["constant_maps"].between(0, rows["n_images"]).all()
    # Plain gradients have no ReLU at the end (Grad-CAM's zeroes a map whose weighted activations are all
    # negative): with the head randomised their maps still vary over the image (they were blank while the
    # log-probability was clamped), and they resemble the originals less as more of the network is randomised.
    gradient = sanity[sanity.method == "gradient"].sort_values("level")
    assert gradient["constant_maps"].iloc[0] == 0, gradient
    assert gradient["spearman"].is_monotonic_decreasing and gradient["spearman"].iloc[-1] < gradient["spearman"].iloc[0]
    gallery = storage.read_text(f"{rdir}/gallery.html")
    assert "<h3>melanoma (" in gallery and "<h3>nevus (" in gallery and "Sanity checks" in gallery
    assert "linear-gradient(to right, #000004" in gallery  # the colour scale: inferno, from black
    assert "gradient/" in gallery and s3_bucket not in gallery  # relative links


def test_misclassified_and_listed_selection_and_errors(score_study, trained, tmp_path, capsys):
    d, t = score_study, trained
    preds = pd.read_parquet(t / "predictions" / "p" / "predictions")
    s = saliency.run(cfg(d, t, f"output={tmp_path}", "run_id=mis", "saliency.select=misclassified",
                         "saliency.sanity=false"))
    index = pd.read_parquet(tmp_path / "saliency" / "mis" / "saliency_index.parquet")
    assert (index["reason"] == "misclassified").all() and s["sanity"] == []
    for r in index.itertuples():
        predicted_pos = r.score >= 0.5
        positive = {"melanoma_vs_nevus": "melanoma", "carcinoma_vs_benign_keratosis": "carcinoma"}[r.task]
        assert predicted_pos != (r.true_class == positive)
    ids = preds["image_id"].head(2).tolist()
    assert main(["saliency", "--checkpoint", str(t / "fold=0"), "--predictions", str(t / "predictions" / "p" /
                 "predictions"), "--method", "gradcam", "--tasks", str(d / "in" / "tasks.yaml"), "--taxonomy",
                 str(d / "in" / "taxonomy.parquet"), "--output", str(tmp_path), "--run-id", "ids", "--set",
                 f"saliency.partition={d / 'out' / 'partition' / 'r1'}", "--set", "saliency.select=ids", "--set",
                 f"saliency.image_ids=[{','.join(ids)}]", "--set", "saliency.sanity=false", "--set",
                 "saliency.target=predicted", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    index = pd.read_parquet(tmp_path / "saliency" / "ids" / "saliency_index.parquet")
    assert set(index["image_id"]) == set(ids) and out["maps"] == len(index)
    with pytest.raises(UserError, match="key 'saliency.methods' must be one of"):
        saliency.run(cfg(d, t, "saliency.methods=[occlusion]"))
    with pytest.raises(UserError, match="explains one model"):
        saliency.run(cfg(d, t, f"saliency.checkpoints={d / 'out' / 'train' / 'r1'}"))
    with pytest.raises(UserError, match="not in the predictions"):
        saliency.run(cfg(d, t, f"output={tmp_path}", "saliency.select=ids", "saliency.image_ids=[nope]"))
