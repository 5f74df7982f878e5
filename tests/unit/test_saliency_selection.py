"""Saliency's image selection (pure): a binary task that is not estimable (a class no training class lies under,
issue 28 finding 6) has nothing to explain, instead of ranking images by a score that is 0 by construction."""
import numpy as np
import pandas as pd

from dermray.core.evaluation_tasks import parse_tasks
from dermray.core.taxonomy import Taxonomy
from dermray.runtime.config import SaliencyConfig
from dermray.stages.saliency.sanity import MIN_SANITY_IMAGES, flag_methods, sanity_verdict
from dermray.stages.saliency.select import select_images

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
    return select_images(df, probs, tasks, membership, tax, SaliencyConfig(k=2))


def test_an_estimable_task_is_explained_and_a_not_estimable_one_is_not():
    both = [("mel_vs_nev", "nevus", 0), ("mel_vs_nev", "nevus", 1), ("mel_vs_nev", "melanoma", 2)]
    assert len(_selection(both)) == 4  # two at each end
    assert _selection(both[:2]).empty  # no training class under melanoma


def _rows(method, spearmans, n=8, blank_last=0):
    return [{"method": method, "level": i, "randomised": f"l{i}", "spearman": v, "ssim": v / 2, "n_images": n,
             "constant_maps": blank_last if i == len(spearmans) - 1 else 0} for i, v in enumerate(spearmans)]


def test_the_sanity_verdict_passes_only_a_falling_similarity_on_enough_images():
    """Issue 29: Grad-CAM's similarity rose with randomisation (-0.044 -> 0.268) under a caption saying it should
    fall, and the test was called conclusive on 4 images."""
    falling = _rows("gradient", [0.8, 0.4, 0.1])
    assert sanity_verdict(falling) == (True, "on 8 images")
    assert flag_methods(falling, 0.5) == {}
    rising = falling + _rows("gradcam", [-0.044, 0.1, 0.268])
    decided, why = sanity_verdict(rising)
    assert not decided and why == "gradcam: similarity rises with randomisation"
    assert flag_methods(rising, 0.5)["gradcam"].startswith("inconclusive: the similarity rises")
    few = _rows("gradient", [0.8, 0.4, 0.1], n=4)
    assert sanity_verdict(few) == (False, f"4 audit image(s), fewer than the {MIN_SANITY_IMAGES} "
                                                    "the verdict needs (saliency.audit_size)")
    blank = _rows("gradcam", [0.8, 0.4, 0.1], blank_last=2)
    assert sanity_verdict(blank) == (False, "gradcam: blank maps at full randomisation")
    assert sanity_verdict([]) == (False, "not run")
    # Noise is not a rise; a method whose randomised maps still resemble the originals fails, conclusively.
    assert sanity_verdict(_rows("gradient", [0.3, 0.35]))[0]
    assert flag_methods(_rows("gradient", [0.9, 0.8]), 0.5)["gradient"].startswith("maps barely change")
