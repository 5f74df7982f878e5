"""The scoring actor's own code (dermray.stages.score.actors.Predictor) on a tiny two-fold ensemble, without Ray."""
import numpy as np
import pyarrow as pa
import pytest

from dermray.runtime import artifacts
from dermray.stages.score.actors import Predictor

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
    fp32 = Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False, amp="off")
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
    run = lambda ens: Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False, amp="off")(batch)["probs"]  # noqa: E731
    np.testing.assert_allclose(run(both), (run(members[0]) + run(members[1])) / 2, atol=1e-5)
    assert both.n_classes == 3 and both.model_id != members[0].model_id


@pytest.mark.parametrize("bf16_faster", [True, False])
def test_score_amp_auto_measures_on_a_native_bf16_cpu_and_scores(ensemble_dir, tmp_path, monkeypatch, bf16_faster):
    """score.amp=auto on a CPU with native bf16 and no cached decision measures the model in both precisions in the
    actor's constructor (regression: the measurement ran before the normalisation constants existed and every
    actor died with AttributeError 'mean'), records why, and scores as the configured precision would."""
    from dermray.runtime import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached decision
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    seconds = iter([1.0, 0.5] if bf16_faster else [0.5, 1.0])  # fp32's step, then bf16's
    monkeypatch.setattr(precision, "time_step", lambda step, repeats=3: (step(), next(seconds))[1])
    ens = artifacts.load_ensemble([str(ensemble_dir)])
    rng = np.random.default_rng(2)
    batch = {"image": rng.integers(0, 256, (3, ens.size, ens.size, 3), dtype=np.uint8),
             "error": np.array([""] * 3, dtype=object), "image_id": np.arange(3).astype(str)}
    auto = Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False, amp="auto")
    assert auto.amp == ("bf16" if bf16_faster else "fp32")
    assert auto.precision_why.startswith(f"{auto.amp}: ") and "measured" in auto.precision_why
    p = auto(batch)["probs"]
    same = Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False,
                           amp="bf16" if auto.amp == "bf16" else "off")(batch)["probs"]
    np.testing.assert_allclose(p, same, atol=1e-6)
