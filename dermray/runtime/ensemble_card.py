"""The ensemble's model card: the model that ``dermray score`` runs when it is given a train run (the mean of its
cross-validation folds' models), described as that model - not as fold 0, whose card used to receive the
ensemble's test results (issue 29).

``ensemble_card.json`` (the record) and ``ensemble_card.md`` (for people) lie in the train run's folder, beside its
``fold=<k>/`` folders. Training writes it once the decisions are locked: its members (each fold model's id, weights
sha256 and chosen epoch, numbered from 1), the cross-validation summary with the out-of-fold AUC of each binary task
(pooled over the folds' held-out images, with its lesion-bootstrap interval), the locked operating points as
measured out of fold, the readers' point it targets, and the calibration. Evaluation appends the test results when
the predictions it evaluates are the ensemble's.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from dermray.core.formatting import fmt, strict_json
from dermray.runtime.artifacts import (
    INTENDED_USE,
    LIMITATIONS,
    Calibration,
    OperatingPoint,
    cross_validation_lines,
    results_lines,
)
from dermray.store import storage

ENSEMBLE_CARD_FILE = "ensemble_card.json"
ENSEMBLE_CARD_MD = "ensemble_card.md"
ENSEMBLE_CARD_VERSION = 1


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fold: str
    model_id: str
    weights_sha256: Optional[str] = None
    best_epoch: Optional[int] = None  # from 1
    epochs_trained: Optional[int] = None


class EnsembleCard(BaseModel):
    """What the ensemble of a train run's cross-validation folds is and how well it did."""
    model_config = ConfigDict(extra="forbid")
    schema_version: int = ENSEMBLE_CARD_VERSION
    model_id: str  # as dermray score names it: <run>/ensemble(fold=...)@<12 hex digits of the weights' sha256>
    run_id: str
    architecture: str
    input_size: int
    classes_hash: str
    members: list[Member] = Field(min_length=2)
    cross_validation: list[dict[str, Any]] = Field(default_factory=list)  # mean and sd per metric over the folds
    out_of_fold_auc: list[dict[str, Any]] = Field(default_factory=list)  # per binary task, with its interval
    operating_points: list[OperatingPoint] = Field(default_factory=list)
    calibration: Optional[Calibration] = None
    readers: dict[str, Any] = Field(default_factory=dict)  # task -> {point: the readers' mean specificity}
    test_metrics: list[dict[str, Any]] = Field(default_factory=list)
    changelog: list[dict[str, Any]] = Field(default_factory=list)


def card_uri(run_dir: str) -> str:
    return storage.join(run_dir, ENSEMBLE_CARD_FILE)


def read(run_dir: str) -> EnsembleCard | None:
    uri = card_uri(run_dir)
    return EnsembleCard.model_validate_json(storage.read_text(uri)) if storage.exists(uri) else None


def write(card: EnsembleCard, run_dir: str) -> str:
    """ensemble_card.json and ensemble_card.md in the train run's folder; returns the markdown's URI."""
    storage.write_text(card_uri(run_dir), strict_json(card.model_dump(mode="json")))
    md = storage.join(run_dir, ENSEMBLE_CARD_MD)
    storage.write_text(md, render_markdown(card))
    return md


def render_markdown(card: EnsembleCard) -> str:
    lines = [f"# Model card: {card.model_id}", "",
             f"The mean of {len(card.members)} fold models of train run `{card.run_id}` - the model `dermray score` "
             "runs when given the run's folder.", "", f"**Intended use.** {INTENDED_USE}", "", "## Model", "",
             f"- architecture: {card.architecture}, input {card.input_size} px, training classes hash "
             f"{card.classes_hash}", "", "| fold | model | weights sha256 | chosen epoch | epochs trained |",
             "|---|---|---|---:|---:|"]
    lines += [f"| {m.fold} | {m.model_id} | {(m.weights_sha256 or '')[:16]} | {m.best_epoch} | {m.epochs_trained} |"
              for m in card.members]
    lines += ["", "## Cross-validation (held-out folds)", ""]
    for r in card.out_of_fold_auc:
        lines.append(f"- {r['task']}: out-of-fold AUC {fmt(r['auc'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] "
                     f"({r['n']:,} images, {r['n_positive']:,} positive; every fold's held-out images pooled)")
    lines += cross_validation_lines(card.cross_validation, card.calibration)
    if card.operating_points:
        lines += ["", "## Operating points (locked out of fold)", "", "| task | point | threshold | out-of-fold "
                  "sensitivity | out-of-fold specificity | target |", "|---|---|---:|---:|---:|---|"]
        for p in card.operating_points:
            target = card.readers.get(p.task, {}).get(p.name)
            lines.append(f"| {p.task} | {p.name} | {p.threshold:.4f} | {p.sensitivity:.3f} | {p.specificity:.3f} | "
                         + (f"the readers' mean specificity {target:.3f}" if target is not None else "") + " |")
    lines += results_lines(card.test_metrics)
    lines += ["", "## Known limitations", ""] + [f"- {x}" for x in LIMITATIONS]
    lines += ["", "## Changelog", ""] + [f"- {c.get('when')}: {c.get('what')}" for c in card.changelog]
    return "\n".join(lines) + "\n"
