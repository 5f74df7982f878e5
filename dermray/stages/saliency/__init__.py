"""Saliency stage: attribution maps for chosen images, computed over Ray Data, written to object storage, with the
sanity checks that say whether a method's maps mean anything.

Images come from a predictions table (``dermray score`` output): the top-K and bottom-K scored images of each task,
the misclassified ones, or listed ids. Each Ray Data actor builds the model once and, for every image and method
(``dermray/runtime/attribution.py``), writes under ``<output>/saliency/<run_id>/<method>/`` a PNG (the image beside its
overlay) and the raw map as float16 ``.npy`` at the image's own size. Also under ``<output>/saliency/<run_id>/``:
``saliency_index.parquet`` (image_id, task, method, target, score, png_uri, npy_uri, inside_lesion when masks are
given, blank_map, label, true_class, reason), ``sanity.parquet`` (the model-parameter randomisation test per method
and level),
``gallery.html`` (one row per class, the paper's saliency-figure form, and the sanity results) and
``saliency_summary.json``.

Modules, in the order a run goes through them: ``select`` (which images and targets), ``actors`` (the Ray Data
actor that computes and writes the maps), ``sanity`` (the randomisation checks and their verdict), ``gallery``,
``stage`` (``run``, ``lineage_now``, the summary); ``shared`` holds the stage's name.
"""
from dermray.stages.saliency.shared import STAGE
from dermray.stages.saliency.stage import counts, format_summary, lineage_now, run

__all__ = ["STAGE", "counts", "format_summary", "lineage_now", "run"]
