"""The stages' summaries as typed records: what each stage returns from ``run`` and writes beside its tables as
``<stage>_summary.json`` (``layout.SUMMARY_FILES``). One record per stage, named by its ``StageSpec.summary_type``
(``dermray/runtime/registry.py``); a key a stage writes that its record does not declare, or a value of another
type, fails when the summary is built - in the tests - not in a reader months later.

The records are the summaries' schema for their readers too (the pipeline, ``dermray lineage``, the nightly job,
analysts): ``registry.read_summary(stage, text)`` validates a written summary. Nested parts that have their own
records elsewhere (the lineage: ``lineage.Lineage``; operating points and calibration: ``artifacts``) are kept here
as JSON objects.

Pure pydantic; no Ray, no storage.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

JSON = dict[str, Any]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class StageSummary(BaseModel):
    """What every stage's summary holds."""
    model_config = ConfigDict(extra="forbid")
    stage: str
    run_id: str
    lineage: Optional[JSON] = None  # lineage.Lineage as JSON (evaluate's distributed path records none)
    outputs: JSON  # name -> URI of each output
    seconds: float
    finished_at: str = Field(default_factory=_now)  # UTC, ISO 8601: when the run wrote this summary

    def as_dict(self) -> JSON:
        """The summary as ``run`` returns it and as its JSON file holds it (strict JSON: an undefined number is
        None, as the file's null)."""
        import json

        from dermray.core.formatting import strict_json

        return json.loads(strict_json(self.model_dump(mode="json")))


class PartitionSummary(StageSummary):
    manifest: str
    taxonomy: str
    max_class_size: int
    folds: int
    seed: int
    input_rows: int
    assigned: int  # rows with a class and a fold
    quarantined: int  # rows refused, each with its reason (quarantine.parquet)
    duplicates: int
    training_classes: int
    node_only_classes: int
    big_leaf_classes: int
    groups_spanning_classes: int
    images_per_fold: list[int]
    near_duplicates: Optional[JSON]  # None: partition.near_duplicates off
    unattributable: list[JSON]  # training classes no task can score, with why
    chunks: int
    seconds: dict[str, float]  # type: ignore[assignment]  # per pass, and "total"


class TrainSummary(StageSummary):
    arch: str
    folds: list[str]
    images: int
    trained_on: int
    quarantined: int
    per_fold: list[JSON]  # one row per fold: epochs, best epoch, validation metrics, lineage id
    summary: list[JSON]  # mean and sd of each validation metric over the folds
    partition: str
    calibration: Optional[JSON] = None
    operating_points: list[JSON]
    cross_validation: Optional[JSON] = None
    not_estimable: Optional[JSON] = None
    out_of_fold_auc: list[JSON] = []  # per binary task, pooled over the folds' held-out images, with its interval


class ScoreSummary(StageSummary):
    model_id: str
    input_kind: str
    models: int
    arch: str
    tta: str
    input: Optional[int]  # None: tar shards, whose image count is known only once read
    shards: Optional[int] = None
    already_done: int
    scored: int
    changed_since_scored: int = 0  # images scored again because their input row changed
    quarantined: int
    files_written: int
    run_scored_total: int
    run_quarantined_total: int
    images_per_s: Optional[float] = None
    steady_images_per_s: Optional[float] = None
    startup_s: Optional[float] = None
    partition: Optional[str] = None
    decisions: JSON
    precision: list[str]
    checkpoints: list[str]
    operating_points: list[JSON]
    quarantine_reasons: list[JSON] = []
    compile: Optional[str] = None


class EvaluateSummary(StageSummary):
    predictions: str
    mode: Optional[str] = None  # "distributed": AUCs from score histograms (fewer keys below)
    histogram_bins: Optional[int] = None
    images: Optional[int] = None
    lesions: Optional[int] = None
    biopsy_images: Optional[int] = None
    evaluated: Optional[int] = None
    outside_every_task: Optional[int] = None
    model_ids: list[str] = []
    partition: Optional[str] = None
    unknown_labels: Optional[int] = None
    excluded: JSON = {}
    train_overlap: Optional[JSON] = None
    tasks: list[str]
    subsets: list[str] = []
    headline: list[JSON]
    model_card: Optional[str] = None  # the first fold's model card the test results were written into


class SaliencySummary(StageSummary):
    model_id: str
    methods: list[str]
    selected: int
    maps: int
    explained: int
    tasks: list[str]
    inside_lesion_mean: dict[str, Optional[float]]
    sanity: list[JSON]
    sanity_conclusive: bool
    sanity_why: str
    flagged: dict[str, str]
