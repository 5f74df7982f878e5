"""The synthetic demo data: deterministic for a seed, shaped like the paper's data, learnable but not trivially."""
import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.cli import main
from dermray.core.partitioning import partition_classes  # noqa: F401 - the algorithm the taxonomy must exercise
from dermray.store.definitions import load_tasks, load_taxonomy


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != "synth.json":
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--output", str(d / "a"), "--lesions", "400", "--test-lesions", "150", "--seed", "3"]) == 0
    return d


def test_deterministic_for_a_seed(demo):
    d = demo
    assert main(["synth", "--output", str(d / "b"), "--lesions", "400", "--test-lesions", "150", "--seed", "3"]) == 0
    assert _digest(d / "a") == _digest(d / "b")
    assert main(["synth", "--output", str(d / "c"), "--lesions", "400", "--test-lesions", "150", "--seed", "4"]) == 0
    assert _digest(d / "a") != _digest(d / "c")


def test_shaped_like_the_papers_data(demo):
    d = demo / "a"
    tax = load_taxonomy(str(d / "taxonomy.parquet"))
    t = pd.read_parquet(d / "taxonomy.parquet")
    assert set(t.loc[t.parent_id == "root", "node_id"]) == {"benign", "malignant", "non-neoplastic"}
    assert t.parent_id.isin(["benign", "malignant", "non-neoplastic"]).sum() == 9
    leaves = [n for n in t.node_id if tax.is_leaf(tax.index[n])]
    assert 30 <= len(leaves) <= 40
    m = pd.read_parquet(d / "manifest.parquet")
    counts = m.label.value_counts()
    assert counts.max() >= 10 * counts.min()  # very uneven
    assert m.groupby("group_id").size().max() >= 2 and set(m.modality) == {"clinical", "dermoscopy"}
    assert set(m.label_source) == {"biopsy", "clinical"}
    assert (m.loc[m.label.str.startswith("malignant"), "label_source"] == "biopsy").all()
    test = pd.read_parquet(d / "test_manifest.parquet")
    assert not set(test.group_id) & set(m.group_id)  # held-out lesions
    readers = pd.read_parquet(d / "readers.parquet")
    assert readers.reader_id.nunique() == 24 and set(readers.decision) <= {0, 1}
    assert set(readers.image_id) <= set(test.image_id)
    names = [task.name for task in load_tasks(str(d / "tasks.yaml"), tax)]
    assert names == ["melanoma_vs_nevus", "carcinoma_vs_benign_keratosis", "three_class", "nine_class"]
    img = Image.open(d / m.uri.iloc[0])
    assert img.size == (96, 96) and img.mode == "RGB"


def test_learnable_but_not_trivially(demo):
    """A small model (logistic regression on 8x8 thumbnails) separates melanoma from nevus well above chance and
    well below perfect."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    d = demo / "a"

    def xy(df):
        df = df[df.profile.isin(["melanoma", "nevus"])]
        x = np.stack([np.asarray(Image.open(d / u).resize((8, 8))).ravel() / 255.0 for u in df.uri])
        return x, (df.profile == "melanoma").to_numpy()

    x, y = xy(pd.read_parquet(d / "manifest.parquet"))
    xt, yt = xy(pd.read_parquet(d / "test_manifest.parquet"))
    auc = roc_auc_score(yt, LogisticRegression(max_iter=3000).fit(x, y).predict_proba(xt)[:, 1])
    assert 0.65 < auc < 0.97, auc


def test_synth_cli_refuses_tiny_sizes(tmp_path, capsys):
    assert main(["synth", "--output", str(tmp_path), "--lesions", "2"]) == 2
    assert "at least 10" in capsys.readouterr().err
