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
from dermray.core.templating import render
from dermray.runtime.artifacts import (
    INTENDED_USE,
    LIMITATIONS,
    Calibration,
    OperatingPoint,
    card_sections,
    changelog,
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
    """ensemble_card.md: the card for a reviewer to read (templates/ensemble_card.md.j2)."""
    return render(
        "ensemble_card.md.j2", model_id=card.model_id, run_id=card.run_id, intended_use=INTENDED_USE,
        architecture=card.architecture, input_size=card.input_size, classes_hash=card.classes_hash,
        members=[{"fold": m.fold, "model_id": m.model_id, "weights_sha256": (m.weights_sha256 or "")[:16],
                  "best_epoch": m.best_epoch, "epochs_trained": m.epochs_trained} for m in card.members],
        out_of_fold_auc=[{"task": r["task"], "auc": fmt(r["auc"]), "ci_low": fmt(r["ci_low"]),
                          "ci_high": fmt(r["ci_high"]), "n": f"{r['n']:,}", "n_positive": f"{r['n_positive']:,}"}
                         for r in card.out_of_fold_auc],
        operating_points=[{"task": p.task, "name": p.name, "threshold": f"{p.threshold:.4f}",
                           "sensitivity": f"{p.sensitivity:.3f}", "specificity": f"{p.specificity:.3f}",
                           "target": target_text(card.readers.get(p.task, {}).get(p.name))}
                          for p in card.operating_points],
        limitations=LIMITATIONS, changelog=changelog(card.changelog),
        **card_sections(card.cross_validation, card.calibration, card.test_metrics))


def target_text(target: float | None) -> str:
    """The readers' point an operating point targets (their mean specificity), written out; "" for none."""
    return "" if target is None else f"{target:.3f}"
