"""The saliency stage's ``run``: read and select, explain over Ray Data, run the sanity checks, write the index,
the sanity table, the gallery and the summary (with the lineage)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from dermray.core.formatting import duration, fmt, strict_json
from dermray.errors import UserError
from dermray.runtime import artifacts, layout, progress, registry
from dermray.runtime.config import RunConfig, SaliencyConfig
from dermray.stages.saliency.actors import Explainer, ExplainJob
from dermray.stages.saliency.gallery import gallery_html
from dermray.stages.saliency.sanity import sanity_result, sanity_rows
from dermray.stages.saliency.select import select_images, targets_matrix
from dermray.stages.saliency.shared import STAGE
from dermray.store import lineage, storage
from dermray.store.summaries import SaliencySummary


def lineage_now(cfg: RunConfig, recorded: lineage.Lineage | None = None) -> lineage.Lineage:
    return registry.stage_lineage(STAGE, cfg, read_inputs(cfg).lineage_inputs)


@dataclass(frozen=True)
class SaliencyInputs:
    """Everything a saliency run reads, checked before Ray starts: the model, the evaluation tasks explained, the
    selected (image, task) rows (with each one's target column ``col``), the target matrix [training classes,
    targets] and the fingerprints of its lineage's inputs."""
    ens: artifacts.Ensemble
    tasks: list
    chosen: pd.DataFrame
    matrix: np.ndarray
    lineage_inputs: dict


def read_inputs(cfg: RunConfig) -> SaliencyInputs:
    """The model, tasks, predictions and selection of a run (SaliencyInputs)."""
    from dermray.store.definitions import fingerprints, load_tasks, load_taxonomy

    sc = cfg.saliency
    if not sc.predictions:
        raise UserError("no predictions given: pass --predictions URI (config: saliency.predictions)")
    if not (cfg.data.tasks and cfg.data.taxonomy):
        raise UserError("saliency needs the tasks YAML and the taxonomy: set data.tasks and data.taxonomy")
    ens = artifacts.load_ensemble(sc.checkpoints)
    if len(ens.weights) != 1:
        raise UserError(f"saliency explains one model, got {len(ens.weights)} checkpoints: pass one fold directory")
    tax = load_taxonomy(cfg.data.taxonomy)
    tasks = load_tasks(cfg.data.tasks, tax)
    if sc.tasks:
        missing = [t for t in sc.tasks if t not in {t_.name for t_ in tasks}]
        if missing:
            raise UserError(f"saliency.tasks {missing} are not in {storage.redact(cfg.data.tasks)}")
        tasks = [t for t in tasks if t.name in sc.tasks]
    else:
        tasks = [t for t in tasks if t.is_binary]
    part = sc.partition or ens.first.lineage.get("partition") or layout.partition_dir(cfg.output, cfg.run_id)
    tm_uri = layout.partition_outputs(part)["task_membership"]
    tm = storage.read_table(tm_uri)
    membership = tm.to_pandas()
    df = read_predictions(sc.predictions, cfg.evaluate.model_id)
    if "uri" not in df.columns:
        raise UserError(f"{storage.redact(sc.predictions)}: predictions need a 'uri' column (dermray score writes it)")
    probs = df.attrs["probs"]
    if probs.shape[1] != ens.n_classes:
        raise UserError(f"the predictions have {probs.shape[1]} training classes, the model {ens.n_classes}")
    chosen = select_images(df, probs, tasks, membership, tax, sc)
    matrix, offsets = targets_matrix(ens.n_classes, tasks, membership)
    chosen["col"] = [int(c) if sc.target == "training_class" else offsets[t] + int(c)
                     for t, c in zip(chosen["task"], chosen["target_col"])]
    inputs = {"model": lineage.value_fingerprint(ens.model_id), "predictions": df.attrs["fingerprint"],
              "task_membership": lineage.columns_fingerprint(tm_uri, tm, tm.column_names),
              **fingerprints(cfg.data.tasks, cfg.data.taxonomy)}
    if sc.masks:
        inputs["masks"] = lineage.value_fingerprint(storage.redact(sc.masks))
    return SaliencyInputs(ens, tasks, chosen, matrix, inputs)


def read_predictions(uri: str, model_id: str | None):
    from dermray.store.predictions import load_predictions

    return load_predictions(uri, model_id, extra_columns=("uri",))


def explain(chosen: pd.DataFrame, job: ExplainJob, sc: SaliencyConfig, rdir: str):
    """The maps of every selected (image, task), computed and written by a Ray Data actor pool; their index rows."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from dermray.runtime.raysession import blocks_of

    work = pa.Table.from_pandas(chosen[["image_id", "uri", "task", "col"]], preserve_index=False)
    if not work.num_rows:
        return pd.DataFrame(columns=["image_id", "task", "method", "png_uri", "npy_uri", "inside_lesion",
                                     "blank_map"])
    ds = ray.data.from_arrow(blocks_of(work, sc.batch_size)).map_batches(
        Explainer, batch_size=sc.batch_size, compute=ActorPoolStrategy(size=sc.actors),
        num_cpus=sc.cpus_per_actor, num_gpus=sc.num_gpus or None,
        fn_constructor_kwargs={"job": job, "out_dir": rdir})
    meter = progress.Meter("saliency", work.num_rows * len(sc.methods), unit="maps")
    parts = []
    for part in ds.iter_batches(batch_size=None, batch_format="pandas"):
        parts.append(part)
        meter.update(len(part))
    return pd.concat(parts, ignore_index=True)


def check_written(index: pd.DataFrame, rdir: str) -> None:
    """Every map the actors say they wrote is visible here: a file written to a node-local disk of another node (or
    lost) is an error naming it, never a silently broken gallery."""
    if index.empty:
        return
    present = set(storage.list_files(rdir)) if storage.exists(rdir) else set()
    for uri in list(index["png_uri"]) + list(index["npy_uri"]):
        if uri not in present and not storage.exists(uri):
            raise RuntimeError(f"saliency: the map {storage.redact(uri)} that an actor wrote is not visible to the "
                               "driver (is the output on a node-local path of a multi-node cluster?)")


def index_table(index: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    index = index.merge(chosen.drop(columns=["uri", "col", "target_col"]), on=["image_id", "task"], how="left")
    index["blank_map"] = index["blank_map"].astype(bool)
    return index[["image_id", "task", "method", "target", "score", "png_uri", "npy_uri", "inside_lesion", "blank_map",
                  "label", "true_class", "reason"]].sort_values(["task", "method", "image_id"]).reset_index(drop=True)


def run(cfg: RunConfig) -> dict:
    import ray

    from dermray.runtime.raysession import check_shared_storage, ray_session

    sc = cfg.saliency
    t_start = time.perf_counter()
    inp = read_inputs(cfg)
    ens, chosen, matrix = inp.ens, inp.chosen, inp.matrix
    rdir = layout.saliency_dir(cfg.output, cfg.run_id)
    sc_dict = {k: getattr(sc, k) for k in ("smooth_samples", "smooth_noise", "ig_steps", "seed", "masks",
                                           "sanity_levels")}
    sanity = []
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        first_local = next((u for u in chosen["uri"] if not storage.is_s3(u)), None)
        check_shared_storage(cfg.storage, {"output": cfg.output, "image URI (in the predictions)": first_local})
        threads = sc.torch_threads or max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, sc.actors))
        job = ExplainJob(ens, matrix, list(sc.methods), sc_dict, threads, sc.num_gpus > 0)
        index = index_table(explain(chosen, job, sc, rdir), chosen)
        check_written(index, rdir)
        if sc.sanity and len(chosen):
            audit = chosen.sort_values(["image_id", "task"]).drop_duplicates("image_id").head(sc.audit_size)
            # Ray takes num_gpus=None (its default) though its stubs say int | float
            remote = ray.remote(num_cpus=sc.cpus_per_actor, num_gpus=sc.num_gpus or None)(  # type: ignore[arg-type]
                sanity_rows)
            # Said only if it runs long (the console's budget: issue 29); the summary gives its verdict.
            with progress.working(f"saliency: sanity test on {len(audit)} images ({sc.sanity_levels} randomisation "
                                  f"levels x {len(sc.methods)} method(s))"):
                sanity = ray.get(remote.remote(job, audit))
    return write_outputs(cfg, inp, index, sanity, rdir, t_start)


def write_outputs(cfg: RunConfig, inp: SaliencyInputs, index: pd.DataFrame, sanity: list, rdir: str,
                  t_start: float) -> dict:
    """The index, the sanity table, the gallery and the summary of a run (the summary is returned)."""
    sc, tasks = cfg.saliency, inp.tasks
    storage.write_table(pa.Table.from_pandas(index, preserve_index=False),
                        storage.join(rdir, "saliency_index.parquet"))
    checked = sanity_result(sanity, sc.flag_similarity)
    storage.write_table(pa.Table.from_pandas(checked.table, preserve_index=False),
                        storage.join(rdir, "sanity.parquet"))
    storage.write_text(storage.join(rdir, "gallery.html"), gallery_html(cfg, index, checked, tasks, rdir))
    summary = {"stage": STAGE, "run_id": cfg.run_id, "model_id": inp.ens.model_id, "methods": list(sc.methods),
               "selected": len(inp.chosen), "maps": len(index),
               "explained": int(index[["image_id", "task"]].drop_duplicates().shape[0]) if len(index) else 0,
               "tasks": [t.name for t in tasks],
               "inside_lesion_mean": {m: float(g.mean()) for m, g in index.groupby("method")["inside_lesion"]
                                      if g.notna().any()},
               "sanity": sanity, "sanity_conclusive": checked.conclusive, "sanity_why": checked.why,
               "flagged": checked.flags,
               "lineage": registry.stage_lineage(STAGE, cfg, inp.lineage_inputs).to_dict(),
               "outputs": {"index": storage.join(rdir, "saliency_index.parquet"),
                           "sanity": storage.join(rdir, "sanity.parquet"),
                           "gallery": storage.join(rdir, "gallery.html")},
               "seconds": round(time.perf_counter() - t_start, 2)}
    summary = SaliencySummary(**summary).as_dict()
    storage.write_text(layout.summary_uri(cfg.output, STAGE, cfg.run_id), strict_json(summary))
    return summary


def counts(s: dict) -> dict:
    """Selected (image, task) pairs in = pairs explained (each by every method) + 0 (an unreadable image fails the
    stage: it was scored, so it was readable)."""
    return {"in": s["selected"], "out": s["explained"], "quarantined": 0, "seconds": s["seconds"]}


def format_summary(s: dict) -> str:
    lines = [f"saliency: {s['selected']} selected (image, task) pairs -> {s['maps']} maps "
             f"({', '.join(s['methods'])}) with {s['model_id']} ({duration(s['seconds'])})"]
    for m, v in s["inside_lesion_mean"].items():  # None: undefined (blank maps: no attribution anywhere)
        lines.append(f"  {m}: " + (f"{v:.1%} of the attribution inside the lesion on average" if v is not None
                                   else "the share inside the lesion is undefined (blank maps)"))
    for m, why in s["flagged"].items():
        lines.append(f"  FLAGGED {m}: {why}")
    if s["sanity"]:
        last = {}
        for r in s["sanity"]:
            last[r["method"]] = r
        for m, r in last.items():
            constant = f" ({r['constant_maps']} of {r['n_images']} maps blank)" if r.get("constant_maps") else ""
            lines.append(f"  sanity {m}: fully randomised Spearman {fmt(r['spearman'])}, SSIM {fmt(r['ssim'])}"
                         f"{constant}")
        why = s.get("sanity_why", "")
        lines.append("  sanity test: " + (f"conclusive ({why})" if s.get("sanity_conclusive") else
                                          f"INCONCLUSIVE ({why or 'blank maps at full randomisation'})"))
    lines.append(f"  gallery: {s['outputs']['gallery']}")
    return "\n".join(lines)
