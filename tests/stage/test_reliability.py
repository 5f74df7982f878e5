"""The bad-input corpus of benchmarks/reliability.py, as a test: every odd image, unsafe tar member, broken manifest
and broken taxonomy is either scored (the valid kinds) or refused with a reason, and no row is lost."""
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reliability():
    spec = importlib.util.spec_from_file_location("reliability", REPO / "benchmarks" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bad_input_corpus_is_handled_and_nothing_is_lost(reliability, ray_local, tmp_path):
    tried, handled, lost, failures = reliability.bad_inputs(tmp_path, reliability.tiny_model(tmp_path))
    assert failures == []
    assert handled == tried and tried >= 26
    assert lost == 0


def test_the_image_corpus_has_every_kind_the_issue_lists(reliability, tmp_path):
    names = {r["image_id"] for r in reliability.image_corpus(tmp_path)}
    for kind in ("truncated", "zero-byte", "not-an-image", "png-alpha", "sixteen-bit", "cmyk", "grayscale",
                 "exif-rotated", "bomb", "huge-dimensions", "ünïcødé name", "with spaces", "missing"):
        assert kind in names
