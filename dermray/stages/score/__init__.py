"""Scoring stage (the package): trained fold models over an archive of images with Ray Data -> predictions Parquet.

Steps (``run``): identify the models (``artifacts.load_ensemble``: the model id carries the weights' sha256) ->
plan the work in Ray tasks over the manifest's row groups (fingerprint the input, quarantine rows without an id or
URI and repeated ids, leave out what this model has already scored in this run, cut the rest into parts of
``score.rows_per_file`` images; one part per tar shard) -> compare the run's recorded lineage (replace the run's
output when the input or model changed, refuse in incremental mode when the model changed) -> Ray Data: decode
tasks (the training's evaluation transform, uint8) -> an actor pool holding the models (``Predictor``: mean softmax
over the fold models and the test-time-augmentation views) -> the driver writes each part, once all its images are
back, atomically.

The driver holds per-part metadata and the results of the parts in flight, never per-image state of the whole
archive: planning, deduplication and "already scored" are answered in tasks (``dermray/core/ids.py``).

Outputs under ``<output>/predictions/<run_id>/``: ``predictions/part-*.parquet`` (one table: read the folder),
``quarantine.parquet``, ``score_summary.json`` (with the lineage); ``_state/`` holds what a re-run needs. Columns:
``image_id``, ``model_id``, ``probs`` (list<float32> over training classes), ``top_class``, ``top_node``, per task
``<task>_probs`` and for binary tasks ``<task>_score``, then the input's columns (label, label_source, modality,
group_id, uri, ``row`` = input row, ...).

Modules, in the order a run goes through them: ``plan`` (the work over the input), ``actors`` (what Ray Data
runs), ``write`` (the decisions and the parts), ``stage`` (``run`` and ``lineage_now``), ``summary``; ``shared``
holds the stage's name and the work rows' internal columns.
"""
from dermray.stages.score.shared import STAGE
from dermray.stages.score.stage import lineage_now, run
from dermray.stages.score.summary import counts, format_summary

__all__ = ["STAGE", "counts", "format_summary", "lineage_now", "run"]
