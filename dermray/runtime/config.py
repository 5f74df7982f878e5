"""Typed run configuration: YAML file + ``--set section.key=value`` overrides, validated when it loads.

Every key is declared here with its type, its allowed values or range, and the rules between keys (pydantic v2
models); a config that breaks one fails in ``load_config`` - before Ray starts - with one line naming the key and
the file. ``--set`` values are parsed as YAML scalars (``null``, numbers, booleans; a comma-separated string for a
list key). The stages receive these objects (the Ray Train worker too), never untyped dicts.

Why one module over 400 lines: one pydantic model per config section, in one file, so the whole schema reads
top to bottom and the CLI, the registry and the docs take it from one place.
"""
from __future__ import annotations

import copy
import functools
import re
import typing
from typing import Annotated, Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from dermray.errors import ConfigError
from dermray.runtime.registry import STAGES as STAGE_NAMES  # the registry: the one list of the stages


def _comma_list(value):
    """A list key given as one string (``--set score.checkpoints=a,b``) is split at commas."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip() != ""]
    return value


StrList = Annotated[List[str], BeforeValidator(_comma_list)]
IntList = Annotated[List[int], BeforeValidator(_comma_list)]
FloatList = Annotated[List[float], BeforeValidator(_comma_list)]

Arch = Literal["inception_v3", "efficientnet_lite0", "resnet50", "mobilenet_v3_small"]
ARCHS = typing.get_args(Arch)
# Feature stages of each architecture (models.ModelSpec.stages; a test keeps the two equal): train.freeze=K <= this.
FREEZE_STAGES = {"inception_v3": 12, "efficientnet_lite0": 9, "resnet50": 5, "mobilenet_v3_small": 13}
AMP = Literal["auto", "bf16", "fp16", "off"]
SaliencyMethod = Literal["gradient", "smoothgrad", "integrated_gradients", "gradcam"]
SALIENCY_METHODS = typing.get_args(SaliencyMethod)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_default=True)


class DataConfig(Section):
    manifest: Optional[str] = Field(None, description="URI of manifest.parquet")
    taxonomy: Optional[str] = Field(None, description="URI of taxonomy.parquet (or .csv in the ISIC path form)")
    tasks: Optional[str] = Field(None, description="URI of the evaluation tasks YAML")


class PartitionConfig(Section):
    max_class_size: int = Field(1000, ge=1, description=(
        "the paper's threshold: a node becomes a class below this many images"
    ))
    folds: int = Field(9, ge=2, le=100, description="cross-validation folds (the paper: 9)")
    seed: int = Field(0, description="seed of the fold assignment: the same seed gives the same folds")
    tasks_required: bool = Field(False, description=(
        "fail (rather than report) when a training class cannot be attributed to a task"
    ))
    near_duplicates: bool = Field(True, description=(
        "Near-duplicate images (the same picture under two ids) join one group before the folds are cut. The "
        "thresholds come from benchmarks/near_duplicates.py on HAM10000: at similarity 0.985, 7 pairs across its "
        "curated lesions (none between two diagnoses); every re-encoded, resized or cropped copy found (crops of "
        "0-5 % per side off-centre: 249 of 250)."
    ))
    near_duplicate_hamming: int = Field(10, ge=0, le=32, description=(
        "perceptual-hash bits a candidate pair may differ in"
    ))
    # 0.985, not 0.98, since the fine alignment (issue 28, finding 7): at 0.98 it paired 4 HAM10000 images of
    # different diagnoses, at 0.985 none (benchmarks/results/near_duplicates)
    near_duplicate_similarity: float = Field(0.985, gt=0, le=1, description=(
        "aligned pixel correlation that confirms a pair"
    ))
    near_duplicate_max_groups: int = Field(20, ge=2, description="groups one merged group may join (chaining guard)")


class TrainConfig(Section):
    partition: Optional[str] = Field(None, description="partition outputs (labels, training_classes, task_membership)")
    arch: Arch = Field("inception_v3", description=(
        "network: inception_v3 (the paper's), efficientnet_lite0, resnet50 or mobilenet_v3_small"
    ))
    weights: str = Field("imagenet", description="imagenet | none | URI of a state_dict")
    freeze: str = Field("none", description="none | head | K (the first K stages stay fixed)")
    image_size: Optional[int] = Field(None, ge=16, description="pixels; default: the model's (299 for inception_v3)")
    epochs: int = Field(60, ge=1, description="training epochs per fold")
    batch_size: int = Field(32, ge=2, description="batch norm cannot train on one image")
    optimizer: Literal["rmsprop", "adamw"] = Field("rmsprop", description="rmsprop: the paper")
    lr: float = Field(0.001, gt=0, description="learning rate (the paper: 1e-3)")
    lr_decay_epochs: int = Field(30, ge=1, description="the paper: divide the learning rate by 16 every 30 epochs")
    lr_decay_factor: float = Field(16.0, gt=0, description=(
        "the learning rate is divided by this every lr_decay_epochs (the paper: 16)"
    ))
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the optimizer")
    aux_loss_weight: float = Field(0.4, ge=0, description=(
        "inception_v3's auxiliary classifier, as torchvision trains it"
    ))
    folds: IntList = Field(default_factory=list, description="which folds to train; empty: all")
    final_model: bool = Field(False, description="also train one model on all folds (no validation)")
    use_gpu: bool = Field(False, description="each fold's Ray Train worker asks for one GPU")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each fold's Ray Train worker asks for")
    worker_resources: Dict[str, float] = Field(default_factory=dict, description=(
        "Custom Ray resources each fold's worker asks for ({\"trainer\": 1}: place folds on nodes that offer it)"
    ))
    data_cpus: float = Field(0.5, gt=0, description=(
        "CPUs per Ray Data decode/augment task (fractional: overlaps training)"
    ))
    torch_threads: Optional[int] = Field(None, ge=1, description="default: the worker's CPUs")
    channels_last: bool = Field(True, description=(
        "on CPU a training step ran 1.5-1.8x (mobilenet_v3_small) and 1.1-1.4x (inception_v3) faster channels_last "
        "(benchmarks/train_throughput.py, two runs); tensor-core GPUs want it too"
    ))
    amp: AMP = Field("auto", description=(
        "auto: bf16 on GPU; on CPU bf16 only where native and measured faster (dermray/runtime/precision.py)"
    ))
    max_minutes: Optional[float] = Field(None, gt=0, description=(
        "training-time budget per fold (stops mid-epoch if need be)"
    ))
    max_failures: int = Field(2, ge=0, description="worker deaths survived per fold (resumed from the last checkpoint)")
    keep_checkpoints: int = Field(2, ge=1, description="best N by checkpoint_metric, plus the latest")
    selection: Literal["inner", "last"] = Field("inner", description=(
        "Which epoch's weights are the fold's model. inner: the best checkpoint_metric on an inner, lesion-grouped "
        "split of the fold's training data (selection_fraction of its lesions, not trained on); the held-out fold only"
        " measures the chosen model, so the cross-validation estimate never saw the selection. last: the last epoch."
    ))
    selection_fraction: float = Field(0.1, gt=0, le=0.5, description=(
        "share of each fold's training lesions in the inner selection split (selection: inner)"
    ))
    checkpoint_metric: str = Field("loss", description=(
        "on the selection split: loss | top1 | acc_<task>; or train_loss | train_top1"
    ))
    max_pixels: int = Field(50_000_000, ge=1, description=(
        "images with more pixels are refused before they are decoded (decompression-bomb guard)"
    ))
    seed: int = Field(0, description="seed of the selection split, augmentation and sampling")
    force: bool = Field(False, description=(
        "a fold whose checkpoints have another lineage is trained afresh instead of refused"
    ))
    balance: Literal["none", "source", "modality"] = Field("none", description=(
        "Balanced sampling: each epoch's training rows drawn so that every source (or modality) weighs the same (the "
        "smaller ones repeated); none: every image once"
    ))

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v: str) -> str:
        if v in ("none", "head") or re.fullmatch(r"\d+", v):
            return v
        raise ValueError("must be none, head or a number of stages")

    @field_validator("checkpoint_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        v = v[len("val_"):] if v.startswith("val_") else v  # the older name: measured on the validation data
        if v in ("loss", "top1", "train_loss", "train_top1") or re.fullmatch(r"acc_\w+", v):
            return v
        raise ValueError("must be loss, top1, acc_<task> (on the selection split), train_loss or train_top1")

    @model_validator(mode="after")
    def _freeze_depth(self):
        if self.freeze.isdigit() and int(self.freeze) > FREEZE_STAGES[self.arch]:
            raise ValueError(f"freeze: {self.arch} has {FREEZE_STAGES[self.arch]} stages, got {self.freeze}")
        return self


class TransformsConfig(Section):
    """How images are prepared (``dermray/core/transforms.py``). color_constancy applies in training, scoring and
    saliency alike and is recorded in the model card; scoring uses the card's ("auto") and refuses another. The
    photometric augmentation applies in training only."""
    color_constancy: Literal["auto", "none", "shades_of_gray"] = Field("auto", description=(
        "auto: training shades_of_gray, scoring the card's"
    ))
    color_constancy_power: float = Field(6.0, ge=1, description="the Minkowski norm of shades-of-grey colour constancy")
    photometric: bool = Field(True, description=(
        "photometric augmentation in training (brightness, contrast, saturation, hue, blur, JPEG)"
    ))
    brightness: float = Field(0.2, ge=0, lt=1, description="factor in [1 - b, 1 + b]")
    contrast: float = Field(0.2, ge=0, lt=1, description="factor in [1 - c, 1 + c]")
    saturation: float = Field(0.2, ge=0, lt=1, description="factor in [1 - s, 1 + s]")
    hue: float = Field(0.02, ge=0, le=0.5, description="share of the hue circle")
    blur_sigma: float = Field(1.0, ge=0, description="pixels, at the image's own size")
    jpeg_quality_min: int = Field(60, ge=10, le=100, description="lowest JPEG quality of the re-encoding augmentation")
    photometric_p: float = Field(0.8, ge=0, le=1, description="probability of each operation")

    def preprocess(self, card: dict | None = None):
        """The preprocessing: for training (card None) "auto" means shades_of_gray; for scoring the card's."""
        from dermray.core.transforms import Preprocess

        if card is not None:
            return card_preprocess(self.color_constancy, card)
        cc = "shades_of_gray" if self.color_constancy == "auto" else self.color_constancy
        return Preprocess(cc, self.color_constancy_power)

    def augmentation(self):
        from dermray.core.transforms import Photometric

        if not self.photometric:
            return Photometric()
        return Photometric(self.brightness, self.contrast, self.saturation, self.hue, self.blur_sigma,
                           self.jpeg_quality_min, self.photometric_p)


def card_preprocess(color_constancy: str, card: dict):
    """The preprocessing a model card records, for scoring and saliency: ``color_constancy`` (the config's
    transforms.color_constancy) must be auto or the card's."""
    from dermray.core.transforms import Preprocess
    from dermray.errors import UserError

    recorded = Preprocess(**card) if card else Preprocess()
    if color_constancy not in ("auto", recorded.color_constancy):
        raise UserError(f"transforms.color_constancy is {color_constancy!r} but the model was trained with "
                        f"{recorded.color_constancy!r} (its model card): leave it at auto to score as it was trained")
    return recorded


class EvaluateConfig(Section):
    predictions: Optional[str] = Field(None, description="predictions Parquet URI (file or folder)")
    partition: Optional[str] = Field(None, description=(
        "partition outputs (task_membership); default: the predictions' lineage"
    ))
    readers: Optional[str] = Field(None, description="readers table: reader_id, image_id, task, decision and/or score")
    compare: Optional[str] = Field(None, description="another run's predictions: DeLong test of the AUC difference")
    reference: Optional[str] = Field(None, description=(
        "External validation: the AUC on these predictions against a reference cohort's, with the difference and its "
        "CI (lesions resampled in each cohort apart). reference: the internal test set's predictions; or cohort: a "
        "column of these predictions naming each image's cohort, reference_cohort the one the others are compared to"
    ))
    cohort: Optional[str] = Field(None, description=(
        "a column of these predictions naming each image's cohort (external validation)"
    ))
    reference_cohort: Optional[str] = Field(None, description="the cohort the others are compared to (with cohort)")
    model_id: Optional[str] = Field(None, description="which model's predictions, when the table holds several")
    subgroups: StrList = Field(default_factory=list, description="columns; \"age:0/40/60/120\" bins a numeric column")
    thresholds: FloatList = Field(default_factory=lambda: [0.5], description=(
        "fixed score thresholds at which the rates are reported (without CIs)"
    ))
    target_sensitivity: float = Field(0.95, gt=0, le=1, description=(
        "the sensitivity of the locked target-sensitivity operating point (sens0.95)"
    ))
    rate_floor: float = Field(0.10, ge=0, lt=1, description=(
        "A locked operating point whose test sensitivity or specificity falls below this (or outside its out-of-fold "
        "interval) is flagged: it does not carry over to these data (carries_over@locked:<point> = 0, with the reason)"
    ))
    n_bootstrap: int = Field(1000, ge=10, description="lesion-bootstrap resamples for every confidence interval")
    ci_level: float = Field(0.95, gt=0, lt=1, description="level of the confidence intervals")
    seed: int = Field(0, description="seed of the bootstrap resamples")
    calibration_bins: int = Field(10, ge=2, description="bins of the reliability curve and the ECE")
    train_overlap: bool = Field(True, description=(
        "Test images that are near-duplicates of the partition's training images (its method and thresholds): counted,"
        " listed in train_overlap.parquet, and every metric computed again without them (subset no_train_overlap)"
    ))
    distributed: bool = Field(False, description=(
        "AUCs from per-block score histograms over Ray Data (inputs larger than memory)"
    ))
    histogram_bins: int = Field(65536, ge=16, description="score-histogram bins of the distributed evaluation")

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        bad = [t for t in v if not 0 <= t <= 1]
        if bad:
            raise ValueError(f"every threshold must lie in [0, 1] ({bad[0]} does not)")
        return v


class ScoreConfig(Section):
    checkpoints: StrList = Field(default_factory=list, description=(
        "fold dirs, model.pt files or a train run dir (ensemble)"
    ))
    input: Optional[str] = Field(None, description=(
        "manifest Parquet | folder/prefix of images | .tar shard(s) (WebDataset layout)"
    ))
    input_kind: Literal["auto", "manifest", "folder", "webdataset"] = Field("auto", description=(
        "what score.input is; auto: .parquet a manifest, .tar, .txt or a {000..099} pattern shards, a folder "
        "holding .tar files shards, else a folder of images"
    ))
    labels: Optional[str] = Field(None, description=(
        "folder input: CSV/Parquet with image_id and label columns (optional)"
    ))
    partition: Optional[str] = Field(None, description=(
        "task_membership for task columns; default: the model card's partition"
    ))
    model_id: Optional[str] = Field(None, description=(
        "default: from the model card(s); the weights' hash is always appended"
    ))
    batch_size: int = Field(32, ge=1, description="images per model forward")
    actors: int = Field(1, ge=1, description="model replicas (Ray Data actor pool size)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per model actor")
    num_gpus: float = Field(0.0, ge=0, description="per actor; > 0 runs the models on GPU")
    actor_resources: Dict[str, float] = Field(default_factory=dict, description="custom Ray resources per model actor")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs per decode task (fractional: decoding overlaps inference)")
    torch_threads: Optional[int] = Field(None, ge=1, description="default: the node's CPUs shared between the actors")
    channels_last: bool = Field(True, description="faster on CPU (+40 % for inception_v3 here) and on tensor-core GPUs")
    tta: Literal["none", "flips", "dihedral"] = Field("none", description="test-time augmentation views averaged")
    amp: AMP = Field("off", description=(
        "bf16 scored EfficientNet-Lite0 2.1x faster on this AVX512_BF16 CPU (inception_v3 1.3x on an H100) but moved "
        "probabilities by up to 0.15 (top-1 agreement 92 % on ImageNet's classes), so the published numbers stay fp32 "
        "unless asked; auto measures as train.amp does (dermray/runtime/precision.py)"
    ))
    compile: Literal["auto", "on", "off"] = Field("auto", description=(
        "torch.compile the models (the model alone, benchmarks/score_throughput.py: 1.97x EfficientNet-Lite0, 1.28x "
        "inception_v3 on this CPU, probabilities within 3e-6 of eager); it costs 5-25 s per model and actor, so auto "
        "compiles only when at least score.COMPILE_MIN_IMAGES images per actor are left to score"
    ))
    incremental: bool = Field(False, description="score only images this model_id has not scored in this run yet")
    operating_point: Optional[str] = Field(None, description=(
        "Which locked operating point of the model card gives <task>_positive: its name (sens0.95, youden, "
        "readers_specificity); default: the first locked for each task (the target sensitivity)"
    ))
    calibrate: bool = Field(True, description=(
        "apply the model card's temperature (probs_raw keeps the uncalibrated ensemble mean)"
    ))
    rows_per_file: int = Field(10000, ge=1, description=(
        "images per predictions part file (also the unit of resumption)"
    ))
    max_pixels: int = Field(50_000_000, ge=1, description=(
        "images with more pixels are refused before they are decoded (decompression-bomb guard)"
    ))


def _default_saliency_methods() -> list[SaliencyMethod]:
    return ["gradient"]


class SaliencyConfig(Section):
    checkpoints: StrList = Field(default_factory=list, description="one model: a fold directory or its best/model.pt")
    predictions: Optional[str] = Field(None, description=(
        "predictions Parquet (file or folder) with image_id, probs, label, uri"
    ))
    methods: Annotated[List[SaliencyMethod], BeforeValidator(_comma_list)] = Field(
        default_factory=_default_saliency_methods, min_length=1,
        description="attribution methods: gradient (the paper's), smoothgrad, integrated_gradients, gradcam")
    target: Literal["positive", "predicted", "training_class"] = Field("positive", description=(
        "what a map explains: the task's positive class, the predicted task class, or the top training class"
    ))
    tasks: StrList = Field(default_factory=list, description="which tasks; default: every binary task")
    select: Literal["top_bottom", "misclassified", "ids"] = Field("top_bottom", description=(
        "which images: the top-k and bottom-k scored per task, the misclassified, or image_ids"
    ))
    k: int = Field(8, ge=1, description="images per task and end (top_bottom) or per task (misclassified)")
    image_ids: StrList = Field(default_factory=list, description="select=ids")
    masks: Optional[str] = Field(None, description=(
        "lesion-mask URI pattern with {image_id}, e.g. .../masks/{image_id}_segmentation.png"
    ))
    partition: Optional[str] = Field(None, description="task_membership; default: the model card's partition")
    sanity: bool = Field(True, description="model-parameter randomisation test on the audit set")
    audit_size: int = Field(6, ge=1, description="images in the sanity audit set (the first selected, by image_id)")
    sanity_levels: int = Field(4, ge=1, description="randomisation levels from the head down to the whole network")
    flag_similarity: float = Field(0.5, ge=0, le=1, description=(
        "flag a method whose fully randomised maps correlate above"
    ))
    smooth_samples: int = Field(16, ge=1, description="noisy samples averaged by smoothgrad")
    smooth_noise: float = Field(0.15, ge=0, description="noise sd as a share of the input's range")
    ig_steps: int = Field(32, ge=1, description="integration steps of integrated_gradients")
    batch_size: int = Field(4, ge=1, description="images per attribution batch")
    actors: int = Field(1, ge=1, description="model replicas (Ray Data actor pool size)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per model actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; > 0 computes the maps on GPU")
    torch_threads: Optional[int] = Field(None, ge=1, description=(
        "torch threads per actor; default: the node's CPUs shared between the actors"
    ))
    seed: int = Field(0, description="seed of smoothgrad's noise")

    @model_validator(mode="after")
    def _ids_given(self):
        if self.select == "ids" and not self.image_ids:
            raise ValueError("select: ids needs saliency.image_ids")
        if self.masks and "{image_id}" not in self.masks:
            raise ValueError("masks: the pattern must contain {image_id}")
        return self


class PipelineConfig(Section):
    # The names come from the stage registry at import time: a Literal mypy cannot see through.
    stages: Annotated[List[Literal[STAGE_NAMES]], BeforeValidator(_comma_list)] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(STAGE_NAMES), min_length=1,
        description="the stages to run, in the pipeline's order")
    test_manifest: Optional[str] = Field(None, description=(
        "held-out images to score and evaluate (the paper's test sets)"
    ))
    biopsy_only: bool = Field(True, description="score and evaluate only the biopsy-proven test images")
    force: bool = Field(False, description="re-run stages whatever their recorded lineage")


class NightlyConfig(Section):
    date: Optional[str] = Field(None, description="YYYY-MM-DD of this night's metrics partition; default: today (UTC)")
    min_auc: Dict[str, float] = Field(default_factory=dict, description="task -> floor; missed -> the job fails")
    auc_subset: str = Field("all", description="which subset's AUC the floors apply to (e.g. biopsy)")
    max_quarantined_share: Optional[float] = Field(None, ge=0, le=1, description=(
        "of tonight's input; above it -> fails"
    ))

    @field_validator("date")
    @classmethod
    def _date(cls, v: Optional[str]) -> Optional[str]:
        import datetime as dt

        if v is None:
            return v
        try:
            dt.date.fromisoformat(v)
        except ValueError:
            raise ValueError("must be YYYY-MM-DD") from None
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
            raise ValueError("must be YYYY-MM-DD")
        return v


class StorageConfig(Section):
    retries: int = Field(5, ge=0, description=(
        "more attempts after a transient read error (connection, timeout, S3 5xx)"
    ))
    retry_base_s: float = Field(0.25, gt=0, description="first backoff; doubled per attempt, at most 8 s")
    shared_filesystem: bool = Field(False, description=(
        "A local output or image path is on a filesystem every node mounts (NFS, a CSI volume): allowed on a cluster "
        "of several nodes, where node-local paths are refused."
    ))

    def retry(self):
        from dermray.store.storage import Retry

        return Retry(retries=self.retries, base_s=self.retry_base_s)


class RayConfig(Section):
    address: Optional[str] = Field(None, description=(
        "None: in-process local Ray; else a cluster address (or RAY_ADDRESS)"
    ))
    num_cpus: Optional[int] = Field(None, ge=1, description="for the in-process local Ray only")


class RunConfig(Section):
    run_id: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._=/-]*$", description=(
        "the run's name: every stage writes under <output>/<stage folder>/<run_id>/"
    ))
    output: str = Field("outputs", min_length=1, description="output root: a local path or an s3:// URI")
    data: DataConfig = Field(default_factory=DataConfig, description="the input tables")
    partition: PartitionConfig = Field(default_factory=PartitionConfig, description=(
        "the partition stage: training classes and folds"
    ))
    train: TrainConfig = Field(default_factory=TrainConfig, description=(
        "the train stage: one model per cross-validation fold"
    ))
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description=(
        "the evaluate stage: metrics with CIs and the report"
    ))
    score: ScoreConfig = Field(default_factory=ScoreConfig, description=(
        "the score stage: the fold ensemble's predictions"
    ))
    saliency: SaliencyConfig = Field(default_factory=SaliencyConfig, description=(
        "the saliency stage: attribution maps and their sanity checks"
    ))
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description=(
        "dermray pipeline: the stages in one Ray session"
    ))
    nightly: NightlyConfig = Field(default_factory=NightlyConfig, description=(
        "dermray nightly: incremental scoring and quality floors"
    ))
    transforms: TransformsConfig = Field(default_factory=TransformsConfig, description=(
        "how images are prepared (colour constancy, augmentation)"
    ))
    storage: StorageConfig = Field(default_factory=StorageConfig, description=(
        "storage by URI: retries and shared filesystems"
    ))
    ray: RayConfig = Field(default_factory=RayConfig, description="which Ray to run on")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return v

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# ---- errors ------------------------------------------------------------------------------------------------------
_TYPE_WORDS = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "a list",
               "dict": "a mapping", "model": "a mapping"}


def _section_at(loc: tuple) -> type[BaseModel] | None:
    cls: Any = RunConfig
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return cls


def unknown_key(source: str, key: str, parent: Sequence[str], known: Iterable[str], rest: Sequence[str] = ()
                ) -> str:
    """One line for ``key``, whose part after ``parent`` (then ``rest``) the config does not have: the nearest known
    key when one is close ("did you mean"), else the keys known under that section."""
    import difflib

    known = list(known)
    part = key.split(".")[len(parent)]
    close = difflib.get_close_matches(part, known, n=1, cutoff=0.75)
    if close:
        return f"{source}: unknown key {key!r}: did you mean {'.'.join([*parent, close[0], *rest])!r}?"
    return f"{source}: unknown key {key!r} (known under {'.'.join(parent) or 'the top level'}: {', '.join(known)})"


def _message(err: Mapping[str, Any], source: str) -> str:
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    key = ".".join(loc) or "<top>"
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        section = _section_at(parent)
        return unknown_key(source, key, parent, section.model_fields if section else ())
    for word, name in _TYPE_WORDS.items():
        if kind in (f"{word}_type", f"{word}_parsing", f"{word}_from_float"):
            return f"{source}: key {key!r} must be {name}, got {value!r}"
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{source}: key {key!r} must be one of {allowed}, got {value!r}"
    msg = err["msg"]
    if kind == "value_error" and isinstance(value, dict):
        # A rule between keys (a model validator) says "<key>: what is wrong".
        msg = msg[len("Value error, "):]
        field, _, msg = msg.partition(": ")
        return f"{source}: key {'.'.join(loc + (field,))!r}: {msg}"
    msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg[0].lower() + msg[1:]
    return f"{source}: key {key!r}: {msg}, got {value!r}"


def validate(tree: dict, source: str) -> RunConfig:
    """A RunConfig from a nested dict, or a ConfigError naming the first bad key and ``source``."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys, got {type(tree).__name__}")
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_message(e.errors()[0], source)) from None


# ---- overrides ---------------------------------------------------------------------------------------------------
def _field_type(cls: type[BaseModel], name: str):
    return cls.model_fields[name].annotation


def _is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp):
    """The type inside Annotated[...] and Optional[...]."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) and args:
        tp = args[0]
    return tp


def _takes_raw_string(tp) -> bool:
    """Keys whose value is text take what follows ``=`` as it is: "001" stays "001" and "off" stays "off" (YAML
    would read a number and a boolean); list keys split it at commas."""
    tp = _unwrap(tp)
    if tp is str or typing.get_origin(tp) in (list, List):
        return True
    return typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))


_TEXT = object()  # _apply_override: the value is the text after "=", parsed as YAML


def _apply_override(tree: dict, assignment: str, value: Any = _TEXT) -> None:
    """Set one key of ``tree``: ``assignment`` is ``key=value`` text (the value parsed as YAML), or the bare key
    with ``value`` given as it is (a typed command-line flag: ``--run-id null`` is the run id "null")."""
    if value is _TEXT and "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1) if value is _TEXT else (assignment, "")
    parts = key.strip().split(".")
    node, cls = tree, RunConfig
    for i, part in enumerate(parts):
        if part not in cls.model_fields:
            raise ConfigError(unknown_key("--set", key, parts[:i], cls.model_fields, parts[i + 1:]))
        tp = _field_type(cls, part)
        if i == len(parts) - 1:
            if _is_section(tp):
                raise ConfigError(f"--set: key {key!r} is a section; set one of its keys")
            if value is not _TEXT:
                node[part] = value
                return
            parsed = yaml.safe_load(raw) if raw.strip() else ""
            raw_text = _takes_raw_string(tp) and parsed is not None and not isinstance(parsed, list)
            node[part] = raw if raw_text else parsed
        else:
            if not _is_section(tp):
                raise ConfigError(f"--set: key {'.'.join(parts[:i + 1])!r} is not a section")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, cls = node[part], tp


def load_config(path: str | None = None, overrides: list[str] | None = None, values: dict | None = None
                ) -> RunConfig:
    """Load and validate a RunConfig from a YAML file (local path or URI), ``key=value`` overrides (``--set``), then
    ``values`` (dotted key -> value, as typed: the commands' own flags)."""
    from dermray.store import storage

    tree: dict = {}
    source = "--set"
    if path:
        source = path
        try:
            tree = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(tree).__name__}")
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    for key, value in (values or {}).items():
        _apply_override(tree, key, value)
    if (overrides or values) and path:
        source = f"{path} (with --set)"
    return validate(tree, source)


def derive(cfg: RunConfig, changes: dict) -> RunConfig:
    """``cfg`` with ``changes`` (a nested dict: {"score": {"input": ...}}) applied and the result validated again:
    how the pipeline and the nightly job wire one stage's outputs into the next stage's config."""
    tree = cfg.model_dump()

    def merge(into: dict, new: dict) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = copy.deepcopy(v)

    merge(tree, changes)
    return validate(tree, "derived config")


def default_value(key: str) -> Any:
    """The default of config key ``key`` ("train.epochs"), as a run without a config file gets it; None when the
    key is unset by default (or unknown)."""
    node: Any = _defaults()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def description(key: str) -> str | None:
    """The description of config key ``key`` ("train.epochs") as its ``Field(description=...)`` gives it: the text
    the docs' configuration reference (docs/generate.py) and the commands' --help show. None for an unknown key."""
    cls: Any = RunConfig
    *sections, name = key.split(".")
    for part in sections:
        if part not in cls.model_fields or not _is_section(cls.model_fields[part].annotation):
            return None
        cls = cls.model_fields[part].annotation
    field = cls.model_fields.get(name)
    return field.description if field is not None else None


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    return load_config(None).to_dict()
