"""dermray.core.formatting's strict JSON: what every summary, model card and record is written with."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dermray.core.formatting import strict_json


def strict_loads(text: str):
    """json.loads as a strict parser reads: NaN, Infinity and -Infinity are not JSON."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_undefined_numbers_are_null_and_numpy_values_plain_numbers():
    summary = {"auc": float("nan"), "ci": (0.1, float("inf")), "gap": -math.inf, "n": np.int64(7),
               "sd": np.float32("nan"), "mean": np.float64(0.25), "per_class": np.array([1.5, np.nan]),
               "ok": np.bool_(True), "classes": {"b", "a"} - {"a"}, 3: "an int key"}
    text = strict_json(summary)
    back = strict_loads(text)
    assert back == {"auc": None, "ci": [0.1, None], "gap": None, "n": 7, "sd": None, "mean": 0.25,
                    "per_class": [1.5, None], "ok": True, "classes": ["b"], "3": "an int key"}
    assert "NaN" not in text and "Infinity" not in text


def test_what_json_has_no_type_for_is_written_as_its_text():
    import datetime
    import pathlib

    back = strict_loads(strict_json({"at": datetime.date(2026, 12, 7), "path": pathlib.Path("/a/b")}, indent=None))
    assert back == {"at": "2026-12-07", "path": "/a/b"}


def test_pythons_own_json_writes_what_strict_parsers_refuse():
    """Why strict_json exists: the standard library writes NaN bare, and a strict parser refuses it."""
    with pytest.raises(ValueError, match="not JSON: NaN"):
        strict_loads(json.dumps({"auc": float("nan")}))


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
values = st.recursive(st.none() | st.booleans() | st.integers() | finite_or_not | st.text(max_size=5),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=4), max_leaves=20)


@given(values)
def test_any_nesting_of_numbers_round_trips_with_undefined_numbers_as_null(value):
    def expected(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, list):
            return [expected(x) for x in v]
        if isinstance(v, dict):
            return {k: expected(x) for k, x in v.items()}
        return v

    assert strict_loads(strict_json(value)) == expected(value)


@pytest.mark.parametrize("value, text", [(0.245, "0.2s"), (7.46, "7.5s"), (51.694, "52s"), (249.3, "4m09s"),
                                         (3725, "1h02m"), (None, "?"), (float("nan"), "?")])
def test_durations_for_people(value, text):
    from dermray.core.formatting import duration

    assert duration(value) == text


@pytest.mark.parametrize("value, text", [(147071.9, "147,072"), (52.43, "52.4"), (3.071, "3.07"), (0.0, "0.00")])
def test_rates_for_people(value, text):
    """Issue 29: the console printed `147071.9 rows/s`."""
    from dermray.core.formatting import rate

    assert rate(value) == text


def test_a_subset_that_repeats_all_is_shown_once():
    """Issue 29: "all" and "biopsy" rows were printed twice when every image is biopsy-proven."""
    from dermray.core.report import identical_subsets

    def row(subset, metric, value, n=10):
        return {"task": "t", "subset": subset, "metric": metric, "value": value, "ci_low": value - 0.1,
                "ci_high": value + 0.1, "n": n}

    same = [row("all", "auc", 0.8), row("all", "accuracy", 0.7), row("biopsy", "auc", 0.8),
            row("biopsy", "accuracy", 0.7), row("modality=clinical", "auc", 0.6, 4)]
    assert identical_subsets(same) == {"biopsy": "all"}
    assert identical_subsets(same[:3] + [row("biopsy", "accuracy", 0.7, 9)]) == {}  # one count differs
    assert identical_subsets(same[:3]) == {}  # biopsy lacks a metric "all" has


def test_training_curves_are_drawn_from_each_fold_s_history():
    """Issue 29: no training curves anywhere. One figure: loss (training and selection split) and the selection
    split's top-1 per epoch, per fold, epochs numbered from 1."""
    import pandas as pd

    from dermray.core.report import training_curves

    rows = [{"epoch": e, "split": s, "metric": m, "value": v} for e in range(3) for s, m, v in
            (("train", "loss", 2.0 - e / 2), ("select", "loss", 2.1 - e / 3), ("select", "top1", 0.3 + e / 10))]
    out = training_curves({"fold=0": pd.DataFrame(rows), "fold=1": pd.DataFrame(rows)})
    assert list(out) == ["training_curves.png"] and out["training_curves.png"].startswith(b"\x89PNG")
    assert training_curves({}) == {}


def test_a_skipped_stage_says_when_and_how_long_it_ran():
    """Issue 29: a re-run that skipped every stage showed the old runs' seconds as if they were its own."""
    from dermray.apps.pipeline import format_summary, ran_when

    assert ran_when({"finished_at": "2026-12-07T17:02:11+00:00", "seconds": 185.2}) == \
        " of 2026-12-07 17:02:11 UTC, 3m05s long"
    assert ran_when({"seconds": {"total": 2.5}}) == " of 2.5s long" and ran_when({}) == ""
    table = format_summary({"run_id": "r", "seconds": 1.0, "cross_validation": [], "headline": [], "report": None,
                            "saliency_gallery": None, "stages": [
                                {"stage": "train", "status": "skipped (done)", "in": 10, "out": 10, "quarantined": 0,
                                 "seconds": 185.2}]})
    assert "185.2" not in table


def test_a_point_that_does_not_carry_over_is_one_console_line():
    from dermray.core.formatting import flagged_points

    headline = [{"task": "carcinoma_vs_benign_keratosis", "subset": s, "metric": f"carries_over@locked:{p}",
                 "value": 0} for s in ("all", "biopsy") for p in ("sens0.95", "youden", "readers_specificity")]
    lines = flagged_points(headline)
    assert len(lines) == 1 and len("  " + lines[0]) <= 120 and "youden" in lines[0], lines
