"""The stages, declared once. Each stage is one ``StageSpec`` in ``REGISTRY``: its name (also its command), the
folder it writes under ``<output>/<folder>/<run_id>/``, its summary file, the config keys that name the files and
folders it reads, the config it reads, and the command-line flags of its command. The CLI's stage commands, the
pipeline, ``layout``, ``jobpaths`` (which paths must exist inside a Ray job), the config's list of stage names,
``dermray lineage`` and the stage contract suite (tests/stage/test_stage_contract.py) all read this list.

Every stage module has the same interface:

- ``STAGE``: its name;
- ``run(cfg) -> dict``: do the work, write the outputs under ``layout.stage_dir(output, STAGE, run_id)`` and a
  summary (with its ``lineage``), return the summary;
- ``lineage_now(cfg, recorded) -> Lineage``: the lineage ``run`` would record now, computed from the inputs
  without doing the work (``recorded`` lets it trust an input whose storage identity is unchanged);
- ``counts(summary) -> {"in", "out", "quarantined", "seconds"}``;
- ``format_summary(summary) -> str``: the lines a person reads.

``run`` and ``lineage_now`` go through this module (``run``, ``lineage_now`` below), which hands the stage a
``ConfigView``: the sections and keys the stage declared in ``reads``, and nothing else. A read of anything else
raises ``UndeclaredConfigRead`` - in the tests, which run every stage through here, not in a user's run months
later as an output computed from a setting its lineage never saw. A stage's lineage takes its settings from the
same declaration (``stage_lineage``): every declared value but its inputs (fingerprinted by content) and its
``tuning``, so what a stage may read is what its lineage holds.

No dermray imports at module level: ``config`` and ``layout`` read the registry.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dermray.store.summaries import StageSummary

# What every stage reads: where its outputs go and how it reaches Ray and storage.
COMMON_READS = ("run_id", "output", "ray", "storage")
_DEFINITIONS = ("data.tasks", "data.taxonomy")


@dataclass(frozen=True)
class StageSpec:
    name: str  # the stage, its module (dermray.<name>) and its command (dermray <name>)
    folder: str  # <output>/<folder>/<run_id>/
    summary_file: str
    # Config keys naming the files and folders the stage reads (all must exist when it runs; lists entry by entry)
    inputs: tuple[str, ...]
    # The config it reads: whole sections ("train") or single keys ("evaluate.target_sensitivity"), beyond
    # COMMON_READS. What it does not list it cannot read (ConfigView).
    reads: tuple[str, ...]
    # Its command's own flags: argparse dest -> config key
    flags: dict[str, str] = field(default_factory=dict)
    # Input keys the pipeline sets itself (wired from the previous stages' outputs)
    wired: tuple[str, ...] = ()
    # Its summary's record in dermray/store/summaries.py (what ``run`` returns and the summary file holds)
    summary_type: str = ""
    # Keys of ``reads`` that change how fast or where the stage runs, never what it writes (resources, batch sizes,
    # parallelism, "resume or refuse"). Every other declared value is in the stage's lineage (``stage_lineage``).
    tuning: tuple[str, ...] = ()

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"dermray.stages.{self.name}")

    @property
    def summary_record(self) -> type[StageSummary]:
        from dermray.store import summaries

        return getattr(summaries, self.summary_type)


# Resources and placement: where and how fast, never what is computed.
_ACTORS = ("actors", "cpus_per_actor", "num_gpus", "torch_threads", "batch_size")

REGISTRY: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("partition", "partition", "partition_summary.json", summary_type="PartitionSummary",
              inputs=("data.manifest", *_DEFINITIONS),
              reads=("partition", "data.manifest", *_DEFINITIONS),
              flags={"manifest": "data.manifest", "taxonomy": "data.taxonomy", "tasks": "data.tasks",
                     "max_class_size": "partition.max_class_size", "folds": "partition.folds",
                     "seed": "partition.seed"}),
    # Train locks the decisions (operating points) too: from the tasks, evaluate.target_sensitivity and the
    # readers' specificity on the test manifest's labels.
    StageSpec("train", "train", "train_summary.json", summary_type="TrainSummary",
              inputs=("data.manifest", "train.partition", "train.weights", "evaluate.readers",
                      "pipeline.test_manifest"),
              # score.tta: the views of the ensemble predictions the operating points are locked on
              reads=("train", "transforms", "data.manifest", *_DEFINITIONS, "evaluate.target_sensitivity",
                     "evaluate.readers", "pipeline.test_manifest", "score.tta"),
              flags={"manifest": "data.manifest", "partition": "train.partition", "arch": "train.arch",
                     "epochs": "train.epochs", "force": "train.force"},
              # channels_last: the same arithmetic in another memory layout (differences at float rounding);
              # max_failures, keep_checkpoints: how a fold survives and what it keeps beside its model; force:
              # retrain or refuse a fold of another lineage
              tuning=tuple(f"train.{k}" for k in (
                  "use_gpu", "cpus_per_worker", "worker_resources", "data_cpus", "torch_threads", "channels_last",
                  "max_failures", "keep_checkpoints", "force"))),
    StageSpec("score", "predictions", "score_summary.json", summary_type="ScoreSummary",
              inputs=("score.checkpoints", "score.input", "score.labels", "score.partition", *_DEFINITIONS),
              # Scoring prepares images as the model card says; its one transforms key must agree with the card.
              reads=("score", "transforms.color_constancy", *_DEFINITIONS),
              flags={"checkpoint": "score.checkpoints", "input": "score.input", "labels": "score.labels",
                     "tasks": "data.tasks", "taxonomy": "data.taxonomy", "partition": "score.partition",
                     "incremental": "score.incremental", "tta": "score.tta"},
              wired=("score.input", "score.labels"),
              # compile: probabilities within 3e-6 of eager (benchmarks/score_throughput.py); rows_per_file: how
              # the predictions are cut into files, not what they hold; incremental: skip what this model scored
              tuning=tuple(f"score.{k}" for k in (
                  *_ACTORS, "actor_resources", "decode_cpus", "channels_last", "compile", "incremental",
                  "rows_per_file"))),
    StageSpec("evaluate", "metrics", "evaluate_summary.json", summary_type="EvaluateSummary",
              inputs=("evaluate.predictions", "evaluate.partition", "evaluate.readers", "evaluate.compare",
                      "evaluate.reference", *_DEFINITIONS),
              reads=("evaluate", *_DEFINITIONS),
              flags={"predictions": "evaluate.predictions", "tasks": "data.tasks", "taxonomy": "data.taxonomy",
                     "partition": "evaluate.partition", "readers": "evaluate.readers", "compare": "evaluate.compare",
                     "model_id": "evaluate.model_id", "distributed": "evaluate.distributed"}),
    StageSpec("saliency", "saliency", "saliency_summary.json", summary_type="SaliencySummary",
              inputs=("saliency.checkpoints", "saliency.predictions", "saliency.partition", "saliency.masks",
                      *_DEFINITIONS),
              reads=("saliency", *_DEFINITIONS, "evaluate.model_id"),
              flags={"checkpoint": "saliency.checkpoints", "predictions": "saliency.predictions",
                     "method": "saliency.methods", "tasks": "data.tasks", "taxonomy": "data.taxonomy",
                     "masks": "saliency.masks"},
              tuning=tuple(f"saliency.{k}" for k in _ACTORS)),
)}
STAGES = tuple(REGISTRY)


def module(stage: str) -> ModuleType:
    if stage not in REGISTRY:
        raise KeyError(stage)
    return REGISTRY[stage].module


# ---- the runner: a stage sees the config it declared ---------------------------------------------------------------
class UndeclaredConfigRead(RuntimeError):
    """A stage read a config section or key its ``StageSpec.reads`` does not list: a bug in dermray (its lineage and
    its declared inputs would not know of the read), never a user error."""


class SectionView:
    """One config section as a stage sees it: only the keys it declared."""

    def __init__(self, section: Any, path: str, keys: frozenset[str], stage: str):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_where", (path, keys, stage))

    def __getattr__(self, name: str) -> Any:
        section = object.__getattribute__(self, "_section")
        path, keys, stage = object.__getattribute__(self, "_where")
        if name.startswith("__") or name in keys:
            return getattr(section, name)
        what = name if path == "config" else f"{path}.{name}"
        raise UndeclaredConfigRead(f"stage {stage!r} read {what}, which its StageSpec.reads does not list (it lists "
                                   f"{'' if path == 'config' else f'of {path}: '}{', '.join(sorted(keys))}): "
                                   "declare it in dermray/runtime/registry.py")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's view of the config is read-only")

    def __reduce__(self):  # Ray pickles what a stage hands its tasks
        path, keys, stage = object.__getattribute__(self, "_where")
        return SectionView, (object.__getattribute__(self, "_section"), path, keys, stage)


class ConfigView(SectionView):
    """The run config as a stage sees it: whole sections it declared as themselves, sections of which it declared
    single keys as a ``SectionView``, nothing else."""

    def __init__(self, cfg: Any, stage: str):
        reads = COMMON_READS + REGISTRY[stage].reads
        super().__init__(cfg, "config", frozenset(r for r in reads if "." not in r), stage)
        partial: dict[str, set[str]] = {}
        for r in reads:
            if "." in r:
                section, key = r.split(".", 1)
                partial.setdefault(section, set()).add(key)
        object.__setattr__(self, "_partial", {k: frozenset(v) for k, v in partial.items()})

    def __getattr__(self, name: str) -> Any:
        partial = object.__getattribute__(self, "_partial")
        if name in partial and not name.startswith("__"):
            _, keys, stage = object.__getattribute__(self, "_where")
            if name not in keys:
                return SectionView(getattr(object.__getattribute__(self, "_section"), name), name, partial[name],
                                   stage)
        return super().__getattr__(name)

    def __reduce__(self):
        return ConfigView, (self.unwrap(), object.__getattribute__(self, "_where")[2])

    def unwrap(self) -> Any:
        """The whole RunConfig: for the runner (never a stage) - to derive another stage's config from it."""
        return object.__getattribute__(self, "_section")


def view(cfg: Any, stage: str) -> ConfigView:
    return ConfigView(unwrap(cfg), stage)


def unwrap(cfg: Any) -> Any:
    return cfg.unwrap() if isinstance(cfg, ConfigView) else cfg


def run(stage: str, cfg: Any) -> dict:
    """Run ``stage`` on the config it declared, once its declared inputs and its output are checked."""
    from dermray.runtime import progress

    preflight(stage, cfg)
    with progress.working(f"{stage}: running"):
        return module(stage).run(view(cfg, stage))


def _value(cfg: Any, key: str) -> Any:
    node = unwrap(cfg)
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def _names_a_path(key: str, value: str) -> bool:
    """Whether input ``key``'s ``value`` names something to read (train.weights may name a weight set instead,
    "imagenet"; a value with "{" is a pattern: lesion masks by image id, tar shards by brace expansion)."""
    if "{" in value:
        return False
    if key == "train.weights":
        return "/" in value or value.endswith((".pt", ".pth", ".safetensors"))
    return True


def preflight(stage: str, cfg: Any) -> None:
    """Before a stage starts Ray or does any work: every input it declares that is set names something that
    exists, and an S3 output's bucket exists (issue 29: a missing bucket was found after 83 s of partition work, a
    missing readers file only after training). One UserError naming the key and the path."""
    from dermray.errors import UserError
    from dermray.store import storage

    for key in REGISTRY[stage].inputs:
        value = _value(cfg, key)
        for uri in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(uri, str) and uri and _names_a_path(key, uri) and not storage.exists(uri):
                raise UserError(f"{stage}: {key} {storage.redact(uri)}: no such file or object")
    output = _value(cfg, "output")
    if isinstance(output, str) and storage.is_s3(output):
        bucket = output.split("/")[2]
        if not storage.exists(f"s3://{bucket}"):
            raise UserError(f"{stage}: output {storage.redact(output)}: bucket {bucket!r} does not exist, or these "
                            "credentials cannot see it (create it first, or choose another output)")


# ---- lineage: every declared value, by construction ----------------------------------------------------------------
def declared_values(stage: str, cfg: Any, sections: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of every config value ``stage`` declares in ``reads`` (a whole section: each of its
    keys), less its ``inputs`` (files and folders: fingerprinted by their content, so a moved file is the same
    input) and its ``tuning``; only ``sections`` when given. JSON values, as the lineage records them."""
    spec = REGISTRY[stage]
    skip = set(spec.inputs) | set(spec.tuning)
    whole = unwrap(cfg)
    out: dict[str, dict[str, Any]] = {}
    for read in spec.reads:
        section, _, key = read.partition(".")
        if sections and section not in sections:
            continue
        values = getattr(whole, section).model_dump(mode="json")
        for k in [key] if key else values:
            if f"{section}.{k}" not in skip:
                out.setdefault(section, {})[k] = values[k]
    return out


def stage_lineage(stage: str, cfg: Any, inputs: dict, derived: dict | None = None):
    """The lineage ``stage`` records: its inputs' fingerprints (the stage computes them: by the columns it reads,
    or the bytes) and a config of every value it declared (``declared_values``: nothing it may read escapes) plus
    what it ``derived`` from its inputs (a model card's preprocessing, the input size)."""
    from dermray.store import lineage

    config: dict[str, Any] = declared_values(stage, cfg)
    if derived:
        config["derived"] = derived
    return lineage.Lineage.of(stage, inputs, config)


def read_summary(stage: str, text: str) -> StageSummary:
    """A summary file of ``stage`` (its JSON text), validated against the stage's summary record."""
    return REGISTRY[stage].summary_record.model_validate_json(text)


def lineage_now(stage: str, cfg: Any, recorded=None):
    """The lineage ``stage`` would record now, computed on the config it declared."""
    return module(stage).lineage_now(view(cfg, stage), recorded)
