"""Saliency's image selection (pure): a binary task that is not estimable (a class no training class lies under,
issue 28 finding 6) has nothing to explain, instead of ranking images by a score that is 0 by construction."""
import numpy as np
import pandas as pd

from dermray.core.tasks import parse_tasks
from dermray.core.taxonomy import Taxonomy
from dermray.runtime.config import SaliencyConfig
from dermray.stages import saliency

LEAVES = ["Benign:Nevus:Blue", "Benign:Nevus:Common", "Malignant:Melanoma:Invasive", "Malignant:BCC"]
TASKS = {"tasks": {"mel_vs_nev": {"positive": "melanoma", "classes": {"melanoma": ["Malignant:Melanoma"],
                                                                       "nevus": ["Benign:Nevus"]}}}}


def _selection(membership_rows):
    tax = Taxonomy.from_paths(LEAVES)
    tasks = parse_tasks(TASKS, tax)
    labels = ["Benign:Nevus:Blue", "Benign:Nevus:Common", "Malignant:Melanoma:Invasive"] * 4
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(12)], "uri": [f"u{k}" for k in range(12)],
                       "label": labels})
    probs = np.random.default_rng(0).dirichlet(np.ones(3), 12)  # training classes: blue, common, melanoma
    membership = pd.DataFrame(membership_rows, columns=["task", "task_class", "class_index"])
    return saliency.select_images(df, probs, tasks, membership, tax, SaliencyConfig(k=2))


def test_an_estimable_task_is_explained_and_a_not_estimable_one_is_not():
    both = [("mel_vs_nev", "nevus", 0), ("mel_vs_nev", "nevus", 1), ("mel_vs_nev", "melanoma", 2)]
    assert len(_selection(both)) == 4  # two at each end
    assert _selection(both[:2]).empty  # no training class under melanoma
