"""Training stage: the paper's transfer learning (an ImageNet CNN, a new final layer with one output per training
class, fine-tuned), one Ray Train ``TorchTrainer`` per cross-validation fold, the folds running concurrently.

Data: the manifest joined with the partition stage's labels; each fold's training rows are decoded and augmented
in Ray Data tasks (the paper's random rotation, inscribed-rectangle crop and vertical flip) and streamed to the
worker (``dermray/runtime/trainloop.py``); the held-out fold is the validation set. Images that cannot be decoded
are found first and quarantined.

Model selection never sees the held-out fold: with ``train.selection: inner`` (the default) an inner split of the
fold's training lesions (grouped as the partition grouped them, near-duplicate merges included) picks the epoch,
and the held-out fold only measures the chosen model, once, after
training (``measure_held_out``); its predictions are the cross-validation estimate.

Per fold, under ``<output>/train/<run_id>/fold=<k>/``: Ray Train's checkpoints, ``lineage.json`` (what the fold is
trained from: its rows, the classes, the recipe), ``metrics.parquet``, ``best/model.pt``, ``model_card.json`` and
``val_predictions.parquet``. Re-running the same run resumes each fold from its last checkpoint when its lineage is
unchanged, and stops with one line saying what changed otherwise (``--force`` trains those folds afresh).
Across folds: ``train_summary.parquet`` with mean and sd of each validation metric.

Modules, in the order a run goes through them: ``plan`` (what it reads and decides before Ray starts), ``records``
(each fold's lineage and records), ``data`` (Ray Data for training), ``fold`` (one fold's Ray Train job and its
outputs), ``decisions`` (the decisions locked out of fold), ``stage`` (``run``, ``lineage_now``, the summary);
``shared`` holds the stage's name and the fold records' names.
"""
from dermray.stages.train.records import check_can_run
from dermray.stages.train.shared import STAGE
from dermray.stages.train.stage import counts, format_summary, lineage_now, run

__all__ = ["STAGE", "check_can_run", "counts", "format_summary", "lineage_now", "run"]
