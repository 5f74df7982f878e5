"""Direct tests of the pure modules that were reached only through whole stage runs: ids, neardup, decisions,
predictions, precision. Known answers come from plain-Python reference implementations written here."""
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dermray.core import decisions, ids, neardup
from dermray.errors import UserError
from dermray.runtime import precision
from dermray.store import predictions

# ---- ids: 128-bit fingerprints, repeats, membership ------------------------------------------------------------
ID_LISTS = st.lists(st.sampled_from([f"ISIC_{i:07d}" for i in range(12)] + ["", "ü", "a b"]), max_size=60)


def test_fingerprints_are_stable_and_tell_ids_apart():
    a = ids.fingerprints(["a", "b", "a"])
    assert a.dtype == ids.FINGERPRINT and a[0] == a[2] and a[0] != a[1]
    assert (ids.fingerprints(["a", "b", "a"]) == a).all()  # the same in every call (and process: seeded hashes)
    many = ids.fingerprints([f"img-{i}" for i in range(20_000)])
    assert len(np.unique(many)) == 20_000


@settings(max_examples=100, deadline=None)
@given(ID_LISTS)
def test_repeated_names_every_later_copy_and_its_first_row(values):
    rows = np.arange(len(values), dtype=np.int64)
    dup, first = ids.repeated(ids.fingerprints(values), rows)
    seen, expected = {}, []
    for r, v in enumerate(values):
        if v in seen:
            expected.append((r, seen[v]))
        else:
            seen[v] = r
    assert list(zip(dup.tolist(), first.tolist())) == expected


@settings(max_examples=100, deadline=None)
@given(ID_LISTS, ID_LISTS, ID_LISTS)
def test_isin_against_the_union_of_parts_is_python_set_membership(values, part_a, part_b):
    members = ids.sorted_set([ids.fingerprints(part_a), ids.fingerprints(part_b)])
    got = ids.isin(ids.fingerprints(values), members)
    assert got.tolist() == [v in set(part_a) | set(part_b) for v in values]
    assert len(members) == len(set(part_a) | set(part_b))


def test_every_copy_of_an_id_lands_in_one_partition():
    fp = ids.fingerprints([f"x{i % 50}" for i in range(500)])
    parts = ids.partition_of(fp, 7)
    assert parts.min() >= 0 and parts.max() < 7
    by_id = pd.DataFrame({"id": [i % 50 for i in range(500)], "part": parts}).groupby("id")["part"].nunique()
    assert (by_id == 1).all()


# ---- neardup: hashes, candidates, verification, merging ----------------------------------------------------------
def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _lesion(seed: int, size=(120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    cx, cy = rng.uniform(0.3, 0.7) * size[0], rng.uniform(0.3, 0.7) * size[1]
    blob = np.exp(-(((x - cx) / rng.uniform(10, 30)) ** 2 + ((y - cy) / rng.uniform(10, 30)) ** 2))
    texture = rng.normal(0, 25, (size[1], size[0]))
    base = np.stack([200 - 120 * blob, 160 - 110 * blob, 140 - 90 * blob], axis=2) + texture[..., None]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def test_popcount_is_the_number_of_set_bits():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**63, 200, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 200).astype(np.uint64)
    assert neardup.popcount(x).tolist() == [bin(int(v)).count("1") for v in x]


def test_a_copy_re_encoded_and_resized_is_a_candidate_and_verifies_and_another_lesion_does_not():
    original = _lesion(1)
    copy = original.resize((108, 81)).crop((2, 2, 106, 79))
    other = _lesion(2)
    data = [_jpeg(original), _jpeg(copy, quality=70), _jpeg(other)]
    hashes = np.stack([neardup.describe(d)[1] for d in data])
    pairs, skipped = neardup.candidates(hashes, max_hamming=12)
    found = {(int(a), int(b)) for a, b, _ in pairs}
    assert (0, 1) in found and skipped == 0
    assert neardup.similarity(data[0], data[1]) > 0.9 > neardup.similarity(data[0], data[2])
    assert neardup.describe(data[0])[0] == neardup.describe(bytes(data[0]))[0]  # sha256 of the bytes


def _smooth_lesion(seed: int, size=(200, 150)) -> Image.Image:
    """A lesion on skin with smooth texture, HAM10000's image size."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    cx, cy = rng.uniform(0.3, 0.7) * size[0], rng.uniform(0.3, 0.7) * size[1]
    blob = np.exp(-(((x - cx) / rng.uniform(20, 50)) ** 2 + ((y - cy) / rng.uniform(20, 50)) ** 2))
    texture = gaussian_filter(rng.normal(0, 60, (size[1], size[0])), 3)
    base = np.stack([200 - 120 * blob, 160 - 110 * blob, 140 - 90 * blob], axis=2) + texture[..., None]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("seed", range(4))
def test_an_off_centre_crop_and_combined_edits_verify_at_the_configured_similarity(seed):
    """Issue 28, finding 7: copies cropped off-centre (here 5 % off the left and the top only) scored 0.95-0.98 on
    the coarse views (centred crops, 4 % shifts) and were not merged at partition.near_duplicate_similarity
    (0.98); the fine alignment crops each side on its own. A crop of 2-3 pixels per side, resized to 85 % and
    re-encoded at quality 65 verifies too; another lesion does not."""
    from dermray.runtime.config import PartitionConfig

    threshold = PartitionConfig().near_duplicate_similarity
    original = _smooth_lesion(seed)
    w, h = original.size
    off_centre = _jpeg(original.crop((10, 7, w, h)))
    cropped = original.crop((3, 2, w - 2, h - 3))
    combined = _jpeg(cropped.resize((int(cropped.width * 0.85), int(cropped.height * 0.85))), quality=65)
    data = _jpeg(original)
    assert neardup.similarity(data, off_centre) >= threshold
    assert neardup.similarity(off_centre, data) >= threshold  # either image may be the original
    assert neardup.similarity(data, combined) >= threshold
    assert neardup.similarity(data, _jpeg(_smooth_lesion(seed + 100))) < 0.9


def _exhaustive_fine(g: np.ndarray, whole: np.ndarray) -> float:
    """The fine alignment's reference: every window of ``g`` cropped by 0-7 % on each side in 1 % steps (8^4 =
    4,096 windows), each resized to 32x32 by pixel areas as PIL's box filter does, correlated with ``whole``."""
    sides = np.arange(8) / 100
    best = -1.0
    h, w = g.shape
    for left in sides:
        for right in sides:
            for top in sides:
                for bottom in sides:
                    box = (left * w, top * h, (1 - right) * w, (1 - bottom) * h)
                    v = np.asarray(Image.fromarray(g).resize((32, 32), Image.Resampling.BOX, box=box), np.float32)
                    v = (v - v.mean()).ravel() / (v.std() + 1e-6)
                    best = max(best, float(v @ whole) / 1024)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_the_staged_fine_alignment_finds_what_an_exhaustive_search_finds(seed):
    """Issue 29: the fine alignment searches its grid of crops at 16x16 (each image's windows made once) and
    refines at 32x32 only near the grid's best, within GRID_GATE. Against a search of all 4,096 windows at 32x32:
    for a copy cropped off-centre it comes within 0.005 of the exhaustive best and above the configured
    similarity; for another lesion it stays below it, as the exhaustive search does."""
    from dermray.runtime.config import PartitionConfig

    threshold = PartitionConfig().near_duplicate_similarity
    rng = np.random.default_rng(seed)
    original = _smooth_lesion(seed)
    w, h = original.size
    crop = [int(c) for c in rng.integers(0, 10, 4)]
    copy = neardup._Prepared(original.crop((crop[0], crop[1], w - crop[2], h - crop[3])).convert("L"))
    other = neardup._Prepared(_smooth_lesion(seed + 50).convert("L"))
    whole = neardup._Prepared(original.convert("L"))
    for candidate, is_copy in ((copy, True), (other, False)):
        staged = neardup._fine(whole, candidate)
        exhaustive = _exhaustive_fine(whole.small, candidate.views[0])
        if is_copy:
            assert staged >= threshold and staged >= exhaustive - 0.005, (staged, exhaustive)
        else:
            assert (staged >= threshold) == (exhaustive >= threshold), (staged, exhaustive)


def test_copies_cropped_off_centre_are_candidates(ham_dir):
    """Issue 28, finding 7: with hashes of the whole image and its central 92 % and 85 % alone, 4 % of HAM10000
    copies cropped by 0-5 % per side (each side on its own) were no LSH candidates (their hashes 10-22 bits apart),
    so their pixels were never compared. With the four corner views every one of 150 is a candidate, and verifies."""
    import pandas as pd

    from dermray.runtime.config import PartitionConfig

    cfg = PartitionConfig()
    labels = pd.read_csv(ham_dir / "labels.csv")
    rng = np.random.default_rng(0)
    missed = []
    for image_id in labels["image_id"].to_numpy()[rng.choice(len(labels), 150, replace=False)]:
        data = (ham_dir / "images" / f"{image_id}.jpg").read_bytes()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        f = (rng.uniform(0, 0.05, 4) * [w, h, w, h]).astype(int)
        copy = _jpeg(img.crop((f[0], f[1], w - f[2], h - f[3])))
        pairs, _ = neardup.candidates(np.stack([neardup.describe(data)[1], neardup.describe(copy)[1]]),
                                      cfg.near_duplicate_hamming)
        if not len(pairs) or neardup.similarity(data, copy) < cfg.near_duplicate_similarity:
            missed.append((image_id, tuple(f)))
    assert not missed, missed


def test_cross_candidates_pair_the_two_sets_and_never_two_images_of_one_set():
    """Train-test overlap (evaluate): a test image re-encoded from a training image is a candidate, indexed into
    each set; two copies inside the training set are not reported (the partition handles those)."""
    a, b, c = _lesion(1), _lesion(2), _lesion(3)
    train = [_jpeg(a), _jpeg(b), _jpeg(b, quality=70)]
    test = [_jpeg(c), _jpeg(a.resize((110, 82)), quality=75)]
    hashes = [np.stack([neardup.describe(d)[1] for d in side]) for side in (train, test)]
    pairs = neardup.cross_candidates(hashes[0], hashes[1], max_hamming=12)
    assert {(int(i), int(j)) for i, j, _ in pairs} == {(0, 1)}
    assert neardup.cross_candidates(hashes[0], hashes[1][:0], max_hamming=12).shape == (0, 3)


def test_candidates_are_the_brute_force_pairs_within_the_distance():
    """Every pair the LSH banding reports is within max_hamming (of its closest view to the other's whole image),
    and none is reported twice; near pairs planted with 1-3 flipped bits are all found."""
    rng = np.random.default_rng(3)
    whole = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = np.array([np.uint64(sum(1 << int(b) for b in rng.choice(64, k, replace=False))) for k in (1, 2, 3)])
    planted = whole[:3] ^ flips
    hashes = np.stack([np.r_[whole, planted]] * 3, axis=1)
    pairs, _ = neardup.candidates(hashes, max_hamming=6)
    assert len({(a, b) for a, b, _ in pairs}) == len(pairs)
    for a, b, d in pairs:
        brute = min(neardup.popcount(np.array([hashes[a, v] ^ hashes[b, 0], hashes[b, v] ^ hashes[a, 0]])).min()
                    for v in range(3))
        assert a < b and d <= 6 and brute <= d
    assert {(k, 40 + k) for k in range(3)} <= {(int(a), int(b)) for a, b, _ in pairs}


def test_merge_groups_joins_components_refuses_chains_and_ignores_pair_order():
    groups = np.array(["g1", "g2", "g3", "g4", "g1"], dtype=object)
    merged, ok = neardup.merge_groups(groups, [(0, 1), (1, 2)], max_groups=3)
    assert merged.tolist() == ["g1", "g1", "g1", "g4", "g1"] and ok == [True, True]
    capped, ok = neardup.merge_groups(groups, [(0, 1), (1, 2), (2, 3)], max_groups=3)
    assert ok == [True, True, False] and capped[3] == "g4"
    again, _ = neardup.merge_groups(groups, [(1, 2), (0, 1)], max_groups=3)
    assert again.tolist() == merged.tolist()


# ---- decisions: what the model ships with, locked out of fold ----------------------------------------------------
def _oof(n=400, seed=0):
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3)) + 2.5 * np.eye(3)[classes]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    membership = np.array([[1, 0], [0, 1], [0, 1]], float)  # task class 0 = training class 0; 1 = classes 1, 2
    truth = np.where(classes == 0, 0, 1)[:, None]
    return probs, classes, truth, [("t", 0, 0, membership)]


def test_lock_fits_a_temperature_and_meets_the_target_sensitivity_on_the_data_that_chose_it():
    probs, classes, truth, tasks = _oof()
    calibration, points = decisions.lock(probs, classes, truth, tasks, target_sensitivity=0.9)
    assert calibration["temperature"] > 0 and calibration["nll_after"] <= calibration["nll_before"] + 1e-12
    sens = next(p for p in points if p["name"] == "sens0.9")
    calibrated = decisions.M.apply_temperature(probs, calibration["temperature"])
    score = (calibrated @ tasks[0][3])[:, 0] / (calibrated @ tasks[0][3]).sum(1)
    positive = truth[:, 0] == 0
    assert (score[positive] >= sens["threshold"]).mean() >= 0.9
    assert sens["task"] == "t" and any(p["name"] == "youden" for p in points)


def test_a_task_without_positives_out_of_fold_gets_no_locked_point():
    probs, classes, truth, tasks = _oof()
    _, points = decisions.lock(probs, classes, np.ones_like(truth), tasks, target_sensitivity=0.9)
    assert points == []


def test_a_task_with_a_class_no_training_class_lies_under_gets_no_locked_point_and_no_score():
    """Issue 28, finding 6: with no training class under the positive class, the score is 0 by construction, and a
    threshold of 0.0 (sensitivity 1, specificity 0) was locked. The score is NaN and no point is locked."""
    from dermray.core import inference

    probs, classes, truth, tasks = _oof()
    empty = tasks[0][3].copy()
    empty[:, 0] = 0  # nothing under task class 0 (the positive class)
    _, points = decisions.lock(probs, classes, truth, [("t", 0, 0, empty)], target_sensitivity=0.9)
    assert points == []
    assert np.isnan(inference.binary_task_score(probs, empty, 0)).all()
    assert np.allclose(inference.binary_task_score(probs, tasks[0][3], 0),
                       inference.binary_score(probs @ tasks[0][3], 0))


def test_readers_specificity_is_the_mean_over_readers_of_their_specificity():
    truth = {"t": pd.Series({"a": 0, "b": 0, "c": 1})}
    readers = pd.DataFrame({"reader_id": ["r1"] * 3 + ["r2"] * 3, "image_id": ["a", "b", "c"] * 2, "task": "t",
                            "decision": [0, 1, 1, 0, 0, 1]})
    assert decisions.readers_specificity(readers, truth) == {"t": {"readers_specificity": (0.5 + 1.0) / 2}}


# ---- predictions: what the stages after scoring read -------------------------------------------------------------
def _predictions(path, model_ids, image_ids=None):
    n = len(model_ids)
    image_ids = image_ids or [f"i{k}" for k in range(n)]
    table = pa.table({"image_id": image_ids, "model_id": model_ids,
                      "probs": pa.array([[0.2, 0.8]] * n, pa.list_(pa.float32())), "label": ["x"] * n})
    pq.write_table(table, path)
    return str(path)


def test_load_predictions_gives_one_model_s_rows_and_the_probabilities_as_a_matrix(tmp_path):
    uri = _predictions(tmp_path / "p.parquet", ["m1", "m1", "m2"])
    with pytest.raises(UserError, match="predictions of 2 models"):
        predictions.load_predictions(uri, None)
    df = predictions.load_predictions(uri, "m1")
    assert df["image_id"].tolist() == ["i0", "i1"] and df.attrs["probs"].shape == (2, 2)
    assert df.attrs["probs_raw"] is None and df.attrs["fingerprint"]
    with pytest.raises(UserError, match="no predictions of model_id 'm3'"):
        predictions.load_predictions(uri, "m3")
    dup = _predictions(tmp_path / "d.parquet", ["m1", "m1"], ["i0", "i0"])
    with pytest.raises(UserError, match="'i0' is predicted more than once"):
        predictions.load_predictions(dup, None)


# ---- precision: amp=auto decided by hardware, measured once per machine -------------------------------------------
class _Device:
    def __init__(self, kind):
        self.type = kind


def test_precision_choice_configured_gpu_no_bf16_and_measured_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return 1.0, 0.5  # bf16 twice as fast

    assert precision.choose("off", _Device("cpu"), "k", measure) == ("off", "off (configured)")
    assert precision.choose("auto", _Device("cuda"), "k", measure)[0] == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.choose("auto", _Device("cpu"), "k", measure)[0] == "off" and calls == []
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.choose("auto", _Device("cpu"), "k", measure)[0] == "bf16"
    assert precision.choose("auto", _Device("cpu"), "k", measure)[0] == "bf16" and calls == [1]  # cached
    cache = json.loads((tmp_path / "dermray" / "precision.json").read_text())
    assert list(cache.values()) == [{"fp32_s": 1.0, "bf16_s": 0.5}]
    assert precision.choose("auto", _Device("cpu"), "slow", lambda: (1.0, 1.05))[0] == "off"  # under MARGIN


# ---- report: the numbers as people read them ----------------------------------------------------------------------
def test_report_formats_numbers_for_people_and_pairs_each_cohort_with_its_reference():
    from dermray.core import formatting, report

    assert formatting.fmt(0.12345) == "0.123" and formatting.fmt(None) == "—" and formatting.fmt(float("nan")) == "—"
    auc = lambda subset, v: {"task": "t", "subset": subset, "metric": "auc", "value": v, "ci_low": v - 0.1,  # noqa: E731
                             "ci_high": v + 0.1, "n": 50}
    rows = formatting.external_rows([auc("cohort=clinic:all", 0.7), auc("cohort=internal:all", 0.8),
                                 {"task": "t", "subset": "cohort=clinic:all", "metric": "auc_difference",
                                  "value": -0.1, "ci_low": -0.2, "ci_high": 0.0,
                                  "note": "clinic minus internal (unpaired)"}])
    assert rows == [["t", "all", "clinic", "0.700 [0.600, 0.800], n=50", "internal", "0.800 [0.700, 0.900], n=50",
                     "-0.100 [-0.200, 0.000]"]]
    sentence = report.set_sentence({"images": 1200, "lesions": 800, "biopsy_images": 300, "model_ids": ["m@1"]})
    assert "model m@1 on 1,200 images of 800 lesions, 300 of them biopsy-proven" in sentence


# ---- ids.lesion_keys: the one rule for images without a lesion id ----
def test_a_null_empty_or_blank_group_id_is_the_image_alone_and_a_real_one_is_kept():
    from dermray.core.ids import lesion_keys

    keys = lesion_keys(["a", "b", "c", "d", "e"], [None, "", "  ", "L1", "L1"]).to_pylist()
    assert keys == ["image:a", "image:b", "image:c", "L1", "L1"]
    assert lesion_keys(["a", "b"], None).to_pylist() == ["image:a", "image:b"]  # no group column: every image alone
    assert lesion_keys(["a", "b"], ["", "x"], alone_prefix="").to_pylist() == ["a", "x"]
    # pandas input (evaluate): NaN is null; the prefix keeps an image's key from meeting a real group named "a"
    keys = lesion_keys(pd.Series(["a", "b"]), pd.Series([np.nan, "a"])).to_pylist()
    assert keys == ["image:a", "a"] and len(set(keys)) == 2
    assert lesion_keys(pd.Series(["a", "b"]), pd.Series([7, np.nan])).to_pylist() == ["7", "image:b"]  # numeric ids


def test_quarantine_reasons_count_by_kind_without_their_particulars():
    from dermray.stages.score.summary import reason_kind

    assert reason_kind("duplicate image_id (first seen at row 5)") == "duplicate image_id"
    assert reason_kind("cannot read s3://b/x.jpg: no such file or object") == "cannot read …: no such file or object"
    assert reason_kind("cannot read /a/y.jpg: no such file or object") == reason_kind("cannot read /b/z.png: no such "
                                                                                     "file or object")
    assert reason_kind("image too large: 360000 pixels > 250000") == "image too large: N pixels > N"
    assert reason_kind(None) == "unknown"


def test_doctor_checks_weights_only_for_a_run_config():
    """Issue 29: without a run config, `dermray doctor` checked (and warned about) the defaults' Inception v3
    weights, which the user's runs may never load."""
    from dermray.apps import doctor
    from dermray.runtime.config import load_config

    status, detail = doctor.weights_check(load_config(None), configured=False)
    assert status == "skip" and "--config" in detail
    assert doctor.weights_check(load_config(None, ["train.weights=none"]))[0] == "ok"


def test_doctor_says_skip_not_ok_when_it_checked_no_s3():
    """Issue 29: `dermray doctor` printed "s3 ok" when nothing was checked."""
    from dermray.apps import doctor

    status, detail = doctor.s3_check(None)
    assert status == "skip" and detail.startswith("not checked")
    line = doctor.format_checks([{"check": "s3", "status": status, "detail": detail}])
    assert line.startswith("doctor: s3       skip")


def test_out_of_fold_task_aucs_match_scikit_learn():
    """The ensemble card's cross-validation AUC (issue 29: cross-validation without AUC): per binary task, on the
    images inside it, the binary score scoring writes; known answer from scikit-learn."""
    from sklearn.metrics import roc_auc_score

    from dermray.core import decisions
    from dermray.core.inference import binary_task_score

    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=60)
    matrix = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=np.float64)  # class 3 lies outside the task
    truth = rng.integers(-1, 2, size=(60, 1))
    rows = decisions.task_aucs(probs, truth, [("t", 0, 0, matrix)], groups=np.arange(60) // 2, n_boot=200)
    inside = truth[:, 0] >= 0
    expected = roc_auc_score(truth[inside, 0] == 0, binary_task_score(probs, matrix, 0)[inside])
    assert len(rows) == 1 and abs(rows[0]["auc"] - expected) < 1e-12 and rows[0]["n"] == inside.sum()
    assert rows[0]["ci_low"] <= rows[0]["auc"] <= rows[0]["ci_high"]
    assert decisions.task_aucs(probs, np.zeros((60, 1), int), [("t", 0, 0, matrix)]) == []  # no negatives


def test_similarities_read_each_image_once_and_say_how_far_they_are():
    """evaluate's copy search reports progress through ``compared`` (every 256 pairs) in one call, so that an
    image in many pairs is read and prepared once, not once per chunk of pairs."""
    images = {f"u{i}": _jpeg(_smooth_lesion(i)) for i in range(3)}
    reads, said = [], []

    def read(uri):
        reads.append(uri)
        return images[uri]

    a = ["u0"] * 300 + ["u1"] * 300
    b = ["u1", "u2"] * 300
    sims = neardup.similarities(a, b, read, compared=said.append)
    assert len(sims) == 600 and said == [256, 512]
    assert sorted(reads) == ["u0", "u1", "u2"]
