"""The scoring actor's own code (score.Predictor) on a tiny two-fold ensemble, without Ray."""
import numpy as np
import pyarrow as pa
import pytest

from dermray import artifacts, score

from helpers import write_fold

CLASSES = pa.table({"class_index": pa.array([0, 1, 2], pa.int32()), "node_id": ["a", "b", "c"],
                    "name": ["alpha", "beta", "gamma"], "n_images": pa.array([5, 5, 5], pa.int64()),
                    "scope": ["subtree"] * 3})


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("models") / "r1"
    for k in (0, 1):
        write_fold(run / f"fold={k}", CLASSES, seed=k)
    return run


def test_rows_with_an_error_pass_through_unscored_and_the_rest_score_as_in_a_clean_batch(ensemble_dir):
    ens = artifacts.load_ensemble([str(ensemble_dir)])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, ens.size, ens.size, 3), dtype=np.uint8)
    clean = {"image": images, "error": np.array([""] * 6, dtype=object), "image_id": np.arange(6).astype(str)}
    fp32 = score.Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False, amp="off")
    p = fp32(clean)["probs"]
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    broken = clean | {"error": np.array(["", "truncated", "", "", "", ""], dtype=object)}
    q = fp32(broken)["probs"]
    assert (q[1] == 0).all()
    np.testing.assert_allclose(np.delete(q, 1, 0), np.delete(p, 1, 0), atol=1e-6)


def test_the_ensemble_averages_its_members_probabilities(ensemble_dir):
    """Two folds, each loaded alone and together: the ensemble's probabilities are the mean of its members'."""
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), "error": np.array([""] * 4, dtype=object),
             "image_id": np.arange(4).astype(str)}
    both = artifacts.load_ensemble([str(ensemble_dir)])
    members = [artifacts.load_ensemble([str(ensemble_dir / f"fold={k}")]) for k in (0, 1)]
    run = lambda ens: score.Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False, amp="off")(batch)["probs"]  # noqa: E731
    np.testing.assert_allclose(run(both), (run(members[0]) + run(members[1])) / 2, atol=1e-5)
    assert both.n_classes == 3 and both.model_id != members[0].model_id
