"""Metrics against independent implementations: scikit-learn, the ISIC challenge scorer, brute force."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from dermray.core import metrics as M


def data(seed, n=500, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.normal(y * 0.8, 1.0)
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_roc_agree_with_sklearn(seed, ties):
    y, s = data(seed, ties=ties)
    w = np.random.default_rng(seed).uniform(0.5, 2, len(y))
    assert abs(M.roc_auc(y, s) - skm.roc_auc_score(y, s)) < 1e-9
    assert abs(M.roc_auc(y, s, w) - skm.roc_auc_score(y, s, sample_weight=w)) < 1e-9
    for drop in (False, True):
        for weight in (None, w):
            ours = M.roc_curve(y, s, weight, drop_intermediate=drop)
            theirs = skm.roc_curve(y, s, sample_weight=weight, drop_intermediate=drop)
            for a, b in zip(ours, theirs):
                np.testing.assert_allclose(a, b, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=60))
def test_auc_property_against_sklearn_with_heavy_ties(pairs):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs], float)
    if y.min() == y.max():
        assert np.isnan(M.roc_auc(y, s))
    else:
        assert abs(M.roc_auc(y, s) - skm.roc_auc_score(y, s)) < 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_rates_agree_with_sklearn_confusion_matrix(seed):
    y, s = data(seed, ties=True)
    for thr in (-0.5, 0.0, 0.5, M.youden_threshold(y, s), M.threshold_for_sensitivity(y, s, 0.95)):
        r = M.rates_at(y, s, thr)
        tn, fp, fn, tp = skm.confusion_matrix(y, (s >= thr).astype(int), labels=[0, 1]).ravel()
        assert (r.tp, r.fp, r.tn, r.fn) == (tp, fp, tn, fn)
        assert abs(r.sensitivity - tp / (tp + fn)) < 1e-12 and abs(r.specificity - tn / (tn + fp)) < 1e-12
        assert abs(r.sensitivity - skm.recall_score(y, s >= thr)) < 1e-12
    assert M.rates_at(y, s, M.threshold_for_sensitivity(y, s, 0.95)).sensitivity >= 0.95


def test_youden_is_the_best_operating_point():
    y, s = data(7)
    fpr, tpr, thr = skm.roc_curve(y, s)
    r = M.rates_at(y, s, M.youden_threshold(y, s))
    assert abs((r.sensitivity + r.specificity - 1) - (tpr - fpr).max()) < 1e-12


def test_undefined_rates_are_nan_not_errors():
    r = M.rates_at([1, 1, 1], [0.1, 0.9, 0.5], 0.5)
    assert np.isnan(r.specificity) and r.sensitivity == 2 / 3
    assert np.isnan(M.roc_auc([0, 0], [0.1, 0.2]))
    assert np.isnan(M.bootstrap_auc([1, 1], [0.1, 0.2], n_boot=10).ci_low)
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc([0, 1], [0.1, np.nan])


def isic_scorer_frames(y_true, probs):
    k = probs.shape[1]
    cats = pd.Index([f"c{i}" for i in range(k)])
    truth = pd.DataFrame(np.eye(k)[y_true], columns=cats)
    pred = pd.DataFrame(probs, columns=cats)
    return truth, pred


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_follows_the_isic_challenge_definitions(seed):
    from isic_challenge_scoring import metrics as isic
    from isic_challenge_scoring.classification import ClassificationScore

    rng = np.random.default_rng(seed)
    n, k = 300, 4
    y_true = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n)
    probs[y_true == 0, 0] += 0.3
    probs = probs / probs.sum(axis=1, keepdims=True)
    probs[:10] = 0.25  # argmax ties: undecided, counted wrong
    probs[10:20, :2] = 0.5
    probs[10:20, 2:] = 0.0
    ours = M.multiclass_summary(y_true, probs)
    truth, pred = isic_scorer_frames(y_true, probs)
    weights = pd.Series(1.0, index=truth.index)
    assert abs(ours["balanced_accuracy"] - isic.balanced_multiclass_accuracy(truth, pred, weights)) < 1e-12
    assert ours["undecided"] == 20
    for c in range(k):
        score = ClassificationScore._category_score(truth[f"c{c}"], pred[f"c{c}"], weights, f"c{c}")
        assert abs(ours["per_class"][c]["sensitivity"] - score["sensitivity"]) < 1e-12
        assert abs(ours["per_class"][c]["specificity"] - score["specificity"]) < 1e-12
    decided = ours["confusion"][:, :k]
    sk = skm.confusion_matrix(y_true[20:], probs[20:].argmax(1), labels=range(k))
    decided_rows = M.confusion(y_true[20:], M.predicted_class(probs[20:]), k)[:, :k]
    np.testing.assert_array_equal(decided_rows, sk)
    assert decided.sum() + ours["confusion"][:, k].sum() == n


@pytest.mark.parametrize("poisson", [False, True])
def test_bootstrap_matches_sklearn_on_the_same_resamples_and_keeps_groups_together(poisson, monkeypatch):
    if poisson:
        monkeypatch.setattr(M, "POISSON_ABOVE", 10)
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(150), rng.integers(1, 4, 150))
    n = len(groups)
    y = (rng.random(150) < 0.4).astype(int)[groups]
    s = rng.normal(y, 1.0) + rng.normal(0, 0.5, 150)[groups]
    res = M.bootstrap_auc(y, s, groups, n_boot=50, seed=11, max_bins=64 if poisson else M.BOOTSTRAP_BINS)
    for b, w in enumerate(M.bootstrap_weights(n, groups, 50, 11)):
        # A lesion's images are drawn together: equal weights within a group.
        assert all(len(set(w[groups == g])) == 1 for g in range(0, 150, 15))
        if y[w > 0].min() != y[w > 0].max():  # sklearn needs both classes
            # Exact with one bin per distinct score; within the binning error with 64 quantile bins.
            tol = 2e-2 if poisson else 1e-9
            assert abs(res.replicates[b] - skm.roc_auc_score(y, s, sample_weight=w)) < tol
    assert res.ci_low < res.estimate < res.ci_high


def test_bootstrap_ci_covers_the_true_auc_at_about_the_nominal_rate():
    """Binormal model with known AUC = Phi(d / sqrt(2)); 95 % CIs over 200 simulated studies."""
    from scipy.stats import norm

    d = 1.0
    true_auc = norm.cdf(d / np.sqrt(2))
    covered = 0
    trials = 200
    for t in range(trials):
        rng = np.random.default_rng(1000 + t)
        y = (rng.random(200) < 0.5).astype(int)
        s = rng.normal(y * d, 1.0)
        r = M.bootstrap_auc(y, s, n_boot=300, seed=t)
        covered += r.ci_low <= true_auc <= r.ci_high
    assert 0.89 <= covered / trials <= 0.99, covered / trials


def test_histogram_auc_is_close_to_exact():
    y, s = data(5, n=20000)
    p = 1 / (1 + np.exp(-s))
    bins = np.linspace(0, 1, 4097)
    idx = np.clip(np.searchsorted(bins, p, side="right") - 1, 0, 4095)
    pos = np.bincount(idx[y == 1], minlength=4096).astype(float)
    neg = np.bincount(idx[y == 0], minlength=4096).astype(float)
    assert abs(M.auc_from_counts(pos, neg) - skm.roc_auc_score(y, p)) < 1e-4


def brute_delong(y, a, b):
    """Textbook DeLong with explicit pairwise structural components (O(m n))."""
    y = np.asarray(y).astype(bool)
    out = []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = y.sum(), (~y).sum()
    s10 = np.cov(np.array([out[0][1], out[1][1]]))
    s01 = np.cov(np.array([out[0][2], out[1][2]]))
    cov = s10 / m + s01 / n
    return out[0][0] - out[1][0], np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])


def test_delong_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = rng.normal(y, 1.0)
    b = np.round(a + rng.normal(0, 0.8, 300), 1)
    r = M.delong_test(y, a, b)
    diff, se = brute_delong(y, a, b)
    assert abs(r["diff"] - diff) < 1e-12 and abs(r["se"] - se) < 1e-12
    assert abs(r["auc_a"] - skm.roc_auc_score(y, a)) < 1e-12
    assert 0 <= r["p_value"] <= 1
    same = M.delong_test(y, a, a)
    assert same["diff"] == 0 and same["p_value"] == 1.0


def test_reliability_and_ece():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.55, 0.45, 0.65, 0.75])
    ece, curve = M.reliability(y, p, n_bins=2)
    assert curve[0]["n"] == 3 and curve[1]["n"] == 5
    expected = 3 / 8 * abs(np.mean([0.05, 0.15, 0.45]) - 0) + 5 / 8 * abs(np.mean([0.95, 0.85, 0.55, 0.65, 0.75]) - 1)
    assert abs(ece - expected) < 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_confusion_agrees_with_sklearn_and_keeps_the_undecided_apart(seed):
    rng = np.random.default_rng(seed)
    k, n = 7, 3000
    y_true, y_pred = rng.integers(0, k, n), rng.integers(0, k, n)
    y_pred[rng.random(n) < 0.05] = M.UNDECIDED
    theirs = skm.confusion_matrix(y_true, y_pred, labels=[*range(k), M.UNDECIDED])
    np.testing.assert_array_equal(M.confusion(y_true, y_pred, k), theirs[:k])  # undecided: the last column
    assert not theirs[k].any()


@pytest.mark.parametrize("seed", range(3))
def test_reliability_agrees_with_sklearn_calibration_curve(seed):
    """The same observed frequency and mean probability per non-empty bin (calibration_curve drops the empty ones,
    which reliability keeps with n = 0); off the bin edges, where the two conventions differ (below)."""
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(seed)
    p = np.round(rng.beta(0.5, 0.5, 5000) * 0.65, 3)  # ties; bins 7-9 empty
    p = p[~np.isclose(p * 10, np.round(p * 10))]
    y = (rng.random(len(p)) < p).astype(int)
    ece, curve = M.reliability(y, p, n_bins=10)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    full = [b for b in curve if b["n"]]
    assert [b["n"] for b in curve[7:]] == [0, 0, 0] and len(full) == len(observed) == 7
    np.testing.assert_allclose([b["observed"] for b in full], observed, atol=1e-12)
    np.testing.assert_allclose([b["mean_predicted"] for b in full], predicted, atol=1e-12)
    assert abs(ece - sum(b["n"] / len(p) * abs(b["mean_predicted"] - b["observed"]) for b in full)) < 1e-12
    # On an inner edge: [low, high) here, (low, high] in calibration_curve.
    assert M.reliability([1], [0.5], n_bins=10)[1][5]["n"] == 1
    assert len(calibration_curve([1, 0], [0.5, 0.45], n_bins=10)[0]) == 1  # 0.45 and 0.5 share (0.4, 0.5]


def test_reader_comparison():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    readers = [("r1", 0.5, 0.5), ("r2", 1.0, 0.25), ("r3", 0.75, 1.0)]
    out = M.reader_comparison(y, s, readers)
    # The model reaches sensitivity 0.75 at specificity 1.0 and 1.0 at specificity 0.75.
    assert out["below_curve"] == 1  # r1 only (r2 and r3 sit on the curve)
    assert abs(out["mean_specificity"] - 1.75 / 3) < 1e-12
    assert out["model_sensitivity_at_mean_specificity"] == 1.0


def test_clustered_delong_equals_plain_delong_when_every_lesion_has_one_image():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    a, b = y + rng.normal(0, 1, 300), y + rng.normal(0, 1.3, 300)
    plain = M.delong_test(y, a, b)
    clustered = M.delong_test(y, a, b, groups=np.arange(300).astype(str))
    for k in ("diff", "se", "p_value", "ci_low", "ci_high"):
        assert abs(plain[k] - clustered[k]) < 1e-12, k
    wide = M.delong_test(y, a, b, ci_level=0.99)
    assert wide["ci_high"] - wide["ci_low"] > plain["ci_high"] - plain["ci_low"]  # ci_level is respected


def _clustered_study(rng, n_lesions=80):
    """Lesions of 1-6 images; each model sees a lesion its own way (images of one lesion look alike to a model): two
    exchangeable models, so the true AUC difference is 0."""
    sizes = rng.integers(1, 7, n_lesions)
    lesion = np.repeat(np.arange(n_lesions), sizes)
    y = np.repeat(rng.integers(0, 2, n_lesions), sizes)
    a = y + np.repeat(rng.normal(0, 1.0, n_lesions), sizes) + rng.normal(0, 0.3, len(y))
    b = y + np.repeat(rng.normal(0, 1.0, n_lesions), sizes) + rng.normal(0, 0.3, len(y))
    return y, a, b, lesion


def test_clustered_delong_covers_at_its_nominal_level_where_plain_delong_does_not():
    """600 simulated studies with lesions of several images: the 95 % interval of the AUC difference contains the
    true difference (0) in 93-97 % of them with lesions as clusters; treating images as independent covers less."""
    rng = np.random.default_rng(2026)
    hits = {"clustered": 0, "plain": 0}
    n = 600
    for _ in range(n):
        y, a, b, lesion = _clustered_study(rng)
        c = M.delong_test(y, a, b, groups=lesion)
        p = M.delong_test(y, a, b)
        hits["clustered"] += c["ci_low"] <= 0 <= c["ci_high"]
        hits["plain"] += p["ci_low"] <= 0 <= p["ci_high"]
    coverage = {k: v / n for k, v in hits.items()}
    assert 0.93 <= coverage["clustered"] <= 0.97, coverage
    assert coverage["plain"] < 0.90, coverage


def test_temperature_scaling_recovers_a_known_temperature():
    """Labels drawn from softmax(z) while the model reports softmax(2.5 z): the fitted T is about 2.5, the NLL
    falls, and T = 1 leaves the probabilities as they were."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (4000, 5))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=p) for p in true])
    overconfident = np.exp(2.5 * z) / np.exp(2.5 * z).sum(1, keepdims=True)
    t, before, after = M.fit_temperature(overconfident, y)
    assert abs(t - 2.5) < 0.25 and after < before
    np.testing.assert_allclose(M.apply_temperature(overconfident, t), true, atol=0.08)
    np.testing.assert_array_equal(M.apply_temperature(overconfident, 1.0), overconfident)


def test_operating_points_meet_their_targets_on_the_data_that_chose_them():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    s = y + rng.normal(0, 1, 2000)
    points = {p["name"]: p for p in M.operating_points(y, s, 0.95, {"readers_specificity": 0.8})}
    assert points["sens0.95"]["sensitivity"] >= 0.95
    assert points["readers_specificity"]["specificity"] >= 0.8
    j = points["youden"]["sensitivity"] + points["youden"]["specificity"]
    assert j >= points["sens0.95"]["sensitivity"] + points["sens0.95"]["specificity"] - 1e-12


def test_the_wilson_interval_matches_its_closed_form_known_answers():
    # Known answers (Wilson 1927; e.g. Newcombe 1998, table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605)
    lo, hi = M.wilson_interval(81, 263)
    assert abs(lo - 0.2553) < 5e-4 and abs(hi - 0.3662) < 5e-4
    lo, hi = M.wilson_interval(15, 148)
    assert abs(lo - 0.0624) < 5e-4 and abs(hi - 0.1605) < 5e-4
    assert M.wilson_interval(0, 10)[0] == 0.0 and M.wilson_interval(10, 10)[1] == 1.0
    assert all(np.isnan(M.wilson_interval(0, 0)))


def test_a_locked_point_carries_over_unless_a_test_rate_leaves_its_out_of_fold_interval_or_the_floor():
    ok, why, (lo, hi) = M.carries_over("specificity", 0.15, 0.159, 400, floor=0.10)
    assert ok and why == "" and lo < 0.15 < hi
    # issue 28, finding 1: out-of-fold specificity 0.159, test 0.009
    ok, why, _ = M.carries_over("specificity", 0.009, 0.159, 400, floor=0.10)
    assert ok is False and "outside its out-of-fold interval" in why and "below the floor 0.1" in why
    ok, why, _ = M.carries_over("sensitivity", 0.05, 0.06, 1000, floor=0.10)
    assert ok is False and "below the floor" in why and "outside" not in why
    assert M.carries_over("sensitivity", None, 0.9, 10, floor=0.1)[0] is None


def test_the_model_at_the_readers_mean_point_with_lesion_bootstrap_intervals():
    """The paper's comparison: the model's sensitivity at the readers' mean specificity and its specificity at
    their mean sensitivity, each with a percentile interval over lesion resamples."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    n = 400
    y = rng.integers(0, 2, n)
    score = y * 1.0 + rng.normal(0, 0.8, n)
    groups = np.arange(n) // 2  # two images per lesion
    r = M.rates_at_readers_point(y, score, groups, 0.75, 0.70, n_boot=200, seed=1)
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    sens, lo, hi = r["sensitivity_at_readers_specificity"]
    assert sens == tpr[(1 - fpr) >= 0.70 - 1e-12].max() and lo <= sens <= hi and 0 < hi - lo < 0.3
    spec, lo, hi = r["specificity_at_readers_sensitivity"]
    assert spec == (1 - fpr[tpr >= 0.75 - 1e-12]).max() and lo <= spec <= hi and 0 < hi - lo < 0.3
    # Weighted: the same as repeating each image by its weight.
    w = rng.integers(0, 3, n)
    rep = np.repeat(np.arange(n), w)
    assert M.sensitivity_at_specificity(y, score, 0.7, w.astype(float)) == M.sensitivity_at_specificity(
        y[rep], score[rep], 0.7)
