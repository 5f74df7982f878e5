"""Typed run configuration: YAML file + ``--set section.key=value`` overrides.

Every key is declared here with its type; an unknown or mistyped key is an error that names the key and the file.
Later stages add their own section dataclass to ``RunConfig``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from dermray.errors import ConfigError


@dataclass
class DataConfig:
    manifest: Optional[str] = None  # URI of manifest.parquet
    taxonomy: Optional[str] = None  # URI of taxonomy.parquet (or .csv in the ISIC path form)
    tasks: Optional[str] = None  # URI of the evaluation tasks YAML


@dataclass
class PartitionConfig:
    max_class_size: int = 1000  # the paper's threshold: a node becomes a class below this many images
    folds: int = 9  # cross-validation folds (the paper: 9)
    seed: int = 0  # fold assignment is deterministic for a seed
    tasks_required: bool = False  # fail (rather than report) when a training class cannot be attributed to a task


@dataclass
class TrainConfig:
    partition: Optional[str] = None  # partition outputs (labels, training_classes, task_membership)
    arch: str = "inception_v3"  # inception_v3 | efficientnet_lite0 | resnet50 | mobilenet_v3_small
    weights: str = "imagenet"  # imagenet | none | URI of a state_dict
    freeze: str = "none"  # none | head | K (the first K stages stay fixed)
    image_size: Optional[int] = None  # pixels; default: the model's (299 for inception_v3)
    epochs: int = 60
    batch_size: int = 32
    optimizer: str = "rmsprop"  # rmsprop (the paper) | adamw
    lr: float = 0.001
    lr_decay_epochs: int = 30  # the paper: divide the learning rate by 16 every 30 epochs
    lr_decay_factor: float = 16.0
    weight_decay: float = 0.0
    aux_loss_weight: float = 0.4  # inception_v3's auxiliary classifier, as torchvision trains it
    folds: List[int] = field(default_factory=list)  # which folds to train; empty: all
    final_model: bool = False  # also train one model on all folds (no validation)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    data_cpus: float = 0.5  # CPUs per Ray Data decode/augment task (fractional: decoding overlaps training)
    torch_threads: Optional[int] = None  # default: the worker's CPUs
    # on CPU a training step ran 1.5-1.8x (mobilenet_v3_small) and 1.1-1.4x (inception_v3) faster channels_last
    # (benchmarks/train_throughput.py, two runs); tensor-core GPUs want it too
    channels_last: bool = True
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    max_minutes: Optional[float] = None  # training-time budget per fold: stop (mid-epoch if need be) when spent
    max_failures: int = 2  # worker deaths survived per fold (resumed from the last checkpoint)
    keep_checkpoints: int = 2  # best N by checkpoint_metric, plus the latest
    checkpoint_metric: str = "val_loss"
    max_pixels: int = 50_000_000
    seed: int = 0


@dataclass
class EvaluateConfig:
    predictions: Optional[str] = None  # predictions Parquet URI (file or folder)
    partition: Optional[str] = None  # partition outputs (task_membership); default <output>/partition
    readers: Optional[str] = None  # readers table: reader_id, image_id, task, decision and/or score
    compare: Optional[str] = None  # another run's predictions: DeLong test of the AUC difference
    model_id: Optional[str] = None  # which model's predictions, when the table holds several
    subgroups: List[str] = field(default_factory=list)  # columns; "age:0/40/60/120" bins a numeric column
    thresholds: List[float] = field(default_factory=lambda: [0.5])
    target_sensitivity: float = 0.95
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    calibration_bins: int = 10
    distributed: bool = False  # AUCs from per-block score histograms over Ray Data (inputs larger than memory)
    histogram_bins: int = 65536


@dataclass
class ScoreConfig:
    checkpoints: List[str] = field(default_factory=list)  # fold dirs, model.pt files or a train run dir (ensemble)
    input: Optional[str] = None  # manifest Parquet | folder/prefix of images | .tar shard(s) (WebDataset layout)
    input_kind: str = "auto"  # auto | manifest | folder | webdataset
    labels: Optional[str] = None  # folder input: CSV/Parquet with image_id and label columns (optional)
    partition: Optional[str] = None  # task_membership for task columns; default <output>/partition
    model_id: Optional[str] = None  # default: from the model card(s)
    batch_size: int = 32  # images per model forward
    actors: int = 1  # model replicas (Ray Data actor pool size)
    cpus_per_actor: float = 1.0
    num_gpus: float = 0.0  # per actor; > 0 runs the models on GPU
    decode_cpus: float = 0.5  # CPUs per decode task (fractional: decoding overlaps inference)
    torch_threads: Optional[int] = None  # default: the node's CPUs shared between the actors
    channels_last: bool = True  # faster on CPU (+40 % for inception_v3 here) and on tensor-core GPUs
    tta: str = "none"  # test-time augmentation averaged: none | flips (3 views) | dihedral (8 views)
    # off | bf16 | fp16 | auto (bf16 on GPU, off on CPU): bf16 scored inception_v3 1.3x faster on an H100 but
    # moved probabilities by up to a few hundredths, so the published numbers stay fp32 unless asked
    amp: str = "off"
    incremental: bool = False  # score only images this model_id has not scored in this run yet
    rows_per_file: int = 10000  # images per predictions part file (also the unit of resumption)
    max_pixels: int = 50_000_000


@dataclass
class SaliencyConfig:
    checkpoints: List[str] = field(default_factory=list)  # one model: a fold directory or its best/model.pt
    predictions: Optional[str] = None  # predictions Parquet (file or folder) with image_id, probs, label, uri
    methods: List[str] = field(default_factory=lambda: ["gradient"])  # gradient | smoothgrad | integrated_gradients | gradcam
    target: str = "positive"  # positive (the task's positive class) | predicted (task class) | training_class
    tasks: List[str] = field(default_factory=list)  # which tasks; default: every binary task
    select: str = "top_bottom"  # top_bottom | misclassified | ids
    k: int = 8  # images per task and end (top_bottom) or per task (misclassified)
    image_ids: List[str] = field(default_factory=list)  # select=ids
    masks: Optional[str] = None  # lesion-mask URI pattern with {image_id}, e.g. .../masks/{image_id}_segmentation.png
    partition: Optional[str] = None  # task_membership; default <output>/partition
    sanity: bool = True  # model-parameter randomisation test on the audit set
    audit_size: int = 6  # images in the sanity audit set (the first selected, by image_id)
    sanity_levels: int = 4  # randomisation levels from the head down to the whole network
    flag_similarity: float = 0.5  # flag a method whose fully randomised maps still correlate above this
    smooth_samples: int = 16
    smooth_noise: float = 0.15  # noise sd as a share of the input's range
    ig_steps: int = 32
    batch_size: int = 4
    actors: int = 1
    cpus_per_actor: float = 1.0
    num_gpus: float = 0.0
    torch_threads: Optional[int] = None
    seed: int = 0


@dataclass
class PipelineConfig:
    stages: List[str] = field(default_factory=lambda: ["partition", "train", "score", "evaluate", "saliency"])
    test_manifest: Optional[str] = None  # held-out images to score and evaluate (the paper's test sets)
    biopsy_only: bool = True  # score and evaluate only the biopsy-proven test images
    force: bool = False  # re-run stages whose outputs exist


@dataclass
class NightlyConfig:
    date: Optional[str] = None  # YYYY-MM-DD of this night's metrics partition; default: today (UTC)
    min_auc: Dict[str, float] = field(default_factory=dict)  # task -> floor; missed -> the job fails
    auc_subset: str = "all"  # which subset's AUC the floors apply to (e.g. biopsy)
    max_quarantined_share: Optional[float] = None  # of tonight's input; above it -> the job fails


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: in-process local Ray; else a cluster address (or RAY_ADDRESS)
    num_cpus: Optional[int] = None  # for the in-process local Ray only


@dataclass
class RunConfig:
    run_id: str = "default"
    output: str = "outputs"
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Check (and, for strings from --set, convert) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if isinstance(value, list):
            return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin in (dict, typing.Dict):
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{source}: key {key!r} must be {_type_name(tp)}, got {value!r}")


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: key {prefix.rstrip('.') or '<top>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix + str(unknown[0])!r} "
                          f"(known under {prefix.rstrip('.') or 'the top level'}: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, source)
    return cls(**kwargs)


def _apply_override(tree: dict, assignment: str, cls=RunConfig) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node_cls)
        if part not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"--set: unknown key {key!r} (known under {'.'.join(parts[:i]) or 'the top level'}: "
                              f"{known})")
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"--set: key {key!r} is a section; set one of its keys")
            # YAML parsing gives null/true/numbers/lists; typed coercion then checks it.
            parsed = yaml.safe_load(raw) if raw.strip() else ""
            node[part] = raw if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                              and str in typing.get_args(tp) and parsed is not None) else parsed
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"--set: key {'.'.join(parts[:i + 1])!r} is not a section")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            node_cls = tp


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from a YAML file (local or URI) and ``key=value`` overrides."""
    from dermray import storage

    tree: dict = {}
    source = "--set"
    if path:
        source = path
        try:
            text = storage.read_text(path)
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(tree).__name__}")
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    return _build(RunConfig, tree, "", source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
