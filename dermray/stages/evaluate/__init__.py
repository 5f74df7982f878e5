"""Evaluation stage: predictions -> the paper's results, as long-form tables for analysts, plots and a report.

For each task (tasks YAML) and subset (all, biopsy-proven, each modality, each value of the configured subgroup
columns) the stage derives the ground truth from each image's taxonomy label and the model's task-class
probabilities from the training-class probabilities (the paper's inference algorithm, ``dermray/core/inference.py``,
through the partition stage's task_membership table). Binary tasks score P(pos) / (P(pos) + P(neg)).

Outputs under ``<output>/metrics/<run_id>/``: metrics.parquet (long form), roc.parquet, confusion.parquet,
readers.parquet, calibration.parquet, plots/*.png, report.html (self-contained), report.md and
evaluate_summary.json (with the lineage: which predictions, model and partition the numbers come from).

Modules, in the order a run goes through them: ``inputs`` (what it reads), ``subsets``, ``per_task`` (the metrics of
one task on each subset, into ``tables``), ``overlap`` (test images that copy training images), ``external``
(external validation), ``distributed`` (the histogram path for inputs larger than memory), ``stage`` (``run``,
``lineage_now``, the summary); ``shared`` holds the stage's name.
"""
from dermray.stages.evaluate.shared import STAGE
from dermray.stages.evaluate.stage import counts, format_summary, lineage_now, run

__all__ = ["STAGE", "counts", "format_summary", "lineage_now", "run"]
