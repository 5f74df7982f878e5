"""One fold: its Ray Train job, the fit, its metrics and checkpoints, its held-out predictions and its model card."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dermray.core.formatting import strict_json
from dermray.runtime import artifacts, faults, layout, progress
from dermray.runtime.config import RunConfig
from dermray.runtime.trainloop import FoldJob, train_loop_per_worker, worker_threads
from dermray.stages.train.data import TrainingRows, measure_held_out
from dermray.stages.train.plan import TrainPlan
from dermray.stages.train.shared import FINAL, FINISHED_FILE
from dermray.store import lineage, storage


def fold_job(fold, p: TrainPlan, cfg: RunConfig, has_select: bool, lineage_id: str, hooks: faults.Faults,
             relay=None) -> FoldJob:
    from dermray.store.models import spec

    s = spec(cfg.train.arch)
    return FoldJob(train=cfg.train, n_classes=p.classes.num_rows, image_size=cfg.train.image_size or s.input_size,
                   mean=cast(tuple[float, float, float], tuple(s.mean)),
                   std=cast(tuple[float, float, float], tuple(s.std)), fold=str(fold),
                   fold_dir=layout.fold_dir(cfg.output, cfg.run_id, fold), model_id=f"{cfg.run_id}/fold={fold}",
                   lineage_id=lineage_id, has_select=has_select, matrices=p.matrices, task_names=tuple(p.task_names),
                   faults=hooks.for_fold(fold), progress=relay)


@dataclass(frozen=True)
class FittedFold:
    """A fold as its TorchTrainer left it: the epochs' history, the chosen epoch's entry, that checkpoint's weights
    (model.pt bytes), its measurement on the held-out fold ((metrics, predictions), or None for the final model) and
    the seconds it took."""
    job: FoldJob
    history: list[dict]
    best: dict
    weights: bytes
    measured: tuple[dict, Any] | None
    seconds: float


def fit_fold(job: FoldJob, datasets: dict, val, run_dir: str, cfg: RunConfig) -> FittedFold:
    """Train one fold with a TorchTrainer, then measure the chosen checkpoint on the held-out fold ``val`` (its
    rows, or None)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    tcfg = job.train
    fs, path = storage.arrow_filesystem(run_dir)
    threads = str(worker_threads(tcfg.torch_threads, tcfg.cpus_per_worker))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=tcfg.use_gpu,
                                     resources_per_worker={"CPU": tcfg.cpus_per_worker, **tcfg.worker_resources}),
        run_config=TrainRunConfig(  # type: ignore[call-arg]  # mypy sees Train V1's RunConfig: no worker_runtime_env
            name=f"fold={job.fold}", storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints,
                                               checkpoint_score_attribute=job.score_key,
                                               checkpoint_score_order=job.score_order),
            # Ray starts workers with OMP_NUM_THREADS=1 unless told; torch.set_num_threads alone left the worker's
            # intra-op pools narrower than a plain process's (measured in benchmarks/train_throughput.py).
            worker_runtime_env={"env_vars": {v: threads for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}},
        ),
        datasets=datasets,
        # One worker per fold: a split would only put a coordinator actor between Ray Data and the worker.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"fold {job.fold} failed: {result.error}") from result.error
    history = read_history(result)
    checkpoint, chosen = best_checkpoint(result, history, job)
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, "model.pt"), "rb") as f:
            weights = f.read()
    measured = None
    if val is not None:
        # The held-out fold is measured in the precision the fold trained in (the worker resolved "auto").
        precision: Any = history[-1].get("precision")
        trained_in = {"fp32": "off"}.get(precision, precision or tcfg.amp)
        as_trained = dataclasses.replace(job, train=tcfg.model_copy(update={"amp": trained_in}), progress=None)
        # num_gpus=None: Ray's default (its stubs want a number).
        task = ray.remote(num_cpus=tcfg.cpus_per_worker,
                          num_gpus=1 if tcfg.use_gpu else None)(measure_held_out)  # type: ignore[arg-type]
        with progress.working(f"train: fold {job.fold}: measuring its model on {val.num_rows:,} held-out images"):
            measured = ray.get(task.remote(as_trained, weights, val, cfg.transforms.preprocess(),
                                           cfg.storage.retry()))
    return FittedFold(job, history, chosen, weights, measured, time.time() - t0)


def read_history(result) -> list[dict]:
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "history.json")) as f:
            return json.load(f)


def metrics_rows(history: list[dict]) -> list[dict]:
    """The history as long-form rows (epoch, split, metric, value) for metrics.parquet; epochs numbered from 1, as
    everywhere a person reads them (the history counts from 0)."""
    rows = []
    for h in history:
        for key, value in h.items():
            if key in ("epoch", "t_start", "t_end") or not isinstance(value, (int, float)):
                continue
            split, _, metric = key.partition("_") if key.startswith(("train_", "select_")) else ("", "", key)
            rows.append({"epoch": h["epoch"] + 1, "split": split or "train", "metric": metric or key,
                         "value": float(value)})
    return rows


def best_checkpoint(result, history: list[dict], job: FoldJob):
    """(checkpoint, its epoch's history entry): the best kept checkpoint by the job's ranking key (the latest for
    train.selection: last)."""
    if job.score_key == "epoch" or not result.best_checkpoints:
        return result.checkpoint, history[-1]
    sign = 1 if job.score_order == "min" else -1
    ckpt, metrics = sorted(result.best_checkpoints, key=lambda cm: sign * cm[1].get(job.score_key, math.inf))[0]
    return ckpt, next(h for h in history if h["epoch"] == metrics["epoch"])


def write_val_predictions(job: FoldJob, preds: dict, cfg: RunConfig, table: pa.Table, epoch: int) -> str:
    """The held-out fold's probabilities under the chosen model, with the manifest's label columns: the input of
    ``dermray evaluate`` for the paper's first round."""
    assert cfg.data.manifest is not None  # plan() required it
    present = storage.parquet_file(cfg.data.manifest).schema_arrow.names
    carry = table.select(["image_id", "label", "class_index"]).to_pandas().merge(
        storage.read_table(cfg.data.manifest, columns=[c for c in ("image_id", "label_source", "modality", "group_id")
                                                       if c in present]).to_pandas(),
        on="image_id", how="left")
    ids = pd.DataFrame({"image_id": preds["image_id"]})
    if len(ids) and ids["image_id"].duplicated().any():
        raise RuntimeError(f"fold {job.fold}: the held-out measurement returned an image twice")
    merged = ids.assign(order=np.arange(len(ids))).merge(carry, on="image_id", how="left", validate="one_to_one")
    merged = merged.sort_values("image_id")
    probs = np.asarray(preds["probs"], np.float32)[merged.pop("order").to_numpy()] if len(ids) else \
        np.zeros((0, job.n_classes), np.float32)
    out = pa.Table.from_pandas(merged, preserve_index=False)
    out = out.add_column(1, "model_id", pa.array([job.model_id] * len(merged), pa.string()))
    out = out.add_column(2, "probs", pa.array(list(probs), pa.list_(pa.float32())))
    out = out.append_column("epoch", pa.array([epoch] * len(merged), pa.int32()))
    uri = storage.join(job.fold_dir, "val_predictions.parquet")
    storage.write_table(out, uri)
    return uri


def accuracy_by(job: FoldJob, preds: dict, table: pa.Table) -> dict:
    """Held-out task accuracy per source and per modality (``val_acc_<task>[source=X]``): a model trained on
    several sources is judged on each."""
    from dermray.core.metrics import predicted_class

    if not job.task_names or not len(preds["image_id"]):
        return {}
    rows = table.select([c for c in ("image_id", "task_truth", "source", "modality") if c in table.column_names]
                        ).to_pandas().set_index("image_id").loc[preds["image_id"]]
    probs = np.asarray(preds["probs"], np.float64)
    truth = np.stack(rows["task_truth"].to_numpy())
    out = {}
    for column in ("source", "modality"):
        if column not in rows.columns or rows[column].nunique() < 2:
            continue
        for value in sorted(rows[column].dropna().astype(str).unique()):
            sel = (rows[column].astype(str) == value).to_numpy()
            for j, name in enumerate(job.task_names):
                keep = sel & (truth[:, j] >= 0)
                if keep.any():
                    pred = predicted_class(probs[keep] @ job.matrices[name])
                    out[f"val_acc_{name}[{column}={value}]"] = float((pred == truth[keep, j]).mean())
    return out


def selection_text(job: FoldJob, epoch: int) -> str:
    tc = job.train
    if job.score_key == "epoch":
        return f"the last epoch ({epoch})"
    where = (f"an inner split of {tc.selection_fraction:.0%} of the fold's training lesions (not trained on)"
             if job.has_select else "the training data")
    return f"the best {job.score_key} on {where}: epoch {epoch}; the held-out fold only measured it"


def data_description(p: TrainPlan, table: pa.Table) -> dict:
    """Who a reviewer should credit and what the model saw: the data sources (the manifest's ``source`` column)
    with their licences, and the training data in numbers."""
    import datetime as dt

    sources = (table.column("source").to_pandas().fillna("unspecified").value_counts()
               if "source" in table.column_names else pd.Series({"unspecified": table.num_rows}))
    return {"intended_use": artifacts.INTENDED_USE,
            "data_sources": [{"name": str(k), "images": int(v),
                              "licence": artifacts.LICENCES.get(str(k), "as its provider states")}
                             for k, v in sources.items()],
            "training_data": {"images": table.num_rows, "lesions": pc.count_distinct(table.column("group")).as_py(),
                              "classes": p.classes.num_rows, "folds": pc.count_distinct(table.column("fold")).as_py()},
            "limitations": list(artifacts.LIMITATIONS), "version": 1,
            "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def model_card(fitted: FittedFold, p: TrainPlan, fold_lin: lineage.Lineage, measured: dict, table: pa.Table,
               cfg_transforms) -> artifacts.ModelCard:
    """The fold's model card; ``measured``: its held-out metrics (empty for the final model)."""
    job, history, best, weights = fitted.job, fitted.history, fitted.best, fitted.weights
    tcfg = job.train
    description = data_description(p, table)
    redacted = tcfg.weights if tcfg.weights in ("imagenet", "none") else storage.redact(tcfg.weights)
    config = tcfg.model_dump(mode="json") | {"weights": redacted}
    return artifacts.ModelCard(
        precision=history[-1].get("precision"),
        preprocess=cfg_transforms.preprocess().as_dict(),
        augmentation=dataclasses.asdict(cfg_transforms.augmentation()),
        model_id=job.model_id, architecture=tcfg.arch, input_size=job.image_size,
        normalisation={"mean": list(job.mean), "std": list(job.std)},
        training_classes=p.classes.select(["class_index", "node_id", "name", "scope", "n_images"]).to_pylist(),
        classes_hash=p.classes_hash, weights_sha256=artifacts.sha256_hex(weights), weights_source=redacted,
        freeze=tcfg.freeze, fold=job.fold, held_out_fold=None if job.fold == FINAL else int(job.fold),
        config=config, config_hash=fold_lin.config_hash, versions=fold_lin.versions,
        epochs_trained=len(history), best_epoch=int(best["epoch"]) + 1,
        selection=selection_text(job, int(best["epoch"]) + 1),
        validation=measured,
        checkpoint=artifacts.weights_uri(job.fold_dir), data_hash=fold_lin.inputs["labels"].content[:16],
        lineage=fold_lin.to_dict() | {"partition": storage.redact(p.partition)}, description=description,
        changelog=[{"when": description["trained_at"], "what": f"trained: {job.model_id}, {len(history)} epochs, "
                    f"{selection_text(job, int(best['epoch']))}"}])


def finish_fold(fitted: FittedFold, cfg: RunConfig, p: TrainPlan, rows: TrainingRows,
                fold_lin: lineage.Lineage) -> dict:
    """metrics.parquet, best/model.pt, val_predictions.parquet and model_card.json for one fold, then the record
    that says it is finished (FINISHED_FILE). Returns the fold's summary row."""
    job, history, best, weights, table = fitted.job, fitted.history, fitted.best, fitted.weights, rows.table
    storage.write_table(pa.Table.from_pylist(metrics_rows(history)), storage.join(job.fold_dir, "metrics.parquet"))
    storage.write_bytes(artifacts.weights_uri(job.fold_dir), weights)
    val_metrics: dict = {}
    if fitted.measured is not None:
        val_metrics, preds = fitted.measured
        write_val_predictions(job, preds, cfg, table, int(best["epoch"]) + 1)
        val_metrics |= accuracy_by(job, preds, table)
    artifacts.write_card(model_card(fitted, p, fold_lin, val_metrics, table, cfg.transforms), job.fold_dir)
    row = {"fold": job.fold, "epochs": len(history), "best_epoch": int(best["epoch"]) + 1,
           "seconds": round(fitted.seconds, 1),
           "t_start": history[0].get("t_start"), "t_end": history[-1].get("t_end"), "lineage_id": fold_lin.id,
           **val_metrics}
    record = {"lineage_id": fold_lin.id, "weights_sha256": artifacts.sha256_hex(weights), "row": row,
              "images": table.num_rows + rows.quarantined, "quarantined": rows.quarantined}
    storage.write_text(storage.join(job.fold_dir, FINISHED_FILE), strict_json(record))
    return row
