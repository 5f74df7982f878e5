"""A trained model on storage, defined once: where its files lie, its model card (a typed, validated record), the
hashes that identify it, and loading the fold models of an ensemble. ``dermray train`` writes through this module;
``dermray score``, ``dermray saliency``, ``dermray evaluate`` and ``dermray lineage`` read through it.

A fold directory (``<output>/train/<run_id>/fold=<k>/``) holds ``best/model.pt`` (a plain state_dict, loaded with
``weights_only=True``) and ``model_card.json``. The card says what the weights are (architecture, input size,
normalisation, training classes, their hash, the weights' sha256), how they were made (config, lineage, versions)
and how well they did (validation metrics, operating points, calibration). ``schema_version`` changes when a field
changes meaning; cards of version 1 (before the sha256 and lineage fields) and 2 (epochs counted from 0) are still
read, as version 3.

Why one module over 400 lines: the model card's record, its readers and writers, and the ensemble built from
cards share one format; split, each part would import the others.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# fmt: one fold has no spread: sd is NaN, or null in JSON (strict_json writes it so)
from dermray.core.formatting import external_rows, fmt, strict_json
from dermray.core.templating import render
from dermray.errors import UserError
from dermray.runtime import layout
from dermray.store import storage

CARD_FILE = "model_card.json"
CARD_MD = "model_card.md"
WEIGHTS_FILE = posixpath.join("best", "model.pt")
CARD_SCHEMA_VERSION = 3


# ---- hashes ------------------------------------------------------------------------------------------------------
def classes_hash(classes: pa.Table | list[dict]) -> str:
    """16 hex digits identifying a set of training classes (index, node and scope of each, in order)."""
    rows: Iterable[tuple[Any, Any, Any]]
    if isinstance(classes, pa.Table):
        rows = zip(classes.column("class_index").to_pylist(), classes.column("node_id").to_pylist(),
                   classes.column("scope").to_pylist())
    else:
        rows = ((c["class_index"], c["node_id"], c.get("scope", "subtree")) for c in classes)
    return hashlib.sha256(json.dumps([list(r) for r in rows]).encode()).hexdigest()[:16]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_sha256(uri: str) -> str:
    """sha256 of a weights file's bytes (read once; the file is the model)."""
    return sha256_hex(storage.read_bytes(uri))


# ---- the model card ----------------------------------------------------------------------------------------------
class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingClassRecord(_Record):
    class_index: int
    node_id: str
    name: str
    scope: Literal["subtree", "node"] = "subtree"
    n_images: Optional[int] = None


class Normalisation(_Record):
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)


class OperatingPoint(_Record):
    """A decision threshold on a binary task's score, locked when the model was trained."""
    task: str
    name: str  # e.g. "sens0.95", "youden", "readers_specificity"
    threshold: float
    # What it gave on the data that chose it (the trained folds' held-out predictions)
    sensitivity: Optional[float] = None
    specificity: Optional[float] = None
    chosen_on: str = "out_of_fold"
    n: Optional[int] = None
    n_positive: Optional[int] = None  # the images behind sensitivity out of fold
    n_negative: Optional[int] = None  # and behind specificity


class Calibration(_Record):
    """Temperature scaling of the logits (softmax(logits / T)), fitted on out-of-fold predictions."""
    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0)
    fitted_on: str = "out_of_fold"
    n: Optional[int] = None
    nll_before: Optional[float] = None
    nll_after: Optional[float] = None


class ModelCard(_Record):
    """What a fold model is, how it was made and how well it did (MONAI's metadata.json in spirit)."""
    schema_version: int = CARD_SCHEMA_VERSION
    model_id: str
    architecture: str
    input_size: int = Field(ge=8)
    normalisation: Normalisation
    training_classes: list[TrainingClassRecord] = Field(min_length=2)
    classes_hash: str
    weights_sha256: Optional[str] = None  # of best/model.pt
    weights_source: Optional[str] = None  # what training started from: imagenet | none | a (redacted) URI
    freeze: Optional[str] = None
    fold: Optional[str] = None
    held_out_fold: Optional[int] = None  # None for the model trained on all folds
    config: dict[str, Any] = Field(default_factory=dict)  # the effective train config
    config_hash: Optional[str] = None
    versions: dict[str, Optional[str]] = Field(default_factory=dict)
    epochs_trained: Optional[int] = None
    best_epoch: Optional[int] = None
    selection: Optional[str] = None  # how the best epoch was chosen
    validation: dict[str, Optional[float]] = Field(default_factory=dict)
    checkpoint: Optional[str] = None  # where best/model.pt lies
    data_hash: Optional[str] = None  # of (image_id, class_index, fold): the labels trained on
    lineage: dict[str, Any] = Field(default_factory=dict)
    operating_points: list[OperatingPoint] = Field(default_factory=list)
    calibration: Optional[Calibration] = None
    precision: Optional[str] = None  # fp32 | bf16 | fp16: what training computed in
    preprocess: dict[str, Any] = Field(default_factory=dict)  # transforms.Preprocess: applied when scoring too
    augmentation: dict[str, Any] = Field(default_factory=dict)  # what training drew (transforms.Photometric)
    # The reviewer's part (issue 19): intended use, data, limitations, metrics written back by evaluate
    description: dict[str, Any] = Field(default_factory=dict)
    test_metrics: list[dict[str, Any]] = Field(default_factory=list)
    changelog: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _classes_consistent(self):
        indices = [c.class_index for c in self.training_classes]
        if indices != list(range(len(indices))):
            raise ValueError("training_classes must be numbered 0..n-1 in order")
        if classes_hash([c.model_dump() for c in self.training_classes]) != self.classes_hash:
            raise ValueError("classes_hash does not match training_classes")
        return self

    @property
    def n_classes(self) -> int:
        return len(self.training_classes)

    def preprocessing(self):
        from dermray.core.transforms import Preprocess

        return Preprocess(**self.preprocess) if self.preprocess else Preprocess()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict, source: str = "model card") -> "ModelCard":
        if not isinstance(data, dict):
            raise UserError(f"{source}: a model card must be a JSON object")
        data = dict(data)
        version = data.setdefault("schema_version", 1)
        if not isinstance(version, int) or version > CARD_SCHEMA_VERSION:
            raise UserError(f"{source}: model card schema_version {version!r} is newer than this dermray reads "
                            f"({CARD_SCHEMA_VERSION}): upgrade dermray")
        if version < 3:  # cards before 3 counted epochs from 0: read as this version's
            if isinstance(data.get("best_epoch"), int):
                data["best_epoch"] += 1
            data["schema_version"] = CARD_SCHEMA_VERSION
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "<card>"
            raise UserError(f"{source}: invalid model card: {where}: {err['msg']}") from None


def read_card(uri: str) -> ModelCard:
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise UserError(f"{storage.redact(uri)}: not valid JSON: {e}") from None
    return ModelCard.from_dict(data, storage.redact(uri))


INTENDED_USE = ("Research and engineering evaluation of skin-lesion classification from images (Esteva et al. 2017 "
                "reproduced with dermray). NOT FOR DIAGNOSIS: not a medical device, not validated for clinical use; "
                "its output must not inform the care of a patient.")
LICENCES = {"HAM10000": "CC BY-NC-SA 4.0 (non-commercial, attribution, share-alike)",
            "ISIC Archive": "per image, CC-0 or CC-BY (see each image's attribution)",
            "dermray synth": "synthetic images generated by dermray synth (no licence restrictions)"}
LIMITATIONS = (
    "Trained and evaluated on the images named in its lineage only: performance on another clinic's camera or "
    "dermoscope, on clinical photographs when trained on dermoscopy (or the reverse), or on skin tones the data "
    "lack is unknown until measured (dermray evaluate with a reference run or a cohort column).",
    "Operating points and calibration were chosen on out-of-fold predictions of these training data; a new "
    "population may need them chosen again.",
    "Saliency maps show what moves the model's output; they are not a localisation of disease.",
)


def render_markdown(card: ModelCard) -> str:
    """model_card.md: the card for a reviewer to read (templates/model_card.md.j2)."""
    d, td, v = card.description, card.description.get("training_data", {}), card.versions
    return render(
        "model_card.md.j2", model_id=card.model_id, intended_use=d.get("intended_use", INTENDED_USE),
        architecture=card.architecture, input_size=card.input_size, n_classes=card.n_classes,
        classes_hash=card.classes_hash, weights_sha256=card.weights_sha256, weights_source=card.weights_source,
        freeze=card.freeze, fold=card.fold, held_out_fold=card.held_out_fold, epochs_trained=card.epochs_trained,
        selection=card.selection, precision=card.precision or "fp32",
        preprocess=card.preprocess or {"color_constancy": "none"}, augmentation=card.augmentation or "geometric only",
        version=d.get("version", 1), dermray=v.get("dermray"), git_commit=v.get("git_commit"), ray=v.get("ray"),
        torch=v.get("torch"),
        data_sources=[{"name": s["name"], "images": f"{s['images']:,}", "licence": s["licence"]}
                      for s in d.get("data_sources", [])],
        training_data={"images": f"{td.get('images', 0):,}", "lesions": f"{td.get('lesions', 0):,}",
                       "classes": td.get("classes"), "folds": td.get("folds")} if td else None,
        operating_points=[{"task": p.task, "name": p.name, "threshold": f"{p.threshold:.4f}",
                           "sensitivity": f"{p.sensitivity:.3f}", "specificity": f"{p.specificity:.3f}"}
                          for p in card.operating_points],
        not_estimable=sorted(d.get("not_estimable", {}).items()), limitations=d.get("limitations", LIMITATIONS),
        lineage_id=card.lineage.get("id"), config_hash=card.config_hash, partition=card.lineage.get("partition"),
        changelog=changelog(card.changelog),
        **card_sections(d.get("cross_validation", []), card.calibration, card.test_metrics))


def card_sections(cv: list[dict], calibration: Calibration | None, test_metrics: list[dict]) -> dict:
    """The values of the parts a fold model's card and the ensemble's share (templates/card_*.md.j2): the
    cross-validation summary (mean and sd over the folds of each metric), the calibration, and the test results
    as evaluate wrote them back - each evaluation's cohorts beside the reference, and its headline (a null value
    shows its reason; a locked point that does not carry over says why)."""
    return {
        "cross_validation": [{"metric": r["metric"], "mean": fmt(r["mean"]), "sd": fmt(r["sd"]), "folds": r["folds"]}
                             for r in cv],
        "calibration": {"temperature": f"{calibration.temperature:.3f}", "nll_before": f"{calibration.nll_before:.3f}",
                        "nll_after": f"{calibration.nll_after:.3f}", "fitted_on": calibration.fitted_on}
        if calibration else None,
        "test_results": [{"evaluation": t["evaluation"], "model_id": t["model_id"],
                          "predictions": str(t["predictions"])[:12], "cohorts": external_rows(t["headline"]),
                          "headline": [headline_item(h) for h in t["headline"]
                                       if not h["subset"].startswith("cohort=")]}  # the cohorts are above
                         for t in test_metrics]}


def headline_item(h: dict) -> dict:
    """One headline row of a card's test results, its value and interval written out."""
    carries_over = h["metric"].startswith("carries_over@")
    return {"task": h["task"], "subset": h["subset"], "metric": h["metric"], "n": h["n"], "note": h.get("note"),
            "carries_over": carries_over, "locked_point": h["metric"].split("@locked:", 1)[-1],
            "value": (h.get("note") or "undefined") if h["value"] is None else f"{h['value']:.3f}",
            "ci": f" [{h['ci_low']:.3f}, {h['ci_high']:.3f}]" if h.get("ci_low") is not None else ""}


def changelog(entries: list[dict]) -> list[dict]:
    return [{"when": c.get("when"), "what": c.get("what")} for c in entries]


def write_card(card: ModelCard, fold_dir: str) -> str:
    """model_card.json (the record) and model_card.md (for people) in ``fold_dir``."""
    uri = storage.join(fold_dir, CARD_FILE)
    storage.write_text(uri, strict_json(card.to_dict()))
    storage.write_text(storage.join(fold_dir, CARD_MD), render_markdown(card))
    return uri


# ---- where models lie --------------------------------------------------------------------------------------------
def weights_uri(fold_dir: str) -> str:
    return storage.join(fold_dir, "best", "model.pt")


def _card_for(uri: str) -> tuple[str, ModelCard]:
    """(weights URI, model card) for a fold directory or a model.pt inside one."""
    if uri.endswith(".pt"):
        here = storage.parent(uri)
        candidates = [storage.join(here, CARD_FILE), storage.join(storage.parent(here), CARD_FILE)]
        weights = uri
    else:
        candidates = [storage.join(uri, CARD_FILE)]
        weights = weights_uri(uri)
    for c in candidates:
        if storage.exists(c):
            return weights, read_card(c)
    raise UserError(f"no {CARD_FILE} for checkpoint {storage.redact(uri)}: pass a fold directory written by "
                    "`dermray train` (…/train/<run>/fold=<k>), its best/model.pt, or the run directory")


def fold_dirs(run_dir: str, include_final: bool = False) -> list[str]:
    """The fold directories of a train run that hold a model card: the cross-validation folds (and the model
    trained on all folds only when asked, or when it is the only one)."""
    if not storage.exists(run_dir):
        return []
    cards = [c for c in storage.list_files(run_dir, (CARD_FILE,))
             if posixpath.basename(posixpath.dirname(c)).startswith("fold=")]
    final = f"fold={layout.FINAL_FOLD}/{CARD_FILE}"
    cv = [storage.parent(c) for c in cards if not c.endswith(final)]
    everything = [storage.parent(c) for c in cards]
    return everything if include_final or not cv else cv


def resolve_checkpoints(uris: list[str]) -> list[tuple[str, ModelCard]]:
    """Expand each URI (a fold directory, a model.pt, or a train run directory -> its cross-validation folds) to
    (weights URI, card) pairs."""
    out: list[tuple[str, ModelCard]] = []
    for uri in uris:
        uri = uri.strip().rstrip("/")
        if not uri:
            continue
        if not uri.endswith(".pt") and not storage.exists(storage.join(uri, CARD_FILE)):
            dirs = fold_dirs(uri)
            if not dirs:
                raise UserError(f"checkpoint {storage.redact(uri)}: no fold=<k>/{CARD_FILE} below it (is it a "
                                "`dermray train` output?)")
            out.extend(_card_for(d) for d in dirs)
        else:
            out.append(_card_for(uri))
    if not out:
        raise UserError("no checkpoint given: pass --checkpoint URI[,URI...] (config: score.checkpoints)")
    return out


# ---- ensembles ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ensemble:
    """The fold models to average: their weights files, what their cards say, and one model id that names them
    and their weights' content (``<run>/<fold or ensemble(...)>@<12 hex digits of the weights' sha256>``)."""
    weights: tuple[str, ...]
    cards: tuple[ModelCard, ...]
    weights_sha256: tuple[str, ...]
    model_id: str

    @property
    def first(self) -> ModelCard:
        return self.cards[0]

    @property
    def arch(self) -> str:
        return self.first.architecture

    @property
    def n_classes(self) -> int:
        return self.first.n_classes

    @property
    def size(self) -> int:
        return self.first.input_size

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.first.normalisation.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.first.normalisation.std)

    @property
    def classes_hash(self) -> str:
        return self.first.classes_hash

    @property
    def classes(self) -> list[dict]:
        return [c.model_dump() for c in self.first.training_classes]

    @property
    def weights_digest(self) -> str:
        """One sha256 over the members' weights (in order): what the model id's suffix abbreviates."""
        return sha256_hex("\n".join(self.weights_sha256).encode())


def _ensemble_name(cards: list[ModelCard]) -> str:
    ids = [c.model_id.split("@", 1)[0] for c in cards]
    if len(ids) == 1:
        return ids[0]
    runs = {i.rsplit("/", 1)[0] for i in ids}
    folds = ",".join(i.rsplit("fold=", 1)[-1] for i in ids)
    return f"{runs.pop() if len(runs) == 1 else 'models'}/ensemble(fold={folds})"


def load_ensemble(uris: list[str], name: str | None = None) -> Ensemble:
    """The ensemble of the models ``uris`` name (see ``resolve_checkpoints``); they must share training classes,
    architecture and input size. Each member is identified by its weights file's bytes (read here, and again when
    a worker loads them): a file that is not the one its card describes - another fold's weights copied over it,
    a retrain in place that did not finish - is refused, naming the file, instead of being taken for the card's
    model (then every stage after training would skip as unchanged, and lineage would hold, on other weights)."""
    pairs = resolve_checkpoints(uris)
    first_w, first = pairs[0]
    for w, c in pairs[1:]:
        for key in ("classes_hash", "architecture", "input_size"):
            if getattr(c, key) != getattr(first, key):
                raise UserError(f"checkpoints cannot be averaged: {storage.redact(w)} has {key} {getattr(c, key)!r}, "
                                f"{storage.redact(first_w)} has {getattr(first, key)!r}")
    shas = tuple(_verified_sha256(w, c) for w, c in pairs)
    cards = [c for _, c in pairs]
    ens = Ensemble(tuple(w for w, _ in pairs), tuple(cards), shas, "")
    base = (name or _ensemble_name(cards)).split("@", 1)[0]
    return Ensemble(ens.weights, ens.cards, shas, f"{base}@{ens.weights_digest[:12]}")


def _verified_sha256(weights: str, card: ModelCard) -> str:
    """sha256 of the weights file's bytes, checked against the card's (a card of version 1 records none)."""
    sha = weights_sha256(weights)
    if card.weights_sha256 and sha != card.weights_sha256:
        raise UserError(f"{storage.redact(weights)} is not the model its model card describes (its sha256 is "
                        f"{sha[:12]}, the card's {card.weights_sha256[:12]}): restore the file, or retrain the fold "
                        "(--force)")
    return sha


def load_member(ens: Ensemble, i: int, device=None):
    """Model ``i`` of the ensemble, in eval mode, from weights whose sha256 is checked against the card's: weights
    replaced after the card was written (a retrain in place, a copy gone wrong) are refused, not scored."""
    import io

    from dermray.store.models import build_model, state_dict_from_bytes

    data = storage.read_bytes(ens.weights[i])
    if sha256_hex(data) != ens.weights_sha256[i]:
        raise UserError(f"{storage.redact(ens.weights[i])}: the weights changed since they were identified "
                        f"(sha256 {sha256_hex(data)[:12]}, expected {ens.weights_sha256[i][:12]}): re-run the "
                        "stage so that it identifies the current model")
    state = state_dict_from_bytes(io.BytesIO(data), ens.weights[i])
    model = build_model(ens.arch, ens.n_classes, weights=state).eval()
    return model.to(device) if device is not None else model
