"""Training stage: the paper's transfer learning (an ImageNet CNN, a new final layer with one output per training
class, fine-tuned), one Ray Train ``TorchTrainer`` per cross-validation fold, the folds running concurrently.

Data: the manifest joined with the partition stage's labels; each fold's training rows are decoded and augmented
in Ray Data tasks (the paper's random rotation, inscribed-rectangle crop and vertical flip) and streamed to the
worker; the held-out fold is the validation set. Images that cannot be decoded are found first and quarantined.

Per fold, under ``<output>/train/<run_id>/fold=<k>/``: a checkpoint every epoch (model, optimizer, scheduler,
epoch, training-classes hash, metric history; the best ``keep_checkpoints`` by ``checkpoint_metric`` are kept),
``metrics.parquet`` (epoch, split, metric, value), ``best/model.pt``, ``model_card.json`` and
``val_predictions.parquet`` (the best epoch's validation probabilities, for ``dermray evaluate``). Re-running the
same run resumes each fold from its last checkpoint; a worker that dies is restarted from it (FailureConfig).
Across folds: ``train_summary.parquet`` with mean and sd of each task's validation accuracy.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
import zlib
from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dermray import schemas, storage
from dermray.raysession import blocks_of
from dermray.config import RunConfig, TrainConfig
from dermray.errors import UserError

log = logging.getLogger("dermray.train")
STAGE = "train"
FINAL = "all"  # the fold name of the model trained on all folds


# ---- inputs ------------------------------------------------------------------------------------------------------
def classes_hash(classes: pa.Table) -> str:
    rows = zip(classes.column("class_index").to_pylist(), classes.column("node_id").to_pylist(),
               classes.column("scope").to_pylist())
    return hashlib.sha256(json.dumps(list(rows)).encode()).hexdigest()[:16]


def load_inputs(cfg: RunConfig) -> dict:
    """Training table (image_id, uri, class_index, fold, label, task_truth), classes, membership matrices."""
    from dermray.evaluate import truth_for_task
    from dermray.tasks import load_tasks
    from dermray.taxonomy import load_taxonomy

    if not cfg.data.manifest:
        raise UserError("no manifest given: set data.manifest")
    part = cfg.train.partition or storage.join(cfg.output, "partition")
    labels = storage.read_table(storage.join(part, "labels.parquet"))
    classes = storage.read_table(storage.join(part, "training_classes.parquet"))
    schemas.check_columns(labels.schema, schemas.LABELS, "labels.parquet")
    manifest = storage.read_table(cfg.data.manifest, columns=["image_id", "uri", "label"])
    base = storage.parent(cfg.data.manifest)
    uris = [storage.resolve(u, base) for u in manifest.column("uri").to_pylist()]
    manifest = manifest.set_column(1, "uri", pa.array(uris, pa.string()))
    table = labels.join(manifest, "image_id", join_type="inner")
    if table.num_rows != labels.num_rows:
        raise UserError(f"{labels.num_rows - table.num_rows} labelled images are not in the manifest "
                        f"{storage.redact(cfg.data.manifest)}: the partition was built from another manifest")
    table = table.sort_by("image_id")
    tasks, matrices = [], {}
    if cfg.data.tasks and cfg.data.taxonomy:
        tax = load_taxonomy(cfg.data.taxonomy)
        tasks = load_tasks(cfg.data.tasks, tax)
        membership = storage.read_table(storage.join(part, "task_membership.parquet")).to_pandas()
        n_classes = classes.num_rows
        labels_np = table.column("label").to_numpy(zero_copy_only=False)
        truths = []
        for task in tasks:
            m = np.zeros((n_classes, len(task.classes)), np.float32)
            rows = membership[membership["task"] == task.name]
            col = {c: j for j, c in enumerate(task.class_names)}
            m[rows["class_index"].to_numpy(), [col[c] for c in rows["task_class"]]] = 1.0
            matrices[task.name] = m
            truths.append(truth_for_task(tax, task, labels_np))
        truth = np.stack(truths, axis=1).astype(np.int32)
        table = table.append_column("task_truth", pa.array(list(truth), pa.list_(pa.int32())))
    return {"table": table, "classes": classes, "hash": classes_hash(classes), "matrices": matrices,
            "task_names": [t.name for t in tasks], "partition": part}


# ---- Ray Data transforms ------------------------------------------------------------------------------------------
def find_undecodable(batch: dict, max_pixels: int) -> dict:
    """Ray Data batch fn: the rows whose image cannot be read or decoded, with the reason."""
    from dermray.transforms import ImageDecodeError, decode_image

    bad_ids, bad_uris, reasons = [], [], []
    for image_id, uri in zip(batch["image_id"], batch["uri"]):
        try:
            decode_image(storage.read_bytes(uri), max_pixels)
        except (ImageDecodeError, UserError) as e:
            bad_ids.append(image_id)
            bad_uris.append(uri)
            reasons.append(str(e))
    return {"image_id": np.array(bad_ids, dtype=object), "uri": np.array(bad_uris, dtype=object),
            "reason": np.array(reasons, dtype=object)}


def decode_transform(batch: dict, size: int, train: bool, max_pixels: int) -> dict:
    """Ray Data batch fn: read, decode and transform images -> uint8 [B, S, S, 3] (normalised on the worker:
    a quarter of the bytes of float32 through the object store). Augmentation draws fresh randomness every call,
    so every epoch sees new rotations and flips."""
    from dermray.transforms import decode_image, eval_transform, train_transform

    rng = np.random.default_rng()
    images = []
    for uri in batch["uri"]:
        img = decode_image(storage.read_bytes(uri), max_pixels)
        img = train_transform(img, size, rng) if train else eval_transform(img, size)
        images.append(np.asarray(img, dtype=np.uint8))
    out = {"image": np.stack(images), "label": batch["class_index"].astype(np.int64), "image_id": batch["image_id"]}
    if "task_truth" in batch:
        out["task_truth"] = np.stack(batch["task_truth"]).astype(np.int64)
    return out


# ---- the training loop (runs in the Ray Train worker) --------------------------------------------------------------
def make_optimizer(params, tc: dict):
    import torch

    if tc["optimizer"] == "rmsprop":
        # TensorFlow's RMSProp adds epsilon inside the square root (sqrt(ms + 0.1)); PyTorch adds it outside
        # (sqrt(ms) + eps): eps = sqrt(0.1) gives the same damping where it matters (small ms).
        return torch.optim.RMSprop(params, lr=tc["lr"], alpha=0.9, momentum=0.9, eps=math.sqrt(0.1),
                                   weight_decay=tc["weight_decay"])
    if tc["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=tc["lr"], weight_decay=tc["weight_decay"] or 0.01)
    raise ValueError(tc["optimizer"])


def make_scheduler(optimizer, tc: dict):
    import torch

    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=tc["lr_decay_epochs"],
                                           gamma=1.0 / tc["lr_decay_factor"])


def _amp(tc: dict, device) -> str:
    """bf16 | fp16 | off: ``auto`` is bf16 on a GPU and off on CPU (bf16 is ~8x slower than fp32 on AVX2)."""
    if tc["amp"] == "auto":
        return "bf16" if device.type == "cuda" else "off"
    return tc["amp"]


def _autocast(tc: dict, device):
    import contextlib

    import torch

    amp = _amp(tc, device)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@functools.lru_cache(maxsize=8)
def _norm(mean: tuple, std: tuple, device: str):
    import torch

    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0,
            torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0)


def _inputs(batch: dict, tc: dict, device):
    """uint8 NHWC images -> normalised float32 [B, 3, S, S] on ``device``: the copy to a GPU moves a quarter of the
    bytes, and the permuted uint8 tensor is already channels_last in memory (no copy when channels_last is on)."""
    import torch

    mean, std = _norm(tuple(tc["mean"]), tuple(tc["std"]), str(device))
    x = (batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float() - mean) / std
    x = x.contiguous(memory_format=torch.channels_last if tc["channels_last"] else torch.contiguous_format)
    return x, batch["label"].to(device, non_blocking=True)


def train_one_epoch(model, optimizer, batches, tc: dict, device, deadline: float | None = None) -> dict:
    import torch.nn.functional as F

    from dermray.models import logits_of, train_mode

    import torch

    train_mode(model)
    # fp16 gradients underflow without loss scaling; for bf16 and fp32 the scaler is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=_amp(tc, device) == "fp16")
    n, loss_sum, correct, wait, compute, stopped, skipped = 0, 0.0, 0, 0.0, 0.0, False, 0
    t = time.perf_counter()
    for batch in batches:
        t_data = time.perf_counter()
        wait += t_data - t
        if len(batch["label"]) < 2:
            # Batch norm cannot train on one image (inception_v3's aux head raised on a fold whose size left
            # a last batch of one); that image is seen again next epoch, shuffled into another batch.
            skipped += len(batch["label"])
            t = time.perf_counter()
            continue
        x, y = _inputs(batch, tc, device)
        with _autocast(tc, device):
            out = model(x)
            logits = logits_of(out)
            loss = F.cross_entropy(logits, y)
            if getattr(out, "aux_logits", None) is not None:
                loss = loss + tc["aux_loss_weight"] * F.cross_entropy(out.aux_logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if tc.get("slow_batches_s"):  # tests: stretch an epoch so a fault can land inside it
            time.sleep(tc["slow_batches_s"])
        b = len(y)
        n += b
        loss_sum += float(loss.detach()) * b
        correct += int((logits.detach().argmax(1) == y).sum())
        t = time.perf_counter()
        compute += t - t_data
        if deadline is not None and time.time() > deadline:
            stopped = True  # the training-time budget is spent
            break
    return {"loss": loss_sum / max(n, 1), "top1": correct / max(n, 1), "images": n, "data_wait_s": wait,
            "compute_s": compute, "images_per_s": n / max(wait + compute, 1e-9), "stopped_by_budget": stopped,
            "images_skipped": skipped}


def evaluate(model, batches, tc: dict, device, matrices: dict, task_names: list[str]) -> tuple[dict, dict]:
    """Validation loss, top-1 on training classes and accuracy on each task through the inference algorithm
    (summed training-class probabilities; argmax ties count as wrong). Also returns the probabilities."""
    import torch
    import torch.nn.functional as F

    from dermray.metrics import predicted_class

    model.eval()
    n, loss_sum, correct = 0, 0.0, 0
    task_correct = {t: 0 for t in task_names}
    task_n = {t: 0 for t in task_names}
    ids, probs_all = [], []
    with torch.inference_mode():
        for batch in batches:
            x, y = _inputs(batch, tc, device)
            with _autocast(tc, device):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            probs = torch.softmax(logits, 1).cpu().numpy()
            probs_all.append(probs.astype(np.float32))
            ids.extend(batch["image_id"])
            if task_names:
                truth = batch["task_truth"].numpy()
                for j, name in enumerate(task_names):
                    keep = truth[:, j] >= 0
                    pred = predicted_class(probs[keep] @ matrices[name])
                    task_correct[name] += int((pred == truth[keep, j]).sum())
                    task_n[name] += int(keep.sum())
    out = {"loss": loss_sum / max(n, 1), "top1": correct / max(n, 1), "images": n}
    for name in task_names:
        out[f"acc_{name}"] = task_correct[name] / task_n[name] if task_n[name] else float("nan")
    return out, {"image_id": ids, "probs": np.concatenate(probs_all) if probs_all else np.zeros((0, 0))}


def _batches(shard, batch_size: int, shuffle_seed: int | None = None):
    """uint8 [B, S, S, 3] images and int64 labels as torch tensors (``_inputs`` normalises them on the model's
    device); image ids stay strings. With ``shuffle_seed``, images are drawn at random from a buffer of four
    batches (the rows were also permuted once on the driver), so each epoch's batches differ."""
    import warnings

    import torch

    # Ray hands out read-only arrays; the tensors made from them are model inputs, never written to.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    shuffle = {} if shuffle_seed is None else {"local_shuffle_buffer_size": 4 * batch_size,
                                                "local_shuffle_seed": shuffle_seed}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2, **shuffle):
        out = {"image": torch.from_numpy(batch["image"]), "label": torch.from_numpy(batch["label"]),
               "image_id": list(batch["image_id"])}
        if "task_truth" in batch:
            out["task_truth"] = torch.from_numpy(batch["task_truth"])
        yield out


class EpochBatches:
    """The training batches of epochs ``first`` .. ``stop - 1``, pulled by one background thread into a queue of
    ``queue_batches``: when an epoch's last batch is queued the thread starts the next epoch's Ray Data execution,
    so its start-up (2-3 s on 2 CPUs until the first decoded block arrives: measured in
    benchmarks/train_throughput.py) overlaps the training of those queued batches and the validation pass instead of
    stalling the model. ``make_batches(epoch)`` returns that epoch's batch iterator; an error in it is raised in the
    consumer. Use as a context manager: leaving it stops the thread (e.g. when the time budget ends an epoch)."""

    _END = object()

    def __init__(self, make_batches, first: int, stop: int, queue_batches: int = 4):
        self._make, self._first, self._stop_epoch = make_batches, first, stop
        self._queue = queue.Queue(maxsize=queue_batches)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="dermray-epoch-batches", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for epoch in range(self._first, self._stop_epoch):
                batches = self._make(epoch)
                try:
                    for batch in batches:
                        if not self._put((epoch, batch)):
                            return
                finally:
                    if hasattr(batches, "close"):
                        batches.close()  # ends that epoch's Ray Data execution when we stop early
                if not self._put((epoch, self._END)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((None, e))

    def epoch(self, epoch: int):
        """Yields the batches of ``epoch`` (those an earlier epoch left unread are dropped)."""
        while True:
            e, item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if e < epoch:
                continue
            if e > epoch:
                raise RuntimeError(f"epoch {epoch} was asked for after epoch {e} had started")
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._closed.set()
        give_up = time.monotonic() + 60.0  # a thread stuck in Ray is left behind (daemon) rather than hang training
        while self._thread.is_alive() and time.monotonic() < give_up:
            try:  # unblocks a put; its batch is not needed
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_threads(torch_threads: int | None, cpus_per_worker: float) -> int:
    return torch_threads or max(1, int(cpus_per_worker))


def train_loop_per_worker(config: dict) -> None:
    """One fold. ``config``: the TrainConfig as a dict plus n_classes, classes_hash, matrices, task_names, fold,
    fold_dir (where metrics and validation predictions go), pid_file (tests)."""
    import torch

    import ray.train
    from ray.train import Checkpoint

    from dermray.models import build_model

    tc = config
    if tc.get("pid_file"):
        storage.write_text(tc["pid_file"], str(os.getpid()))
    torch.manual_seed(tc["seed"])
    torch.set_num_threads(worker_threads(tc["torch_threads"], tc["cpus_per_worker"]))
    device = torch.device("cuda" if tc["use_gpu"] and torch.cuda.is_available() else "cpu")
    model = build_model(tc["arch"], tc["n_classes"], tc["weights"], tc["freeze"]).to(device)
    if tc["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], tc)
    scheduler = make_scheduler(optimizer, tc)
    start_epoch, history, best = 0, [], None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)
            if state["classes_hash"] != tc["classes_hash"]:
                raise ValueError(f"checkpoint {d} was trained on other training classes ({state['classes_hash']} vs "
                                 f"{tc['classes_hash']}): use another run id")
            model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"]) + 1
            with open(os.path.join(d, "history.json")) as f:
                history = json.load(f)
            best = state.get("best")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if tc["has_val"] else None
    # The budget counts training seconds across resumptions (they are in the history).
    spent = sum(h.get("train_seconds", 0.0) for h in history)
    budget = tc["max_minutes"] * 60.0 if tc.get("max_minutes") else None
    epoch_batches = EpochBatches(
        lambda epoch: _batches(train_shard, tc["batch_size"], shuffle_seed=tc["seed"] + epoch),
        start_epoch, tc["epochs"])
    with epoch_batches:
        for epoch in range(start_epoch, tc["epochs"]):
            if budget is not None and spent >= budget:
                break
            t0 = time.time()
            if tc.get("events_file"):  # tests: which epochs a worker started, to see what resuming skipped
                with open(tc["events_file"], "a") as f:
                    f.write(f"{epoch}\n")
            deadline = t0 + (budget - spent) if budget is not None else None
            tr = train_one_epoch(model, optimizer, epoch_batches.epoch(epoch), tc, device, deadline)
            tr["seconds"] = time.time() - t0
            spent += tr["seconds"]
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            metrics = {"epoch": epoch, "lr": lr, "t_start": t0, **{f"train_{k}": v for k, v in tr.items()}}
            if val_shard is not None:
                va, preds = evaluate(model, _batches(val_shard, tc["batch_size"]), tc, device,
                                     tc["matrices"], tc["task_names"])
                metrics.update({f"val_{k}": v for k, v in va.items()})
                score = metrics[tc["checkpoint_metric"]]
                better = best is None or (score < best if tc["checkpoint_metric"].endswith("loss") else score > best)
                if better and ray.train.get_context().get_world_rank() == 0:
                    best = score
                    _write_predictions(preds, tc, epoch)
            metrics["t_end"] = time.time()
            history.append(metrics)
            with tempfile.TemporaryDirectory() as d:
                torch.save(model.state_dict(), os.path.join(d, "model.pt"))
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "classes_hash": tc["classes_hash"], "best": best}, os.path.join(d, "train_state.pt"))
                with open(os.path.join(d, "history.json"), "w") as f:
                    json.dump(history, f)
                ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                 checkpoint=Checkpoint.from_directory(d))
            if tr["stopped_by_budget"]:
                break


def _write_predictions(preds: dict, tc: dict, epoch: int) -> None:
    table = pa.table({
        "image_id": pa.array(preds["image_id"], pa.string()),
        "model_id": pa.array([tc["model_id"]] * len(preds["image_id"]), pa.string()),
        "probs": pa.array(list(preds["probs"]), pa.list_(pa.float32())),
        "epoch": pa.array([epoch] * len(preds["image_id"]), pa.int32()),
    })
    storage.write_table(table, storage.join(tc["fold_dir"], "val_predictions_raw.parquet"))


# ---- the stage ----------------------------------------------------------------------------------------------------
def _fold_names(table: pa.Table, tcfg: TrainConfig) -> list:
    present = sorted(set(table.column("fold").to_pylist()))
    folds = list(tcfg.folds) or present
    unknown = [f for f in folds if f not in present]
    if unknown:
        raise UserError(f"train.folds {unknown} are not in the labels (folds present: {present})")
    return folds + ([FINAL] if tcfg.final_model else [])


def _check_run_classes(fold_dir: str, hash_: str) -> None:
    marker = storage.join(fold_dir, "run.json")
    if storage.exists(marker):
        seen = json.loads(storage.read_text(marker)).get("classes_hash")
        if seen != hash_:
            raise UserError(f"{storage.redact(fold_dir)} holds checkpoints trained on other training classes "
                            f"(hash {seen}, this partition {hash_}): use another run_id or remove that run")
    else:
        storage.write_text(marker, json.dumps({"classes_hash": hash_}))


def fit_fold(fold, inputs: dict, datasets: dict, cfg: RunConfig, extra: dict):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dermray.models import spec

    tcfg = cfg.train
    run_dir = storage.join(cfg.output, "train", cfg.run_id)
    name = f"fold={fold}"
    fold_dir = storage.join(run_dir, name)
    _check_run_classes(fold_dir, inputs["hash"])
    s = spec(tcfg.arch)
    loop_config = asdict(tcfg) | {
        "n_classes": inputs["classes"].num_rows, "classes_hash": inputs["hash"], "matrices": inputs["matrices"],
        "task_names": inputs["task_names"], "fold_dir": fold_dir, "has_val": "val" in datasets,
        "model_id": f"{cfg.run_id}/{name}", "image_size": tcfg.image_size or s.input_size,
        "mean": list(s.mean), "std": list(s.std),
    } | extra
    fs, path = storage.arrow_filesystem(run_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=tcfg.use_gpu,
                                     resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        run_config=TrainRunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.keep_checkpoints, checkpoint_score_attribute=tcfg.checkpoint_metric
                if "val" in datasets else "train_loss",
                checkpoint_score_order="min" if tcfg.checkpoint_metric.endswith("loss") else "max"),
            # Ray starts workers with OMP_NUM_THREADS=1 unless told; torch.set_num_threads alone left the worker's
            # intra-op pools narrower than a plain process's (measured in benchmarks/train_throughput.py).
            worker_runtime_env={"env_vars": {
                v: str(worker_threads(tcfg.torch_threads, tcfg.cpus_per_worker))
                for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}},
        ),
        datasets=datasets,
        # One worker per fold: a split would only put a coordinator actor between Ray Data and the worker.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    t0 = time.time()
    result = trainer.fit()
    return fold, fold_dir, result, time.time() - t0


def _datasets_for(fold, table: pa.Table, cfg: RunConfig, inputs: dict) -> dict:
    import ray.data

    from dermray.models import spec

    tcfg = cfg.train
    s = spec(tcfg.arch)
    size = tcfg.image_size or s.input_size
    if fold == FINAL:
        train_rows, val_rows = table, None
    else:
        is_val = pc.equal(table.column("fold"), fold)
        train_rows, val_rows = table.filter(pc.invert(is_val)), table.filter(is_val)
    # The table is sorted by image_id, which in real archives follows upload batches (and so diagnoses): training
    # blocks get a seeded random order of rows, mixed again per epoch by the worker's shuffle buffer.
    order = np.random.default_rng([tcfg.seed, zlib.crc32(str(fold).encode())]).permutation(train_rows.num_rows)
    train_rows = train_rows.take(pa.array(order))
    args = dict(size=size, max_pixels=tcfg.max_pixels)

    def pipeline(rows: pa.Table, train: bool):
        # Blocks of a few batches: decoding spreads over the cluster's free CPUs while the worker trains.
        return ray.data.from_arrow(blocks_of(rows, 4 * tcfg.batch_size)).map_batches(
            decode_transform, fn_kwargs=args | {"train": train}, batch_size=tcfg.batch_size,
            num_cpus=tcfg.data_cpus)

    out = {"train": pipeline(train_rows, True)}
    if val_rows is not None and val_rows.num_rows:
        out["val"] = pipeline(val_rows, False)
    return out


def run(cfg: RunConfig, _extra: dict | None = None) -> dict:
    """Train every requested fold (concurrently) and write the per-fold and summary outputs."""
    from dermray.models import spec
    from dermray.raysession import ray_session

    tcfg = cfg.train
    t_start = time.perf_counter()
    spec(tcfg.arch)  # unknown model -> clear error before anything starts
    if tcfg.optimizer not in ("rmsprop", "adamw"):
        raise UserError(f"train.optimizer must be rmsprop or adamw, got {tcfg.optimizer!r}")
    if tcfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise UserError(f"train.amp must be auto, bf16, fp16 or off, got {tcfg.amp!r}")
    if tcfg.epochs < 1 or tcfg.batch_size < 1:
        raise UserError("train.epochs and train.batch_size must be at least 1")
    inputs = load_inputs(cfg)
    if inputs["classes"].num_rows < 2:
        raise UserError(f"the partition has {inputs['classes'].num_rows} training class: nothing to classify "
                        "(lower partition.max_class_size)")
    table = inputs["table"]
    folds = _fold_names(table, tcfg)
    run_dir = storage.join(cfg.output, "train", cfg.run_id)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus) as ray:
        import ray.data

        bad = ray.data.from_arrow(blocks_of(table.select(["image_id", "uri"]), 512)).map_batches(
            find_undecodable, fn_kwargs={"max_pixels": tcfg.max_pixels}, batch_size=256).take_all()
        storage.write_table(pa.Table.from_pylist([{"stage": STAGE, "image_id": b["image_id"], "row": None,
                                                   "uri": b["uri"], "reason": b["reason"]} for b in bad],
                                                 schema=schemas.QUARANTINE.arrow()),
                            storage.join(run_dir, "quarantine.parquet"))
        if bad:
            bad_ids = pa.array([b["image_id"] for b in bad], pa.string())
            table = table.filter(pc.invert(pc.is_in(table.column("image_id"), bad_ids)))
        extra = dict(_extra or {})
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(folds)) as pool:
            futures = [pool.submit(fit_fold, fold, inputs, _datasets_for(fold, table, cfg, inputs), cfg,
                                   {k: (v.format(fold=fold) if isinstance(v, str) else v) for k, v in extra.items()})
                       for fold in folds]
            results = [f.result() for f in futures]
    fold_rows = []
    for fold, fold_dir, result, seconds in results:
        if result.error is not None:
            raise RuntimeError(f"fold {fold} failed: {result.error}") from result.error
        fold_rows.append(finish_fold(fold, fold_dir, result, cfg, inputs, table, seconds))
    summary_table = summarise(fold_rows, inputs["task_names"])
    storage.write_table(pa.Table.from_pandas(summary_table, preserve_index=False),
                        storage.join(run_dir, "train_summary.parquet"))
    summary = {"stage": STAGE, "run_id": cfg.run_id, "arch": tcfg.arch, "folds": [str(f) for f in folds],
               "images": table.num_rows + len(bad), "trained_on": table.num_rows, "quarantined": len(bad),
               "per_fold": fold_rows, "summary": summary_table.to_dict(orient="records"),
               "outputs": {"run": run_dir, "summary": storage.join(run_dir, "train_summary.parquet")},
               "seconds": round(time.perf_counter() - t_start, 1)}
    storage.write_text(storage.join(run_dir, "train_summary.json"), json.dumps(summary, indent=2, default=str))
    return summary


def finish_fold(fold, fold_dir: str, result, cfg: RunConfig, inputs: dict, table: pa.Table, seconds: float) -> dict:
    """metrics.parquet, best/model.pt, model_card.json and val_predictions.parquet for one fold."""
    import torch
    import torchvision

    import ray

    from dermray import __version__
    from dermray.models import spec

    tcfg = cfg.train
    latest = result.checkpoint
    with latest.as_directory() as d:
        with open(os.path.join(d, "history.json")) as f:
            history = json.load(f)
    rows = []
    for h in history:
        for key, value in h.items():
            if key in ("epoch", "t_start", "t_end"):
                continue
            split, _, metric = key.partition("_") if key.startswith(("train_", "val_")) else ("", "", key)
            rows.append({"epoch": h["epoch"], "split": split or "train", "metric": metric or key,
                         "value": float(value)})
    storage.write_table(pa.Table.from_pylist(rows), storage.join(fold_dir, "metrics.parquet"))
    has_val = any("val_loss" in h for h in history)
    metric = tcfg.checkpoint_metric if has_val else "train_loss"
    best_ckpt, best_metrics = latest, history[-1]
    if result.best_checkpoints:
        lower = metric.endswith("loss")
        best_ckpt, best_metrics = sorted(result.best_checkpoints, key=lambda cm: cm[1].get(metric, math.inf)
                                         * (1 if lower else -1))[0]
    with best_ckpt.as_directory() as d:
        storage.write_bytes(storage.join(fold_dir, "best", "model.pt"), open(os.path.join(d, "model.pt"), "rb").read())
    raw = storage.join(fold_dir, "val_predictions_raw.parquet")
    if has_val and storage.exists(raw):
        preds = storage.read_table(raw).to_pandas()
        present = storage.parquet_file(cfg.data.manifest).schema_arrow.names
        carry = table.select(["image_id", "label", "class_index"]).to_pandas().merge(
            storage.read_table(cfg.data.manifest, columns=[c for c in ("image_id", "label_source", "modality",
                                                                      "group_id") if c in present]).to_pandas(),
            on="image_id", how="left")
        merged = preds.merge(carry, on="image_id", how="left", validate="one_to_one").sort_values("image_id")
        merged["probs"] = [np.asarray(p, np.float32) for p in merged["probs"]]
        out = pa.Table.from_pandas(merged, preserve_index=False)
        out = out.set_column(out.column_names.index("probs"), "probs",
                             pa.array(list(merged["probs"]), pa.list_(pa.float32())))
        storage.write_table(out, storage.join(fold_dir, "val_predictions.parquet"))
    s = spec(tcfg.arch)
    classes = inputs["classes"].to_pandas()
    card = {
        "model_id": f"{cfg.run_id}/fold={fold}", "architecture": tcfg.arch,
        "weights_source": tcfg.weights if tcfg.weights in ("imagenet", "none") else storage.redact(tcfg.weights),
        "freeze": tcfg.freeze, "input_size": tcfg.image_size or s.input_size,
        "normalisation": {"mean": list(s.mean), "std": list(s.std)},
        "training_classes": classes[["class_index", "node_id", "name", "scope"]].to_dict(orient="records"),
        "classes_hash": inputs["hash"], "fold": str(fold), "held_out_fold": None if fold == FINAL else fold,
        "data_hash": _table_hash(table.select(["image_id", "class_index", "fold"])),
        "config_hash": hashlib.sha256(json.dumps(asdict(tcfg), sort_keys=True).encode()).hexdigest()[:16],
        "config": asdict(tcfg) | {"weights": tcfg.weights if tcfg.weights in ("imagenet", "none")
                                  else storage.redact(tcfg.weights)},
        "versions": {"dermray": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "ray": ray.__version__},
        "epochs_trained": len(history), "best_epoch": int(best_metrics.get("epoch", history[-1]["epoch"])),
        "validation": {k: v for k, v in best_metrics.items() if k.startswith("val_")},
        "checkpoint": storage.join(fold_dir, "best", "model.pt"),
    }
    storage.write_text(storage.join(fold_dir, "model_card.json"), json.dumps(card, indent=2, default=str))
    return {"fold": str(fold), "epochs": len(history), "best_epoch": card["best_epoch"], "seconds": round(seconds, 1),
            "t_start": history[0].get("t_start"), "t_end": history[-1].get("t_end"),
            **{k: v for k, v in best_metrics.items() if k.startswith("val_")}}


def _table_hash(table: pa.Table) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(table.to_pandas(), index=False).to_numpy().tobytes()
                          ).hexdigest()[:16]


def summarise(fold_rows: list[dict], task_names: list[str]) -> pd.DataFrame:
    """Mean and sd over the cross-validation folds of each validation metric (Extended Data Table 2 form)."""
    cv = [r for r in fold_rows if r["fold"] != FINAL]
    keys = ["val_top1", "val_loss"] + [f"val_acc_{t}" for t in task_names]
    rows = []
    for k in keys:
        vals = np.array([r[k] for r in cv if k in r], dtype=float)
        if len(vals):
            rows.append({"metric": k, "mean": float(np.nanmean(vals)),
                         "sd": float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else float("nan"), "folds": len(vals)})
    return pd.DataFrame(rows, columns=["metric", "mean", "sd", "folds"])


def format_summary(s: dict) -> str:
    lines = [f"train: {s['arch']}, run {s['run_id']}, folds {', '.join(s['folds'])}: {s['images']} images = "
             f"{s['trained_on']} used + {s['quarantined']} quarantined ({s['seconds']} s)"]
    for r in s["per_fold"]:
        lines.append(f"  fold {r['fold']}: {r['epochs']} epochs, best epoch {r['best_epoch']}, "
                     + ", ".join(f"{k}={v:.3f}" for k, v in r.items() if k.startswith("val_")))
    for r in s["summary"]:
        lines.append(f"  {r['metric']:<32} {r['mean']:.3f} +- {r['sd']:.3f} over {r['folds']} folds")
    lines.append(f"  outputs: {s['outputs']['run']}")
    return "\n".join(lines)
