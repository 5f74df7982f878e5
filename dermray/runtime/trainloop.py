"""The training of one fold, as it runs inside its Ray Train worker: a typed ``FoldJob`` in, checkpoints and
metrics out. The driver side (which rows, which folds, measuring the chosen model, the model card) is
``dermray/stages/train/``.

Per epoch: the training batches (decoded and augmented by Ray Data, pulled ahead by ``EpochBatches``), with
``train.selection: inner`` a pass over the inner selection split (loss, top-1 on the training classes, accuracy on
each task through the inference algorithm: what picks the epoch), a checkpoint (model, optimizer, scheduler,
epoch, lineage id, history) reported to Ray Train, which keeps the best ``keep_checkpoints`` and restarts a dead
worker from the latest, and one progress line. The held-out fold is never seen here: the driver measures the
chosen model on it afterwards.

Why one module over 400 lines: it is everything that runs inside a Ray Train worker - the file to read when a
fold misbehaves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dermray.runtime import progress as P
from dermray.runtime.config import TrainConfig
from dermray.runtime.faults import NONE, Faults
from dermray.runtime.progress import gather, relay, status
from dermray.store import storage

log = logging.getLogger("dermray.progress")


@dataclass(frozen=True)
class FoldJob:
    """Everything a fold's worker needs: the typed train config plus what the driver derived for this fold."""
    train: TrainConfig
    n_classes: int
    image_size: int  # pixels, square
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fold: str = "0"
    fold_dir: str = ""
    model_id: str = ""
    lineage_id: str = ""  # a checkpoint made under another lineage is never resumed
    has_select: bool = False  # an inner selection split picks the epoch (train.selection: inner)
    matrices: dict = field(default_factory=dict)  # task -> float32 [n_classes, task classes] (inference.py)
    task_names: tuple[str, ...] = ()
    faults: Faults = NONE
    progress: object = None  # a progress.Relay queue: where the epoch lines go (None: this worker's log)

    @property
    def score_key(self) -> str:
        """The history key that ranks checkpoints: the selection metric, a training metric, or the epoch."""
        metric = self.train.checkpoint_metric
        if self.train.selection == "last" or (not self.has_select and not metric.startswith("train_")):
            return "epoch"
        return metric if metric.startswith("train_") else f"select_{metric}"

    @property
    def score_order(self) -> str:
        return "min" if self.score_key.endswith("loss") else "max"


# ---- the model's arithmetic ----------------------------------------------------------------------------------------
def make_optimizer(params, tc: TrainConfig):
    import torch

    if tc.optimizer == "rmsprop":
        # TensorFlow's RMSProp adds epsilon inside the square root (sqrt(ms + 0.1)); PyTorch adds it outside
        # (sqrt(ms) + eps): eps = sqrt(0.1) gives the same damping where it matters (small ms).
        return torch.optim.RMSprop(params, lr=tc.lr, alpha=0.9, momentum=0.9, eps=math.sqrt(0.1),
                                   weight_decay=tc.weight_decay)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay or 0.01)


def make_scheduler(optimizer, tc: TrainConfig):
    import torch

    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=tc.lr_decay_epochs, gamma=1.0 / tc.lr_decay_factor)


def precision(amp: str, device) -> str:
    """bf16 | fp16 | off, without measuring: ``auto`` is bf16 on a GPU and off on a CPU (the worker resolves
    ``auto`` by measurement first, ``resolve_precision``, so that this rule only applies where nothing was
    measured)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    return amp


def resolve_precision(job: FoldJob, model, device) -> tuple[FoldJob, str]:
    """The job with ``train.amp`` resolved (``auto`` -> bf16 or off: dermray/runtime/precision.py, measured on a copy of
    this model's training step where the CPU has native bf16), and why."""
    import copy

    import torch
    import torch.nn.functional as F

    from dermray.runtime import precision as P
    from dermray.store.models import logits_of, train_mode

    def measure():
        probe = copy.deepcopy(model)
        train_mode(probe)
        x = torch.randn(4, 3, job.image_size, job.image_size, device=device)
        if job.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.zeros(4, dtype=torch.long, device=device)

        def step(dtype):
            def run():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = F.cross_entropy(logits_of(probe(x)), y)
                loss.backward()
                probe.zero_grad(set_to_none=True)
            return run
        return P.time_step(step(None)), P.time_step(step(torch.bfloat16))

    amp, why = P.choose(job.train.amp, device, f"train:{job.train.arch}:{job.image_size}", measure)
    return dataclasses.replace(job, train=job.train.model_copy(update={"amp": amp})), why


def autocast(amp: str, device):
    import torch

    p = precision(amp, device)
    if p == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)


@functools.lru_cache(maxsize=8)
def _norm(mean: tuple, std: tuple, device: str):
    import torch

    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0,
            torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0)


def model_inputs(batch: dict, job: FoldJob, device):
    """uint8 NHWC images -> normalised float32 [B, 3, S, S] on ``device``, and the labels: the copy to a GPU moves a
    quarter of the bytes, and the permuted uint8 tensor is already channels_last in memory."""
    import torch

    mean, std = _norm(tuple(job.mean), tuple(job.std), str(device))
    x = (batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float() - mean) / std
    x = x.contiguous(memory_format=torch.channels_last if job.train.channels_last else torch.contiguous_format)
    return x, batch["label"].to(device, non_blocking=True)


IN_EPOCH_EVERY_S = 5.0  # a status inside an epoch at most this often (shown by the driver after a silence)


def train_one_epoch(model, optimizer, batches, job: FoldJob, device, deadline: float | None = None,
                    label: str = "") -> dict:
    """One pass over ``batches``; stops early when ``deadline`` (epoch seconds) passes. Returns the epoch's loss,
    top-1, images, data-wait and compute seconds, images/s, whether the budget stopped it, images skipped. With a
    ``label`` ("fold 0 epoch 2/60"), a status of how far it is every IN_EPOCH_EVERY_S seconds."""
    import torch
    import torch.nn.functional as F

    from dermray.store.models import logits_of, train_mode

    tc = job.train
    train_mode(model)
    # fp16 gradients underflow without loss scaling; for bf16 and fp32 the scaler is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=precision(tc.amp, device) == "fp16")
    n, loss_sum, correct, wait, compute, stopped, skipped = 0, 0.0, 0, 0.0, 0.0, False, 0
    t = time.perf_counter()
    said = t - IN_EPOCH_EVERY_S  # the first status right after the first batch: the fold has started
    for batch in batches:
        t_data = time.perf_counter()
        wait += t_data - t
        if len(batch["label"]) < 2:
            # Batch norm cannot train on one image (inception_v3's aux head raised on a fold whose size left
            # a last batch of one); that image is seen again next epoch, shuffled into another batch.
            skipped += len(batch["label"])
            t = time.perf_counter()
            continue
        x, y = model_inputs(batch, job, device)
        with autocast(tc.amp, device):
            out = model(x)
            logits = logits_of(out)
            loss = F.cross_entropy(logits, y)
            if getattr(out, "aux_logits", None) is not None:
                loss = loss + tc.aux_loss_weight * F.cross_entropy(out.aux_logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if job.faults.slow_batch_s:
            time.sleep(job.faults.slow_batch_s)
        if job.faults.consumed_file:  # tests: which images the model actually trained on
            with open(job.faults.consumed_file, "a") as f:
                f.write("\n".join(batch["image_id"]) + "\n")
        b = len(y)
        n += b
        loss_sum += float(loss.detach()) * b
        correct += int((logits.detach().argmax(1) == y).sum())
        t = time.perf_counter()
        compute += t - t_data
        if label and t - said >= IN_EPOCH_EVERY_S:
            said = t
            status(job.progress, str(job.fold), f"{label}, {n:,} images")
        if deadline is not None and time.time() > deadline:
            stopped = True  # the training-time budget is spent
            break
    return {"loss": loss_sum / max(n, 1), "top1": correct / max(n, 1), "images": n, "data_wait_s": wait,
            "compute_s": compute, "images_per_s": n / max(wait + compute, 1e-9), "stopped_by_budget": stopped,
            "images_skipped": skipped}


def validate(model, batches, job: FoldJob, device) -> tuple[dict, dict]:
    """Validation loss, top-1 on training classes and accuracy on each task through the inference algorithm
    (summed training-class probabilities; argmax ties count as wrong). Also returns the probabilities."""
    import torch
    import torch.nn.functional as F

    from dermray.core.metrics import predicted_class

    model.eval()
    n, loss_sum, correct = 0, 0.0, 0
    task_correct = {t: 0 for t in job.task_names}
    task_n = {t: 0 for t in job.task_names}
    ids, probs_all = [], []
    with torch.inference_mode():
        for batch in batches:
            x, y = model_inputs(batch, job, device)
            with autocast(job.train.amp, device):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            probs = torch.softmax(logits, 1).cpu().numpy()
            probs_all.append(probs.astype(np.float32))
            ids.extend(batch["image_id"])
            if job.task_names:
                truth = batch["task_truth"].numpy()
                for j, name in enumerate(job.task_names):
                    keep = truth[:, j] >= 0
                    pred = predicted_class(probs[keep] @ job.matrices[name])
                    task_correct[name] += int((pred == truth[keep, j]).sum())
                    task_n[name] += int(keep.sum())
    out = {"loss": loss_sum / max(n, 1), "top1": correct / max(n, 1), "images": n}
    for name in job.task_names:
        out[f"acc_{name}"] = task_correct[name] / task_n[name] if task_n[name] else float("nan")
    return out, {"image_id": ids, "probs": np.concatenate(probs_all) if probs_all else np.zeros((0, 0))}


# ---- the data feed ------------------------------------------------------------------------------------------------
def torch_batches(shard, batch_size: int, shuffle_seed: int | None = None):
    """uint8 [B, S, S, 3] images and int64 labels as torch tensors (``model_inputs`` normalises them on the model's
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
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_batches)
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


# ---- the worker ----------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a fold stands: the first epoch still to train, the metric history, the best checkpoint score."""
    start_epoch: int = 0
    history: list = field(default_factory=list)
    best: float | None = None

    @property
    def train_seconds(self) -> float:
        return sum(h.get("train_seconds", 0.0) for h in self.history)


def restore(checkpoint, job: FoldJob, model, optimizer, scheduler) -> Progress:
    """The fold's progress from Ray Train's latest checkpoint (a restarted worker, or a re-run of the same run);
    a checkpoint of another lineage (other folds, classes or training settings) is refused."""
    import torch

    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)
        if state.get("lineage_id") != job.lineage_id:
            raise ValueError(f"checkpoint {d} belongs to lineage {state.get('lineage_id')}, this fold's is "
                             f"{job.lineage_id}: it was trained on other data or settings")
        model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        with open(os.path.join(d, "history.json")) as f:
            history = json.load(f)
        return Progress(int(state["epoch"]) + 1, history, state.get("best"))


def save_checkpoint(job: FoldJob, model, optimizer, scheduler, epoch: int, progress: Progress) -> None:
    import ray.train
    import torch
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        torch.save(model.state_dict(), os.path.join(d, "model.pt"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                    "lineage_id": job.lineage_id, "best": progress.best}, os.path.join(d, "train_state.pt"))
        with open(os.path.join(d, "history.json"), "w") as f:
            json.dump(progress.history, f)
        metrics = progress.history[-1]
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         checkpoint=Checkpoint.from_directory(d))


def _better(score: float, best: float | None, order: str) -> bool:
    return best is None or (score < best if order == "min" else score > best)


def epoch_record(job: FoldJob, metrics: dict, spent_s: float, budget_s: float | None) -> dict:
    """What one fold's epoch line says, as a record (``epoch_lines`` formats it, alone or with the other folds')."""
    epochs = job.train.epochs
    done = metrics["epoch"] + 1
    per_epoch = spent_s / max(done, 1)
    left = (epochs - done) * per_epoch
    by_budget = budget_s is not None and max(budget_s - spent_s, 0.0) < left
    if budget_s is not None:
        left = min(left, max(budget_s - spent_s, 0.0))
    # The selection split's loss and the metric that picks the epoch (top-1 when that is the loss); issue 29: every
    # task's accuracy made the line 204-268 characters wide. They are all in the fold's metrics.parquet.
    metric = job.train.checkpoint_metric
    shown = {"loss", "top1"} if metric in ("loss", "top1") or metric.startswith("train_") else {"loss", metric}
    selected = {k[len("select_"):]: v for k, v in metrics.items() if k.startswith("select_")
                and k[len("select_"):] in shown and isinstance(v, float) and v == v}
    return {"fold": str(job.fold), "epoch": done, "epochs": epochs, "train_loss": float(metrics["train_loss"]),
            "selection": selected, "images_per_s": float(metrics["train_images_per_s"]), "eta_s": left,
            "by_budget": by_budget}


def epoch_line(job: FoldJob, metrics: dict, spent_s: float, budget_s: float | None) -> str:
    """One progress line per epoch: fold, epoch of total, losses, the selection metrics, images/s, time left."""
    return epoch_lines([epoch_record(job, metrics, spent_s, budget_s)])[0]


def _folds(names: list[str]) -> str:
    """"0-2, 5" for fold names that are numbers; the names joined otherwise."""
    if not all(n.isdigit() for n in names):
        return ", ".join(sorted(names))
    nums, runs = sorted({int(n) for n in names}), []  # type: list[int], list[list[int]]
    for n in nums:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}, {b}" if b == a + 1 else f"{a}-{b}" for a, b in runs)


def epoch_lines(records: list[dict]) -> list[str]:
    """One line for an epoch of one or several folds (issue 29: a line per fold and epoch made the demo's console
    54 lines long): the same figures, as ranges over the folds, and the time left for the slowest."""
    from dermray.core.formatting import duration, rate

    first = records[0]

    def span(values: list[float], digits: int) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}-{hi:.{digits}f}"

    one = len(records) == 1
    digits = 3 if one else 2
    head = (f"train: fold {first['fold']} epoch {first['epoch']}/{first['epochs']}" if one else
            f"train: epoch {first['epoch']}/{first['epochs']}, folds {_folds([r['fold'] for r in records])}")
    parts = [head, "train loss " + span([r["train_loss"] for r in records], digits)]
    names = [k for k in first["selection"] if all(k in r["selection"] for r in records)]
    if names:
        parts.append("selection: " + " ".join(f"{k} {span([r['selection'][k] for r in records], digits)}"
                                               for k in names))
    speeds = [r["images_per_s"] for r in records]
    parts.append((f"{rate(speeds[0])}" if one else span(speeds, 0)) + " img/s")
    slowest = max(records, key=lambda r: r["eta_s"])
    parts.append(f"ETA {duration(slowest['eta_s'])}" + (" (budget)" if slowest["by_budget"] else ""))
    return [", ".join(parts)]


def precision_lines(records: list[dict]) -> list[str]:
    """The precision each worker chose, in one line: the measurement when they all say the same; otherwise which
    folds compute in which precision (each worker measures on its own, and on a busy machine they may differ),
    with every worker's measurement in the log file."""
    whys = {r["why"] for r in records}
    if len(whys) == 1:
        return [f"train: computing in {records[0]['why']}"]
    chosen: dict[str, list[str]] = {}
    for r in records:
        chosen.setdefault(r["why"].split(":", 1)[0], []).append(r["fold"])
        P.to_log_only("train: fold %s computing in %s", r["fold"], r["why"])
    said = ", ".join(f"{p} in fold{'s' if len(f) > 1 else ''} {_folds(f)}" for p, f in sorted(chosen.items()))
    return [f"train: computing in {said} (each worker measured its own: the log has the figures)"]


MERGERS = {"epoch": epoch_lines, "precision": precision_lines}  # the Relay's mergers for the records below


def say(queue, topic: str, record: dict, alone: str) -> None:
    """A record for the driver to merge with the other folds' (``MERGERS``), or, with no driver, its line alone."""
    if queue is None:
        relay(None, alone)
    else:
        gather(queue, topic, record["fold"], record)


def run_epochs(job: FoldJob, model, optimizer, scheduler, device, progress: Progress, precision_why: str = "") -> None:
    """Train from ``progress.start_epoch`` to ``train.epochs`` (or until the time budget, counted across
    resumptions, is spent), measuring the selection split and checkpointing every epoch."""
    import ray.train

    tc = job.train
    train_shard = ray.train.get_dataset_shard("train")
    select_shard = ray.train.get_dataset_shard("select") if job.has_select else None
    spent = progress.train_seconds
    budget = tc.max_minutes * 60.0 if tc.max_minutes else None
    epoch_batches = EpochBatches(lambda e: torch_batches(train_shard, tc.batch_size, shuffle_seed=tc.seed + e),
                                 progress.start_epoch, tc.epochs)
    with epoch_batches:
        for epoch in range(progress.start_epoch, tc.epochs):
            if budget is not None and spent >= budget:
                break
            t0 = time.time()
            if job.faults.events_file:  # tests: which epochs a worker started, to see what resuming skipped
                with open(job.faults.events_file, "a") as f:
                    f.write(f"{epoch}\n")
            deadline = t0 + (budget - spent) if budget is not None else None
            tr = train_one_epoch(model, optimizer, epoch_batches.epoch(epoch), job, device, deadline,
                                 label=f"train: fold {job.fold} epoch {epoch + 1}/{tc.epochs}")
            tr["seconds"] = time.time() - t0
            spent += tr["seconds"]
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            metrics = {"epoch": epoch, "lr": lr, "t_start": t0, "precision": {"off": "fp32"}.get(tc.amp, tc.amp),
                       **{f"train_{k}": v for k, v in tr.items()}}
            if select_shard is not None:
                sel, _ = validate(model, torch_batches(select_shard, tc.batch_size), job, device)
                metrics.update({f"select_{k}": v for k, v in sel.items()})
            if _better(metrics[job.score_key], progress.best, job.score_order):
                progress.best = metrics[job.score_key]
            metrics["t_end"] = time.time()
            progress.history.append(metrics)
            save_checkpoint(job, model, optimizer, scheduler, epoch, progress)
            if precision_why and epoch == progress.start_epoch:  # one line for every worker's (MERGERS)
                say(job.progress, "precision", {"fold": str(job.fold), "why": precision_why},
                    f"train: computing in {precision_why}")
            say(job.progress, f"epoch {epoch + 1}", epoch_record(job, metrics, spent, budget),
                epoch_line(job, metrics, spent, budget))
            if tr["stopped_by_budget"]:
                break


def train_loop_per_worker(config: dict) -> None:
    """One fold (Ray Train's entry point): ``config["job"]`` is its FoldJob."""
    import ray.train
    import torch

    from dermray.store.models import build_model

    job: FoldJob = config["job"]
    tc = job.train
    if job.faults.pid_file:
        storage.write_text(job.faults.pid_file, str(os.getpid()))
    torch.manual_seed(tc.seed)
    torch.set_num_threads(worker_threads(tc.torch_threads, tc.cpus_per_worker))
    device = torch.device("cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(tc.arch, job.n_classes, tc.weights, tc.freeze).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    job, why = resolve_precision(job, model, device)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], tc)
    scheduler = make_scheduler(optimizer, tc)
    progress = restore(ray.train.get_checkpoint(), job, model, optimizer, scheduler)
    run_epochs(job, model, optimizer, scheduler, device, progress, why)
