"""Ray Data for training: images that cannot be decoded found and quarantined first, the inner selection split,
the decode-and-augment pipeline (balanced by source or modality on request), the held-out fold measured once."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dermray.errors import UserError
from dermray.runtime.config import RunConfig, TrainConfig
from dermray.runtime.raysession import blocks_of
from dermray.runtime.trainloop import FoldJob, worker_threads
from dermray.stages.train.shared import FINAL, STAGE
from dermray.store import schemas, storage


def find_undecodable(batch: dict, max_pixels: int, retry: storage.Retry = storage.DEFAULT_RETRY) -> dict:
    """Ray Data batch fn: the rows whose image cannot be read or decoded, with the reason."""
    from dermray.core.transforms import ImageDecodeError, decode_image

    bad_ids, bad_uris, reasons = [], [], []
    for image_id, uri in zip(batch["image_id"], batch["uri"]):
        try:
            decode_image(storage.read_bytes(uri, retry), max_pixels)
        except (ImageDecodeError, UserError) as e:
            bad_ids.append(image_id)
            bad_uris.append(uri)
            reasons.append(str(e))
    return {"image_id": np.array(bad_ids, dtype=object), "uri": np.array(bad_uris, dtype=object),
            "reason": np.array(reasons, dtype=object)}


def decode_transform(batch: dict, size: int, train: bool, max_pixels: int, pre=None, photometric=None,
                     retry: storage.Retry = storage.DEFAULT_RETRY) -> dict:
    """Ray Data batch fn: read, decode and transform images -> uint8 [B, S, S, 3] (normalised on the worker:
    a quarter of the bytes of float32 through the object store). Augmentation draws fresh randomness every call,
    so every epoch sees new rotations and flips."""
    from dermray.core.transforms import NO_PREPROCESS, decode_image, eval_transform, train_transform

    rng = np.random.default_rng()
    pre = pre or NO_PREPROCESS
    images = []
    for uri in batch["uri"]:
        img = decode_image(storage.read_bytes(uri, retry), max_pixels)
        img = train_transform(img, size, rng, pre, photometric) if train else eval_transform(img, size, pre)
        images.append(np.asarray(img, dtype=np.uint8))
    out = {"image": np.stack(images), "label": batch["class_index"].astype(np.int64), "image_id": batch["image_id"]}
    if "task_truth" in batch:
        out["task_truth"] = np.stack(batch["task_truth"]).astype(np.int64)
    return out


@dataclass(frozen=True)
class TrainingRows:
    """The rows the folds trained from (unreadable images set aside) and how many were set aside."""
    table: pa.Table
    quarantined: int


def quarantine_unreadable(table: pa.Table, cfg: RunConfig, run_dir: str) -> TrainingRows:
    """Decode every image once in Ray Data tasks; those that fail go to ``quarantine.parquet`` and out of the
    table."""
    import ray.data

    bad = ray.data.from_arrow(blocks_of(table.select(["image_id", "uri"]), 512)).map_batches(
        find_undecodable,  # type: ignore[arg-type]  # Ray's stubs: a batch-only fn (fn_kwargs pass the rest)
        fn_kwargs={"max_pixels": cfg.train.max_pixels, "retry": cfg.storage.retry()}, batch_size=256).take_all()
    storage.write_table(pa.Table.from_pylist([{"stage": STAGE, "image_id": b["image_id"], "row": None,
                                               "uri": b["uri"], "reason": b["reason"]} for b in bad],
                                             schema=schemas.QUARANTINE.arrow()),
                        storage.join(run_dir, "quarantine.parquet"))
    if not bad:
        return TrainingRows(table, 0)
    bad_ids = pa.array([b["image_id"] for b in bad], pa.string())
    return TrainingRows(table.filter(pc.invert(pc.is_in(table.column("image_id"), bad_ids))), len(bad))


def inner_selection(rows: pa.Table, fraction: float, seed: int) -> np.ndarray:
    """bool [n]: the rows of the inner selection split - the images of about ``fraction`` of the lesions (a seeded
    hash of the group), never split from their lesion; at least one lesion when there are two or more."""
    groups = rows.column("group").to_numpy(zero_copy_only=False)
    u = _group_draw(groups, seed)
    chosen = u < fraction
    if not chosen.any() and len(np.unique(groups)) >= 2:
        chosen = groups == groups[int(np.argmin(u))]
    return chosen


def _group_draw(groups: np.ndarray, seed: int) -> np.ndarray:
    """float [n] in [0, 1): a seeded hash of each row's group - the same for a group in every fold."""
    from dermray.core.partitioning import hash_strings

    return (hash_strings(groups, seed ^ 0x5E1EC7) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def never_trained(table: pa.Table, tcfg: TrainConfig, folds: list[str]) -> np.ndarray:
    """bool [n]: the rows that none of the cross-validation models of ``folds`` trains on. The inner split's draw
    is the same for a lesion in every fold, so a lesion drawn (below train.selection_fraction) is in the selection
    split of every fold that does not hold it out, and held out by the one that does: none of the folds' models
    learns from its images. With one fold, its held-out images too. (The fallback of ``inner_selection`` - one
    lesion when none is drawn - is not among them.)"""
    out = np.zeros(table.num_rows, bool)
    if len(folds) == 1:
        out |= pc.equal(pc.cast(table.column("fold"), pa.string()), str(folds[0])).to_numpy(zero_copy_only=False)
    if tcfg.selection == "inner" and table.num_rows:
        out |= _group_draw(table.column("group").to_numpy(zero_copy_only=False), tcfg.seed) < tcfg.selection_fraction
    return out


def split_rows(fold, table: pa.Table, tcfg: TrainConfig) -> dict[str, pa.Table]:
    """The fold's rows: "train" (what it learns from), "select" (the inner split that picks the epoch, with
    train.selection: inner) and "val" (the held-out fold, measured after training; none for the final model)."""
    if fold == FINAL:
        rest, val = table, None
    else:
        is_val = pc.equal(table.column("fold"), fold)
        rest, val = table.filter(pc.invert(is_val)), table.filter(is_val)
    out = {}
    if tcfg.selection == "inner":
        chosen = inner_selection(rest, tcfg.selection_fraction, tcfg.seed)
        out["select"] = rest.filter(pa.array(chosen))
        rest = rest.filter(pa.array(~chosen))
    out["train"] = rest
    if val is not None and val.num_rows:
        out["val"] = val
    return {k: v for k, v in out.items() if v.num_rows}


def image_pipeline(rows: pa.Table, train: bool, cfg: RunConfig, size: int):
    """Ray Data: blocks of a few batches, decoded, preprocessed (and augmented when ``train``) in tasks that spread
    over the cluster's free CPUs while the worker trains."""
    import ray.data

    tcfg = cfg.train
    kwargs = {"size": size, "max_pixels": tcfg.max_pixels, "train": train, "pre": cfg.transforms.preprocess(),
              "photometric": cfg.transforms.augmentation() if train else None, "retry": cfg.storage.retry()}
    return ray.data.from_arrow(blocks_of(rows, 4 * tcfg.batch_size)).map_batches(
        decode_transform,  # type: ignore[arg-type]  # Ray's stubs: a batch-only fn (fn_kwargs pass the rest)
        fn_kwargs=kwargs, batch_size=tcfg.batch_size, num_cpus=tcfg.data_cpus)


def balanced(rows: pa.Table, by: str, seed: int) -> pa.Table:
    """``rows`` with every value of column ``by`` (source or modality) repeated up to the largest one's count, so
    that each weighs the same in an epoch (whole repeats, then a seeded sample of the remainder)."""
    if by not in rows.column_names:
        return rows
    values = np.asarray(pc.fill_null(rows.column(by), "unspecified").to_numpy(zero_copy_only=False)).astype(str)
    kinds, counts = np.unique(values, return_counts=True)
    rng = np.random.default_rng([seed, 0xBA1])
    take = []
    for kind, n in zip(kinds, counts):
        idx = np.flatnonzero(values == kind)
        reps, rest = divmod(int(counts.max()), int(n))
        take += [np.tile(idx, reps), rng.choice(idx, rest, replace=False)]
    return rows.take(pa.array(np.sort(np.concatenate(take))))


def datasets_for(fold, rows: dict[str, pa.Table], cfg: RunConfig, size: int) -> dict:
    """The worker's datasets: "train" and, with an inner split, "select" (the held-out fold is not among them)."""
    tcfg = cfg.train
    train_rows = rows["train"]
    if tcfg.balance != "none":
        train_rows = balanced(train_rows, tcfg.balance, tcfg.seed)
    # The table is sorted by image_id, which in real archives follows upload batches (and so diagnoses): training
    # blocks get a seeded random order of rows, mixed again per epoch by the worker's shuffle buffer.
    order = np.random.default_rng([tcfg.seed, zlib.crc32(str(fold).encode())]).permutation(train_rows.num_rows)
    out = {"train": image_pipeline(train_rows.take(pa.array(order)), True, cfg, size)}
    if "select" in rows:
        out["select"] = image_pipeline(rows["select"], False, cfg, size)
    return out


def held_out_batches(rows: pa.Table, job: FoldJob, pre, retry: storage.Retry):
    """The held-out rows decoded here, batch by batch, as torch tensors (no Ray Data: a task that holds CPUs while
    waiting for decode tasks deadlocks a full cluster)."""
    import torch

    for start in range(0, rows.num_rows, job.train.batch_size):
        part = rows.slice(start, job.train.batch_size).to_pydict()
        batch = {k: np.array(v, dtype=object if k in ("image_id", "uri") else None) for k, v in part.items()
                 if k in ("image_id", "uri", "class_index", "task_truth")}
        out = decode_transform(batch, job.image_size, False, job.train.max_pixels, pre, None, retry)
        item = {"image": torch.from_numpy(out["image"]), "label": torch.from_numpy(out["label"]),
                "image_id": list(out["image_id"])}
        if "task_truth" in out:
            item["task_truth"] = torch.from_numpy(out["task_truth"])
        yield item


def ensemble_probabilities(job: FoldJob, weights: list[bytes], rows: pa.Table, pre, retry: storage.Retry,
                           tta: str) -> dict:
    """Ray task: the mean softmax over the models (``weights``) and the test-time-augmentation views ``tta`` of
    ``rows`` - what scoring computes for an image (stages/score/actors.py), in fp32. {"image_id", "probs"
    float32 [n, n_classes]}."""
    import io

    import torch

    from dermray.runtime.trainloop import model_inputs
    from dermray.store.models import build_model, mean_probabilities, state_dict_from_bytes

    torch.set_num_threads(worker_threads(job.train.torch_threads, job.train.cpus_per_worker))
    device = torch.device("cuda" if job.train.use_gpu and torch.cuda.is_available() else "cpu")
    models = [build_model(job.train.arch, job.n_classes, state_dict_from_bytes(io.BytesIO(w), job.fold_dir))
              .to(device).eval() for w in weights]
    ids, probs = [], []
    with torch.inference_mode():
        for batch in held_out_batches(rows, job, pre, retry):
            x, _ = model_inputs(batch, job, device)
            probs.append(mean_probabilities(models, x, tta).cpu().numpy())
            ids += batch["image_id"]
    return {"image_id": ids, "probs": np.concatenate(probs) if probs else np.zeros((0, job.n_classes), np.float32)}


def measure_held_out(job: FoldJob, weights: bytes, rows: pa.Table, pre, retry: storage.Retry
                     ) -> tuple[dict, dict]:
    """Ray task: the chosen model on the held-out fold, once - (loss, top-1, task accuracies; probabilities)."""
    import io

    import torch

    from dermray.runtime.trainloop import validate
    from dermray.store.models import build_model, state_dict_from_bytes

    torch.set_num_threads(worker_threads(job.train.torch_threads, job.train.cpus_per_worker))
    device = torch.device("cuda" if job.train.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(job.train.arch, job.n_classes, state_dict_from_bytes(io.BytesIO(weights), job.fold_dir))
    model = model.to(device)
    if job.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    metrics, preds = validate(model, held_out_batches(rows, job, pre, retry), job, device)
    return {f"val_{k}": v for k, v in metrics.items()}, preds
