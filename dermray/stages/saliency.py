"""Saliency stage: attribution maps for chosen images, computed over Ray Data, written to object storage, with the
sanity checks that say whether a method's maps mean anything.

Images come from a predictions table (``dermray score`` output): the top-K and bottom-K scored images of each task,
the misclassified ones, or listed ids. Each Ray Data actor builds the model once and, for every image and method
(``dermray/runtime/attribution.py``), writes under ``<output>/saliency/<run_id>/<method>/`` a PNG (the image beside its
overlay) and the raw map as float16 ``.npy`` at the image's own size. Also under ``<output>/saliency/<run_id>/``:
``saliency_index.parquet`` (image_id, task, method, target, score, png_uri, npy_uri, inside_lesion when masks are
given, label, true_class, reason), ``sanity.parquet`` (the model-parameter randomisation test per method and level),
``gallery.html`` (one row per class, the paper's saliency-figure form, and the sanity results) and
``saliency_summary.json``.
"""
from __future__ import annotations

import copy
import html
import logging
import re
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from dermray.core.formatting import duration, strict_json
from dermray.core.inference import binary_task_score, membership_matrix, task_probabilities, truth_for_task
from dermray.errors import UserError
from dermray.runtime import artifacts, layout, progress, registry
from dermray.runtime.config import RunConfig, SaliencyConfig
from dermray.store import lineage, storage

log = logging.getLogger("dermray.saliency")
STAGE = "saliency"
TRAINING_CLASS = "__training_class__"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


# ---- selection (pure) --------------------------------------------------------------------------------------------
def targets_matrix(n_classes: int, tasks, membership: pd.DataFrame) -> tuple[np.ndarray, dict]:
    """[n_classes, n_classes + sum of task classes]: the identity (training classes) then each task's membership;
    and the column offset of each task (TRAINING_CLASS -> 0)."""
    blocks, offsets, col = [np.eye(n_classes)], {TRAINING_CLASS: 0}, n_classes
    for task in tasks:
        offsets[task.name] = col
        blocks.append(membership_matrix(membership, task, n_classes))
        col += len(task.classes)
    return np.concatenate(blocks, axis=1).astype(np.float32), offsets


def select_images(df: pd.DataFrame, probs: np.ndarray, tasks, membership: pd.DataFrame, tax, sc: SaliencyConfig
                  ) -> pd.DataFrame:
    """One row per (image, task) to explain: image_id, uri, label, task, true_class, score, target, target_col
    (column within the task, or the training class with target=training_class), reason."""
    rows = []
    for task in tasks:
        tp = task_probabilities(probs, membership, task)
        truth = truth_for_task(tax, task, df["label"].to_numpy())
        if task.is_binary:
            pos = task.class_names.index(task.positive)
            # NaN when not estimable (a class no training class lies under): nothing of this task is selected
            score = binary_task_score(probs, membership_matrix(membership, task, probs.shape[1]), pos)
            predicted = np.where(score >= 0.5, pos, 1 - pos)
        else:
            score = tp.max(axis=1)
            predicted = tp.argmax(axis=1)
        ok = (truth >= 0) & np.isfinite(score)
        idx = np.flatnonzero(ok)
        if sc.select == "top_bottom":
            order = idx[np.argsort(-score[idx], kind="stable")]
            picks = [(i, "top") for i in order[:sc.k]] + [(i, "bottom") for i in order[::-1][:sc.k]]
        elif sc.select == "misclassified":
            wrong = idx[predicted[idx] != truth[idx]]
            confidence = np.abs(score[wrong] - 0.5) if task.is_binary else score[wrong]
            picks = [(i, "misclassified") for i in wrong[np.argsort(-confidence, kind="stable")][:sc.k]]
        else:  # ids
            wanted = set(sc.image_ids)
            picks = [(i, "listed") for i in idx if df["image_id"].iloc[i] in wanted]
        seen = set()
        for i, reason in picks:
            if i in seen:
                continue
            seen.add(i)
            if sc.target == "positive" and task.is_binary:
                target, col = task.positive, task.class_names.index(task.positive)
            elif sc.target in ("positive", "predicted"):
                target, col = task.class_names[int(predicted[i])], int(predicted[i])
            else:  # training_class
                col = int(probs[i].argmax())
                target = f"training class {col}"
            rows.append({"image_id": df["image_id"].iloc[i], "uri": df["uri"].iloc[i], "label": df["label"].iloc[i],
                         "task": task.name, "true_class": task.class_names[int(truth[i])],
                         "score": float(score[i]), "target": target, "target_col": col, "reason": reason})
    if sc.select == "ids":
        found = {r["image_id"] for r in rows}
        missing = [i for i in sc.image_ids if i not in found]
        if missing:
            raise UserError(f"saliency.image_ids not in the predictions (or in no selected task): {missing[:5]}")
    return pd.DataFrame(rows, columns=["image_id", "uri", "label", "task", "true_class", "score", "target",
                                       "target_col", "reason"])


# ---- the Ray Data actor --------------------------------------------------------------------------------------------
def build_explainer(ens, matrix: np.ndarray, threads: int, use_gpu: bool):
    """(the model wrapped as the target's log-probability, its last convolutional block for Grad-CAM, device)."""
    import torch

    from dermray.runtime.attribution import TargetLogProb
    from dermray.store.models import get_module, spec

    torch.set_num_threads(max(1, threads))
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model = artifacts.load_member(ens, 0, device)
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to the input only
    f = TargetLogProb(model, matrix).to(device).eval()
    return f, get_module(model, spec(ens.arch).last_conv), device


def load_images(uris, ens, device):
    """Original RGB images (uint8 [H, W, 3]) and the model's input batch [B, 3, S, S]."""
    import torch

    from dermray.core.transforms import decode_image, eval_transform, to_array

    originals, xs = [], []
    pre = ens.first.preprocessing()  # as the model was trained
    for uri in uris:
        img = decode_image(storage.read_bytes(uri))
        originals.append(np.asarray(img, dtype=np.uint8))
        xs.append(to_array(eval_transform(img, ens.size, pre), ens.mean, ens.std))
    return originals, torch.from_numpy(np.stack(xs)).to(device)


class Explainer:
    """Ray Data actor: the model built once; ``__call__`` computes every method's maps for a batch of selected
    images, writes the PNGs and .npy files, and returns their index rows."""

    def __init__(self, ens, matrix: np.ndarray, methods: list[str], sc: dict, out_dir: str, threads: int,
                 use_gpu: bool):
        self.f, self.layer, self.device = build_explainer(ens, matrix, threads, use_gpu)
        self.ens, self.methods, self.sc, self.out_dir = ens, methods, sc, out_dir

    def __call__(self, batch: dict) -> dict:
        import torch

        from dermray.runtime.attribution import attribute, inside_fraction, npy_bytes, overlay_png, resize_map

        originals, x = load_images(list(batch["uri"]), self.ens, self.device)
        targets = torch.as_tensor(batch["col"].astype(np.int64), device=self.device)
        out: dict[str, list] = {k: [] for k in ("image_id", "task", "method", "png_uri", "npy_uri", "inside_lesion")}
        for method in self.methods:
            maps = attribute(self.f, x, targets, method, layer=self.layer, smooth_samples=self.sc["smooth_samples"],
                             smooth_noise=self.sc["smooth_noise"], ig_steps=self.sc["ig_steps"], seed=self.sc["seed"])
            for i, (image_id, task) in enumerate(zip(batch["image_id"], batch["task"])):
                img = originals[i]
                m = resize_map(maps[i], img.shape[0], img.shape[1])
                stem = f"{_safe(image_id)}__{_safe(task)}"
                png = storage.join(self.out_dir, method, f"{stem}.png")
                npy = storage.join(self.out_dir, method, f"{stem}.npy")
                storage.write_bytes(png, overlay_png(img, m))
                storage.write_bytes(npy, npy_bytes(m))
                inside = np.nan
                if self.sc["masks"]:
                    inside = inside_fraction(m, _mask(self.sc["masks"], image_id, img.shape[:2]))
                for k, v in (("image_id", image_id), ("task", task), ("method", method), ("png_uri", png),
                             ("npy_uri", npy), ("inside_lesion", inside)):
                    out[k].append(v)
        return {k: np.array(v, dtype=np.float64 if k == "inside_lesion" else object) for k, v in out.items()}


def _mask(pattern: str, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The lesion mask of an image (any image whose non-zero pixels are the lesion), at the image's size."""
    from PIL import Image

    from dermray.core.transforms import decode_image

    img = decode_image(storage.read_bytes(pattern.format(image_id=image_id))).convert("L")
    if img.size != (shape[1], shape[0]):
        img = img.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(img) > 127


# ---- sanity checks -------------------------------------------------------------------------------------------------
def sanity_rows(ens, matrix: np.ndarray, audit: pd.DataFrame, methods: list[str], sc: dict, threads: int,
                use_gpu: bool) -> list[dict]:
    """The cascading model-parameter randomisation test on the audit images: per method and level, the mean
    Spearman rank correlation and SSIM between the original maps and the randomised model's maps, and how many of
    the randomised maps are blank (a level with a blank map is inconclusive: a low similarity to nothing proves
    nothing)."""
    import torch

    from dermray.runtime.attribution import (
        TargetLogProb,
        attribute,
        blank,
        cascade,
        randomise,
        recalibrate_batchnorm,
        spearman,
        ssim,
    )
    from dermray.store.models import get_module, spec

    f, layer, device = build_explainer(ens, matrix, threads, use_gpu)
    _, x = load_images(list(audit["uri"]), ens, device)
    targets = torch.as_tensor(audit["col"].to_numpy(np.int64), device=device)
    s = spec(ens.arch)
    kw = dict(smooth_samples=sc["smooth_samples"], smooth_noise=sc["smooth_noise"], ig_steps=sc["ig_steps"],
              seed=sc["seed"])
    rows = []
    for method in methods:
        original = attribute(f, x, targets, method, layer=layer, **kw)
        model = f.model
        n_levels = len(cascade(s.stages(model), [get_module(model, h) for h in s.heads], sc["sanity_levels"]))
        for level in range(n_levels):
            rmodel = copy.deepcopy(model)
            heads = [get_module(rmodel, h) for h in s.heads]
            name, modules = cascade(s.stages(rmodel), heads, sc["sanity_levels"])[level]
            randomise(modules, seed=sc["seed"] + 1)
            recalibrate_batchnorm(rmodel, modules, x)
            rf = TargetLogProb(rmodel, matrix).to(device).eval()
            rmaps = attribute(rf, x, targets, method, layer=get_module(rmodel, s.last_conv), **kw)
            sp = [spearman(a, b) for a, b in zip(original, rmaps)]
            ss = [ssim(a, b) for a, b in zip(original, rmaps)]
            constant = sum(int(blank(m, o)) for m, o in zip(rmaps, original))
            rows.append({"method": method, "level": level, "randomised": name, "spearman": float(np.nanmean(sp))
                         if np.isfinite(sp).any() else float("nan"), "ssim": float(np.nanmean(ss)),
                         "n_images": len(audit), "constant_maps": constant})
    return rows


# The sanity verdict's smallest audit: the verdict compares a mean similarity over the audit images with
# saliency.flag_similarity (0.5 by default), and one image's map moves a mean of n correlations by up to 2/n: below
# six images a single map moves it by more than a third of the way from 0 to that threshold.
MIN_SANITY_IMAGES = 6
RISE_TOLERANCE = 0.1  # a mean similarity that rises by more than this with randomisation is not noise


def _first_and_last(rows: list[dict]) -> dict[str, tuple[dict, dict]]:
    out: dict[str, tuple[dict, dict]] = {}
    for method in {r["method"] for r in rows}:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["level"])
        out[method] = (mine[0], mine[-1])
    return out


def _rises(first: dict, last: dict) -> bool:
    return bool(np.isfinite(first["spearman"]) and np.isfinite(last["spearman"])
                and last["spearman"] > first["spearman"] + RISE_TOLERANCE)


def flag_methods(rows: list[dict], threshold: float) -> dict[str, str]:
    """Methods the test does not pass: maps at full randomisation that still resemble the originals (Spearman or
    SSIM above threshold), or an inconclusive test - blank maps at full randomisation, or a similarity that rises
    as more of the network is randomised (the test expects it to fall)."""
    flags = {}
    for method, (first, last) in _first_and_last(rows).items():
        if last["constant_maps"]:
            flags[method] = (f"inconclusive: {last['constant_maps']} of {last['n_images']} maps are blank when every "
                             "layer is randomised, so their low similarity proves nothing")
        elif _rises(first, last):
            flags[method] = (f"inconclusive: the similarity rises as more of the network is randomised (Spearman "
                             f"{first['spearman']:.2f} -> {last['spearman']:.2f}); the test expects it to fall")
        elif last["spearman"] > threshold or last["ssim"] > threshold:
            flags[method] = (f"maps barely change when every layer is randomised (Spearman {last['spearman']:.2f}, "
                             f"SSIM {last['ssim']:.2f}): they do not depend on what the model learned")
    return flags


def sanity_verdict(rows: list[dict]) -> tuple[bool, str]:
    """(conclusive?, why): the test decided something when it ran on at least MIN_SANITY_IMAGES images and, for
    every method, no fully randomised map is blank and the similarity did not rise with randomisation."""
    if not rows:
        return False, "not run"
    n = min(r["n_images"] for r in rows)
    if n < MIN_SANITY_IMAGES:
        return False, f"{n} audit image(s), fewer than the {MIN_SANITY_IMAGES} the verdict needs (saliency.audit_size)"
    why = [f"{m}: blank maps at full randomisation" if last["constant_maps"] else
           f"{m}: similarity rises with randomisation" for m, (first, last) in sorted(_first_and_last(rows).items())
           if last["constant_maps"] or _rises(first, last)]
    return (False, "; ".join(why)) if why else (True, f"on {n} images")


# ---- the stage -----------------------------------------------------------------------------------------------------
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


def explain(chosen: pd.DataFrame, ens, matrix, sc: SaliencyConfig, sc_dict: dict, rdir: str, threads: int):
    """The maps of every selected (image, task), computed and written by a Ray Data actor pool; their index rows."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from dermray.runtime.raysession import blocks_of

    work = pa.Table.from_pandas(chosen[["image_id", "uri", "task", "col"]], preserve_index=False)
    if not work.num_rows:
        return pd.DataFrame(columns=["image_id", "task", "method", "png_uri", "npy_uri", "inside_lesion"])
    ds = ray.data.from_arrow(blocks_of(work, sc.batch_size)).map_batches(
        Explainer, batch_size=sc.batch_size, compute=ActorPoolStrategy(size=sc.actors),
        num_cpus=sc.cpus_per_actor, num_gpus=sc.num_gpus or None,
        fn_constructor_kwargs={"ens": ens, "matrix": matrix, "methods": list(sc.methods), "sc": sc_dict,
                               "out_dir": rdir, "threads": threads, "use_gpu": sc.num_gpus > 0})
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
    return index[["image_id", "task", "method", "target", "score", "png_uri", "npy_uri", "inside_lesion", "label",
                  "true_class", "reason"]].sort_values(["task", "method", "image_id"]).reset_index(drop=True)


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
        index = index_table(explain(chosen, ens, matrix, sc, sc_dict, rdir, threads), chosen)
        check_written(index, rdir)
        if sc.sanity and len(chosen):
            audit = chosen.sort_values(["image_id", "task"]).drop_duplicates("image_id").head(sc.audit_size)
            # Ray takes num_gpus=None (its default) though its stubs say int | float
            remote = ray.remote(num_cpus=sc.cpus_per_actor, num_gpus=sc.num_gpus or None)(  # type: ignore[arg-type]
                sanity_rows)
            progress.say("saliency: sanity test on %d images (%d randomisation levels x %d method(s))", len(audit),
                         sc.sanity_levels, len(sc.methods))
            sanity = ray.get(remote.remote(ens, matrix, audit, list(sc.methods), sc_dict, threads, sc.num_gpus > 0))
    return write_outputs(cfg, inp, index, sanity, rdir, t_start)


def write_outputs(cfg: RunConfig, inp: SaliencyInputs, index: pd.DataFrame, sanity: list, rdir: str,
                  t_start: float) -> dict:
    """The index, the sanity table, the gallery and the summary of a run (the summary is returned)."""
    sc, tasks = cfg.saliency, inp.tasks
    storage.write_table(pa.Table.from_pandas(index, preserve_index=False),
                        storage.join(rdir, "saliency_index.parquet"))
    flags = flag_methods(sanity, sc.flag_similarity) if sanity else {}
    conclusive, why = sanity_verdict(sanity)
    sanity_df = pd.DataFrame(sanity, columns=["method", "level", "randomised", "spearman", "ssim", "n_images",
                                              "constant_maps"])
    sanity_df["flagged"] = sanity_df["method"].map(lambda m: m in flags)
    storage.write_table(pa.Table.from_pandas(sanity_df, preserve_index=False), storage.join(rdir, "sanity.parquet"))
    storage.write_text(storage.join(rdir, "gallery.html"),
                       gallery_html(cfg, index, sanity_df, flags, (conclusive, why), tasks, rdir))
    summary = {"stage": STAGE, "run_id": cfg.run_id, "model_id": inp.ens.model_id, "methods": list(sc.methods),
               "selected": len(inp.chosen), "maps": len(index),
               "explained": int(index[["image_id", "task"]].drop_duplicates().shape[0]) if len(index) else 0,
               "tasks": [t.name for t in tasks],
               "inside_lesion_mean": {m: float(g.mean()) for m, g in index.groupby("method")["inside_lesion"]
                                      if g.notna().any()},
               "sanity": sanity, "sanity_conclusive": conclusive, "sanity_why": why,
               "flagged": flags,
               "lineage": registry.stage_lineage(STAGE, cfg, inp.lineage_inputs).to_dict(),
               "outputs": {"index": storage.join(rdir, "saliency_index.parquet"),
                           "sanity": storage.join(rdir, "sanity.parquet"),
                           "gallery": storage.join(rdir, "gallery.html")},
               "seconds": round(time.perf_counter() - t_start, 2)}
    storage.write_text(layout.summary_uri(cfg.output, STAGE, cfg.run_id), strict_json(summary))
    return summary


def counts(s: dict) -> dict:
    """Selected (image, task) pairs in = pairs explained (each by every method) + 0 (an unreadable image fails the
    stage: it was scored, so it was readable)."""
    return {"in": s["selected"], "out": s["explained"], "quarantined": 0, "seconds": s["seconds"]}


def _relative(uri: str, base: str) -> str:
    return uri[len(base):].lstrip("/") if uri.startswith(base) else uri


def gallery_html(cfg: RunConfig, index: pd.DataFrame, sanity: pd.DataFrame, flags: dict, verdict: tuple[bool, str],
                 tasks, rdir: str) -> str:
    """The paper's saliency-figure form: per task, one row per class (the images whose truth is that class), each
    image with every method's overlay; then the sanity-check table. Links are relative: the page works where the
    folder is (local, or an S3 static site)."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dermray saliency {e(cfg.run_id)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;vertical-align:top}"
             "img{height:150px}.flag{color:#b00;font-weight:bold}table{border-collapse:collapse}"
             "th{background:#eee}</style></head><body>",
             f"<h1>Saliency maps — run {e(cfg.run_id)}</h1>",
             "<p>Each image is shown beside its map (brighter = the pixels whose change moves the target's "
             "log-probability most). Maps explain one model; the sanity checks below say whether a method's maps "
             "depend on what the model learned.</p>"]
    for task in tasks:
        sub = index[index["task"] == task.name]
        if sub.empty:
            continue
        parts.append(f"<h2>{e(task.name)}</h2><table>")
        for cls in task.class_names:
            rows = sub[sub["true_class"] == cls]
            cells = []
            for image_id, g in rows.groupby("image_id", sort=True):
                r0 = g.iloc[0]
                imgs = "".join(f"<div>{e(m)}<br><img src='{e(_relative(u, rdir))}' alt='{e(image_id)} {e(m)}'></div>"
                               for m, u in zip(g["method"], g["png_uri"]))
                cells.append(f"<td><b>{e(image_id)}</b><br>score {r0['score']:.3f} ({e(r0['reason'])}), target "
                             f"{e(str(r0['target']))}{imgs}</td>")
            parts.append(f"<tr><th>{e(cls)}<br>({len(cells)} images)</th>{''.join(cells) or '<td>none</td>'}</tr>")
        parts.append("</table>")
    parts.append("<h2>Sanity checks: model-parameter randomisation (Adebayo et al. 2018)</h2>")
    if sanity.empty:
        parts.append("<p>Not run.</p>")
    else:
        parts.append("<table><tr><th>method</th><th>randomised</th><th>Spearman</th><th>SSIM</th><th>images</th>"
                     "<th>blank maps</th></tr>")
        for r in sanity.itertuples():
            parts.append(f"<tr><td>{e(r.method)}</td><td>{e(r.randomised)}</td><td>{r.spearman:.3f}</td>"
                         f"<td>{r.ssim:.3f}</td><td>{r.n_images}</td><td>{r.constant_maps}</td></tr>")
        parts.append("</table><p>Similarity should fall as more of the network is randomised. A blank map "
                     "(Grad-CAM's final ReLU blanks a map whose weighted activations are all negative) scores 0, so "
                     "a low similarity built on blank maps says nothing: such a level is inconclusive.</p>")
        decided, why = verdict  # sanity_verdict's (conclusive?, why)
        parts.append(f"<p><b>Verdict: {'conclusive' if decided else 'inconclusive'}</b> ({e(why)}).</p>")
        for m, why in flags.items():
            parts.append(f"<p class='flag'>{e(m)}: {e(why)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def format_summary(s: dict) -> str:
    lines = [f"saliency: {s['selected']} selected (image, task) pairs -> {s['maps']} maps "
             f"({', '.join(s['methods'])}) with {s['model_id']} ({duration(s['seconds'])})"]
    for m, v in s["inside_lesion_mean"].items():
        lines.append(f"  {m}: {v:.1%} of the attribution inside the lesion on average")
    for m, why in s["flagged"].items():
        lines.append(f"  FLAGGED {m}: {why}")
    if s["sanity"]:
        last = {}
        for r in s["sanity"]:
            last[r["method"]] = r
        for m, r in last.items():
            constant = f" ({r['constant_maps']} of {r['n_images']} maps blank)" if r.get("constant_maps") else ""
            lines.append(f"  sanity {m}: fully randomised Spearman {r['spearman']:.2f}, SSIM {r['ssim']:.2f}{constant}")
        why = s.get("sanity_why", "")
        lines.append("  sanity test: " + (f"conclusive ({why})" if s.get("sanity_conclusive") else
                                          f"INCONCLUSIVE ({why or 'blank maps at full randomisation'})"))
    lines.append(f"  gallery: {s['outputs']['gallery']}")
    return "\n".join(lines)
