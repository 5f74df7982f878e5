import pytest

from dermray.core.evaluation_tasks import parse_tasks
from dermray.core.taxonomy import Taxonomy
from dermray.errors import TaxonomyError, UserError

TAX = Taxonomy.from_paths(["Benign:Nevus", "Benign:SK", "Malignant:Melanoma", "Malignant:BCC", "Other:Eczema"])


def test_parse_binary_and_multiclass_tasks():
    tasks = parse_tasks("""
tasks:
  mel_vs_nev:
    positive: melanoma
    classes: {nevus: [Nevus], melanoma: ["Malignant:Melanoma"]}
  three:
    classes: {benign: [Benign], malignant: [Malignant], other: [Other]}
""", TAX)
    assert tasks[0].is_binary and tasks[0].positive == "melanoma"
    assert tasks[0].classes[1].nodes == (TAX.index["Malignant:Melanoma"],)
    assert not tasks[1].is_binary and tasks[1].class_names == ["benign", "malignant", "other"]


def test_binary_positive_defaults_to_first_class():
    tasks = parse_tasks({"tasks": {"t": {"classes": {"a": ["Nevus"], "b": ["SK"]}}}}, TAX)
    assert tasks[0].positive == "a"


@pytest.mark.parametrize("spec, err, fragment", [
    ({"tasks": {"t": {"classes": {"a": ["Nevus"], "b": ["Nope"]}}}}, TaxonomyError, "unknown taxonomy node 'Nope'"),
    ({"tasks": {"t": {"classes": {"a": ["Benign"], "b": ["Nevus"]}}}}, UserError, "classes 'a' and 'b' overlap"),
    ({"tasks": {"t": {"classes": {"a": ["Nevus"], "b": ["Nevus"]}}}}, UserError, "overlap"),
    ({"tasks": {"t": {"classes": {"a": ["Nevus"]}}}}, UserError, "at least two classes"),
    ({"tasks": {"t": {"classes": {"a": ["Nevus"], "b": ["SK"]}, "positive": "c"}}}, UserError, "positive class"),
    ({"tasks": {"t": {"classes": {"a": ["Nevus"], "b": ["SK"]}, "bogus": 1}}}, UserError, "unknown key"),
    ({"nottasks": {}}, UserError, "top-level 'tasks:'"),
])
def test_bad_tasks_are_refused(spec, err, fragment):
    with pytest.raises(err, match=fragment.replace("(", r"\(")):
        parse_tasks(spec, TAX, "tasks.yaml")
