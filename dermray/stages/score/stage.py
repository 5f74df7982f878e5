"""The scoring stage's ``run``: identify the models, check and plan the input, reconcile with the run's
recorded lineage, stream the images through Ray Data, write the summary."""
from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.formatting import strict_json
from dermray.errors import UserError
from dermray.runtime import artifacts, layout, progress, registry
from dermray.runtime.artifacts import Ensemble
from dermray.runtime.config import RunConfig, ScoreConfig, card_preprocess
from dermray.runtime.faults import from_env as fault_hooks
from dermray.stages.score.actors import Predictor, decode_rows, decode_shards
from dermray.stages.score.plan import (
    WorkPlan,
    fingerprint_manifest,
    folder_manifest,
    folder_table,
    plan_manifest,
    plan_shards,
    quarantine_rows,
    shards_fingerprint,
)
from dermray.stages.score.shared import INTERNAL, STAGE, log
from dermray.stages.score.summary import RunFacts, merge_quarantine, summarise
from dermray.stages.score.write import PartWriter, TaskColumns, model_decisions
from dermray.store import archive, lineage, storage
from dermray.store.summaries import ScoreSummary


def task_setup(cfg: RunConfig, ens: Ensemble) -> TaskColumns:
    """What the task columns are computed from (no tasks when none are configured). The partition defaults to the
    one the model card records."""
    if not (cfg.data.tasks and cfg.data.taxonomy):
        log.info("no data.tasks / data.taxonomy: writing training-class probabilities only")
        return TaskColumns([], None, None, {})
    from dermray.store.definitions import load_tasks, load_taxonomy

    part = cfg.score.partition or ens.first.lineage.get("partition") or layout.partition_dir(cfg.output, cfg.run_id)
    paths = layout.partition_outputs(part)
    if not storage.exists(paths["task_membership"]):
        raise UserError(f"task columns need the partition's task_membership.parquet, not found at "
                        f"{storage.redact(paths['task_membership'])} (set score.partition)")
    classes = storage.read_table(paths["training_classes"])
    if artifacts.classes_hash(classes) != ens.classes_hash:
        raise UserError(f"the model was trained on other training classes than {storage.redact(part)} holds "
                        f"(hash {ens.classes_hash} vs {artifacts.classes_hash(classes)}): set score.partition to "
                        "its partition")
    from dermray.store.definitions import fingerprints

    tasks = load_tasks(cfg.data.tasks, load_taxonomy(cfg.data.taxonomy))
    membership = storage.read_table(paths["task_membership"])
    # The task columns are computed from all three: their names, classes and positive class, the nodes' classes.
    fps = fingerprints(cfg.data.tasks, cfg.data.taxonomy) | {"task_membership": lineage.columns_fingerprint(
        paths["task_membership"], membership, membership.column_names)}
    return TaskColumns(tasks, membership.to_pandas(), part, fps)


def preprocessing(cfg: RunConfig, ens: Ensemble):
    """The models' preprocessing (their cards must agree; transforms.color_constancy, when set, must match)."""
    if any(c.preprocess != ens.first.preprocess for c in ens.cards):
        raise UserError("the ensemble's models were trained with different preprocessing (model cards): score them "
                        "apart")
    return card_preprocess(cfg.transforms.color_constancy, ens.first.preprocess)


def score_lineage(ens: Ensemble, input_fp: lineage.Fingerprint, task_fps: dict, cfg: RunConfig) -> lineage.Lineage:
    inputs = {"model": lineage.value_fingerprint(ens.model_id), "input": input_fp} | task_fps
    # What the model cards decide: how images are prepared, at which size, the calibration and operating points.
    derived = {"input_size": ens.size, "preprocess": preprocessing(cfg, ens).as_dict(),
               "decisions": model_decisions(ens, cfg.score).as_dict()}
    return registry.stage_lineage(STAGE, cfg, inputs, derived)


def reconcile(rdir: str, now: lineage.Lineage, incremental: bool) -> None:
    """Keep, replace or refuse the run's existing output given its recorded lineage: the same lineage resumes;
    another input or model replaces the output; in incremental mode another model or setting is refused (one
    run, one model: a history must never mix two models' predictions)."""
    spec_uri = storage.join(rdir, "_state", "spec.json")
    before = lineage.read(spec_uri)
    if before is None and storage.exists(storage.join(rdir, "predictions")):
        before = lineage.Lineage(stage=STAGE, id="unknown (no lineage recorded)")
    changes = now.changes_from(before) if before is not None else []
    if before is not None and changes:
        if incremental:
            old_model = before.inputs.get("model")
            changed = [c for c in changes if not c.startswith("input ")]
            if changed:
                raise UserError(f"{storage.redact(rdir)} holds predictions of model "
                                f"{old_model.content if old_model else 'unknown'}, not of "
                                f"{now.inputs['model'].content} ({'; '.join(changed)}): incremental scoring never "
                                "mixes two models in one run; use a new run id for the new model")
        else:
            log.info("score: %s holds other predictions (%s): replacing them", storage.redact(rdir), "; ".join(changes))
            for sub in ("predictions", "_state", "quarantine.parquet", layout.SUMMARY_FILES[STAGE]):
                storage.delete(storage.join(rdir, sub))
    storage.write_text(spec_uri, json.dumps(now.to_dict(), indent=2))


COMPILE_MIN_IMAGES = 5000  # per actor: where torch.compile's 5-25 s per model pays for itself (score.compile=auto)


def compile_decision(sc: ScoreConfig, images: int | None) -> tuple[bool, str]:
    """(compile the models?, why) for ``images`` left to score (None: not known before reading the shards)."""
    if sc.compile != "auto":
        return sc.compile == "on", f"{sc.compile} (configured)"
    if images is None:
        return False, "off (auto: the number of images is not known before the shards are read)"
    per_actor = images / sc.actors
    if per_actor >= COMPILE_MIN_IMAGES:
        return True, f"on (auto: {per_actor:,.0f} images per actor)"
    return False, f"off (auto: {per_actor:,.0f} images per actor, under {COMPILE_MIN_IMAGES:,})"


def stream(plan: WorkPlan, ens: Ensemble, sc: ScoreConfig, retry: storage.Retry, writer: PartWriter, pre,
           compiling: bool = False) -> None:
    """Run the Ray Data pipeline and hand every result batch to the writer."""
    import ray.data
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = ctx.enable_progress_bars
    memory = _decode_memory(sc, ens.size)
    # The decode fns take fn_kwargs besides the batch, which Ray's stubs of map_batches do not allow for.
    if plan.kind == "webdataset":
        ds = ray.data.from_arrow(plan.refs).repartition(target_num_rows_per_block=1).map_batches(
            decode_shards, batch_size=1, num_cpus=sc.decode_cpus, memory=memory,  # type: ignore[arg-type]
            fn_kwargs={"size": ens.size, "max_pixels": sc.max_pixels, "rows_per_batch": sc.batch_size,
                       "retry": retry, "pre": pre})
    else:
        # Blocks of one model batch: the decode tasks spread over every free CPU (a big block would be decoded by
        # one task on one core while the model waits).
        ds = ray.data.from_arrow_refs(plan.refs).repartition(target_num_rows_per_block=sc.batch_size).map_batches(
            decode_rows, batch_size=None, num_cpus=sc.decode_cpus, memory=memory,  # type: ignore[arg-type]
            fn_kwargs={"size": ens.size, "max_pixels": sc.max_pixels, "retry": retry, "pre": pre})
    resources: dict[str, Any] = {"resources": dict(sc.actor_resources)} if sc.actor_resources else {}
    ds = ds.map_batches(
        Predictor, batch_size=sc.batch_size, compute=ActorPoolStrategy(size=sc.actors),
        num_cpus=sc.cpus_per_actor, num_gpus=sc.num_gpus or None,
        **resources,
        fn_constructor_kwargs={"ensemble": ens, "threads": _threads(sc), "channels_last": sc.channels_last,
                               "tta": sc.tta, "use_gpu": sc.num_gpus > 0, "amp": sc.amp,
                               "slow_batch_s": fault_hooks().slow_batch_s,
                               "compile_batch": sc.batch_size if compiling else 0})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        writer.add(batch)
    if writer.pending:
        raise RuntimeError(f"score: parts {sorted(writer.pending)} did not complete")


def _decode_memory(sc: ScoreConfig, size: int) -> int:
    """Bytes a decode task holds (a worker process, its decoded batch a few times over). Declaring it also
    keeps decoding in its own tasks: Ray Data fuses a task step into the next actor step when their resource
    requests match, and the model actor would then decode and infer one after the other."""
    # A decode worker process (Python, numpy, pyarrow, PIL, Ray) held ~410 MB at batch 8 in the tests.
    return int(sc.batch_size * size * size * 3 * 4 + 384 * 2**20)


def _threads(sc: ScoreConfig) -> int:
    if sc.torch_threads:
        return sc.torch_threads
    import ray

    # The node's CPUs shared by the actors that may land on it (Ray starts workers with OMP_NUM_THREADS=1,
    # which would leave a CPU actor on one core).
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = max((n["Resources"].get("CPU", 1) for n in nodes), default=1)
    return max(int(sc.cpus_per_actor), int(per_node // max(1, min(sc.actors, len(nodes) * per_node))))


def check_input(sc: ScoreConfig) -> str:
    """The input's kind (manifest | folder | webdataset), with a manifest's columns checked: before Ray starts."""
    assert sc.input is not None  # run() refuses a config without score.input
    kind = archive.detect_kind(sc.input, sc.input_kind)
    if kind != "manifest":
        return kind
    schema = storage.parquet_file(sc.input).schema_arrow
    missing = [c for c in ("image_id", "uri") if c not in schema.names]
    if missing:
        raise UserError(f"{storage.redact(sc.input)}: the manifest has no {missing[0]!r} column (columns: "
                        f"{', '.join(schema.names)})")
    for c in ("image_id", "uri"):
        t = schema.field(c).type
        t = t.value_type if pa.types.is_dictionary(t) else t
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise UserError(f"{storage.redact(sc.input)}: column {c!r} must be strings, got {t}")
    return kind


def plan(cfg: RunConfig, kind: str, rdir: str, ens: Ensemble, task_fps) -> tuple[WorkPlan, lineage.Lineage]:
    """Fingerprint the input, reconcile the run's existing output with the lineage, then plan what to score."""
    sc = cfg.score
    assert sc.input is not None  # run() refuses a config without score.input
    if kind == "webdataset":
        shards = archive.shard_list(sc.input)
        now = score_lineage(ens, shards_fingerprint(shards), task_fps, cfg)
        reconcile(rdir, now, sc.incremental)
        return plan_shards(shards, rdir), now
    uri, problems = (sc.input, quarantine_rows([])) if kind == "manifest" else folder_manifest(
        sc.input, sc.labels, rdir)
    chunks, fp, repeats, _ = fingerprint_manifest(uri, cfg.storage)
    now = score_lineage(ens, fp, task_fps, cfg)
    reconcile(rdir, now, sc.incremental)
    work = plan_manifest(uri, chunks, repeats, rdir, ens.model_id, sc)
    work.kind = kind
    work.quarantine = pa.concat_tables([problems, work.quarantine])
    work.input_rows += problems.num_rows
    return work, now


def lineage_now(cfg: RunConfig, recorded: lineage.Lineage | None = None) -> lineage.Lineage:
    sc = cfg.score
    if not sc.input:
        raise UserError("no input given: pass --input URI (config: score.input)")
    ens = artifacts.load_ensemble(sc.checkpoints, sc.model_id)
    task_fps = task_setup(cfg, ens).fingerprints
    kind = archive.detect_kind(sc.input, sc.input_kind)
    if kind == "webdataset":
        fp = shards_fingerprint(archive.shard_list(sc.input))
    elif kind == "folder":
        fp = lineage.columns_fingerprint(None, table := folder_table(sc.input, sc.labels)[0], table.column_names)
    else:
        def content():
            table = storage.read_table(sc.input)
            table = pa.table({c: (pc.cast(table.column(c), pa.string()) if pa.types.is_dictionary(
                table.column(c).type) else table.column(c)) for c in table.column_names})
            return lineage.columns_fingerprint(sc.input, table, table.column_names)
        fp = lineage.reuse(recorded, "input", sc.input, content)
    return score_lineage(ens, fp, task_fps, cfg)


def run(cfg: RunConfig) -> dict:
    """Score ``score.input`` with the ``score.checkpoints`` ensemble; returns the summary (also written as JSON)."""
    from dermray.runtime.raysession import check_shared_storage, ray_session

    sc = cfg.score
    t_start = time.perf_counter()
    if not sc.input:
        raise UserError("no input given: pass --input URI (config: score.input)")
    ens = artifacts.load_ensemble(sc.checkpoints, sc.model_id)
    columns = task_setup(cfg, ens)
    partition, task_fps = columns.partition, columns.fingerprints
    preprocessing(cfg, ens)  # a config that contradicts the model card fails here, before Ray starts
    kind = check_input(sc)
    rdir = layout.predictions_dir(cfg.output, cfg.run_id)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        check_shared_storage(cfg.storage, {"output": cfg.output, "score.input": sc.input})
        work, now = plan(cfg, kind, rdir, ens, task_fps)
        progress.say("score: %s images to score with %s (%d part(s)); %s already scored", "?" if work.input_rows is
                     None else f"{work.input_rows - work.already_done - work.quarantine.num_rows:,}", ens.model_id,
                     work.parts, f"{work.already_done:,}")
        carry = None
        if work.kind != "webdataset":
            carry = pa.schema([f for f in storage.parquet_file(
                sc.input if work.kind == "manifest" else storage.join(rdir, "_state", "folder_manifest.parquet"))
                .schema_arrow if f.name not in INTERNAL])
        total = None if work.input_rows is None else work.input_rows - work.already_done - work.quarantine.num_rows
        meter = progress.Meter("score", total)
        decided = model_decisions(ens, sc)
        writer = PartWriter(rdir, ens, columns, carry, meter, decided)
        t_wall = time.time()
        compiling, compile_why = compile_decision(sc, total)
        if work.refs:
            if compiling:
                progress.say("score: torch.compile %s", compile_why)
            stream(work, ens, sc, cfg.storage.retry(), writer, preprocessing(cfg, ens), compiling)
    quarantined_total = merge_quarantine(rdir, work.quarantine)
    summary = summarise(cfg, ens, work, writer, RunFacts(rdir, now, partition, quarantined_total, t_start, t_wall))
    summary["compile"] = compile_why if not (compiling and False in writer.compiled) else \
        f"{compile_why}; some actors fell back to eager (torch.compile failed there: see the job log)"
    summary = ScoreSummary(**summary).as_dict()
    storage.write_text(layout.summary_uri(cfg.output, STAGE, cfg.run_id), strict_json(summary))
    return summary
