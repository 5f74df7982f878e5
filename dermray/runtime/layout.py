"""Where every stage's outputs lie: ``<output>/<stage folder>/<run_id>/``. One definition, used by the stages, the
pipeline, ``dermray lineage`` and the tests (which check that nothing is written anywhere else).

```
<output>/partition/<run_id>/     training_classes, labels, task_membership, fold_counts, quarantine, summary
<output>/train/<run_id>/         fold=<k>/ (checkpoints, best/model.pt, model_card.json, metrics, val predictions)
<output>/predictions/<run_id>/   predictions/part-*.parquet, quarantine, summary, _state/
<output>/metrics/<run_id>/       metrics, roc, ..., report.html, plots/ (nightly: date=<d>/ and history/)
<output>/saliency/<run_id>/      <method>/*.png|*.npy, saliency_index, sanity, gallery.html
<output>/pipeline/<run_id>/      test_split.parquet, pipeline_summary.json
```
"""
from __future__ import annotations

from dermray.runtime.registry import REGISTRY
from dermray.store import storage

# The stages' folders and summaries come from their registry; the applications that write beside them add theirs.
STAGE_FOLDERS = {s.name: s.folder for s in REGISTRY.values()} | {"pipeline": "pipeline", "nightly": "metrics"}
SUMMARY_FILES = {s.name: s.summary_file for s in REGISTRY.values()} | {"pipeline": "pipeline_summary.json"}
FINAL_FOLD = "all"  # the fold name of the model trained on all folds


def stage_dir(output: str, stage: str, run_id: str) -> str:
    """``<output>/<stage folder>/<run_id>``: everything ``stage`` writes for ``run_id`` lies below it."""
    return storage.join(output, STAGE_FOLDERS[stage], run_id)


def summary_uri(output: str, stage: str, run_id: str) -> str:
    return storage.join(stage_dir(output, stage, run_id), SUMMARY_FILES[stage])


def partition_dir(output: str, run_id: str) -> str:
    return stage_dir(output, "partition", run_id)


def train_dir(output: str, run_id: str) -> str:
    return stage_dir(output, "train", run_id)


def fold_dir(output: str, run_id: str, fold) -> str:
    return storage.join(train_dir(output, run_id), f"fold={fold}")


def predictions_dir(output: str, run_id: str) -> str:
    return stage_dir(output, "score", run_id)


def metrics_dir(output: str, run_id: str) -> str:
    return stage_dir(output, "evaluate", run_id)


def saliency_dir(output: str, run_id: str) -> str:
    return stage_dir(output, "saliency", run_id)


def pipeline_dir(output: str, run_id: str) -> str:
    return stage_dir(output, "pipeline", run_id)


PARTITION_TABLES = ("training_classes", "labels", "quarantine", "task_membership", "fold_counts", "near_duplicates",
                    "image_hashes")


def partition_outputs(partition: str) -> dict[str, str]:
    """The partition stage's files below its folder ``partition`` (``partition_dir`` or a configured one)."""
    return {name: storage.join(partition, f"{name}.parquet") for name in PARTITION_TABLES} | {
        "summary": storage.join(partition, SUMMARY_FILES["partition"])}


METRICS_TABLES = ("metrics", "roc", "confusion", "readers", "calibration", "train_overlap")


def evaluate_outputs(base: str) -> dict[str, str]:
    """The evaluation stage's files below ``base`` (``metrics_dir``, or a nightly's ``date=`` folder)."""
    out = {name: storage.join(base, f"{name}.parquet") for name in METRICS_TABLES}
    return out | {"report_html": storage.join(base, "report.html"), "report_md": storage.join(base, "report.md"),
                  "plots": storage.join(base, "plots"), "summary": storage.join(base, SUMMARY_FILES["evaluate"])}
