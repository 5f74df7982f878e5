"""Issue 28, finding 8: nothing checked the test set against the training set, and a test image that is a copy of a
training image inflates every test figure. Evaluate now looks for test images that are near-duplicates of the
partition's training images - the partition's own method and thresholds - reports how many, lists the pairs in
train_overlap.parquet and computes every metric again without them (subset no_train_overlap). Judged on the shared
study: its test predictions with two rows pointed at copies of training images (one byte for byte, one
re-encoded)."""
import pandas as pd
from PIL import Image

from dermray.runtime import registry
from dermray.runtime.config import load_config


def _evaluate(study, predictions, out):
    return registry.run("evaluate", load_config(str(study["config"]), [
        f"evaluate.predictions={predictions}", f"evaluate.partition={study['out'] / 'partition' / 'c'}",
        f"output={out}"]))


def test_test_images_that_copy_training_images_are_found_and_the_metrics_are_given_without_them(study, tmp_path):
    preds = pd.read_parquet(study["out"] / "predictions" / "c" / "predictions")
    control = study["runs"]["evaluate"][0]["summary"]  # the study's own evaluation of these predictions
    assert control["train_overlap"]["checked"], control["train_overlap"]
    already = set(pd.read_parquet(study["out"] / "metrics" / "c" / "train_overlap.parquet")["test_image"])
    assert len(already) == control["train_overlap"]["test_images"]

    manifest = pd.read_parquet(study["data"] / "manifest.parquet")
    train_a, train_b = [study["data"] / u for u in manifest["uri"].head(2)]
    (tmp_path / "exact.jpg").write_bytes(train_a.read_bytes())
    with Image.open(train_b) as im:
        im.convert("RGB").save(tmp_path / "reencoded.jpg", quality=85)
    victims = [i for i in preds.index if preds.at[i, "image_id"] not in already][:2]
    planted = preds.copy()
    planted.loc[victims[0], "uri"] = str(tmp_path / "exact.jpg")
    planted.loc[victims[1], "uri"] = str(tmp_path / "reencoded.jpg")
    planted.to_parquet(tmp_path / "planted.parquet", index=False)
    s = _evaluate(study, tmp_path / "planted.parquet", tmp_path / "out")

    copies = set(planted.loc[victims, "image_id"])
    assert s["train_overlap"]["checked"] and s["train_overlap"]["test_images"] == len(already) + 2, s["train_overlap"]
    pairs = pd.read_parquet(tmp_path / "out" / "metrics" / "c" / "train_overlap.parquet").set_index("test_image")
    assert copies <= set(pairs.index)
    assert pairs.loc[planted.at[victims[0], "image_id"], "train_image"] == manifest["image_id"].iloc[0]
    assert bool(pairs.loc[planted.at[victims[0], "image_id"], "exact"])
    assert pairs.loc[planted.at[victims[1], "image_id"], "train_image"] == manifest["image_id"].iloc[1]
    assert not bool(pairs.loc[planted.at[victims[1], "image_id"], "exact"])
    # Every metric with and without them: the subset no_train_overlap counts the others alone.
    m = pd.read_parquet(tmp_path / "out" / "metrics" / "c" / "metrics.parquet")
    n = m[m["metric"].isin(["n_positive", "n_negative"])].groupby(["task", "subset"])["value"].sum()
    without = n.xs("no_train_overlap", level="subset")
    everything = n.xs("all", level="subset")[without.index]
    assert (without <= everything).all() and (without < everything).any(), (without, everything)
    assert "near-duplicates of training images" in registry.module("evaluate").format_summary(s)
