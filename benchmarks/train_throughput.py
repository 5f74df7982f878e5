"""Training throughput of one fold: dermray's Ray Train path (Ray Data decoding + augmentation streamed to a
TorchTrainer worker) vs a bare PyTorch loop (torch DataLoader with 2 worker processes running the same decode,
colour constancy and augmentation), same model, same images, same batch size, same torch threads, channels_last and
fp32 (``train.amp=off``) in both, in the same run, for mobilenet_v3_small (224 px) and inception_v3 (299 px).
Steady state: the last of the epochs (the first pays start-up). Needs ../shared/data/ham10000.

Both sides are timed twice:

- with validation: dermray as configured by default (``train.selection=inner``: after each epoch a pass over the
  inner selection split, 10 % of the fold's training lesions, not trained on; then a checkpoint), the bare loop
  doing the same each epoch (an eval-mode pass over the same selection images, then ``torch.save`` of the model
  and optimizer). The rate is the last epoch's training images over its whole period, from the end of the previous
  epoch's validation to the end of its own (training + validation + the checkpoint between): what a user waits.
  dermray's next epoch starts decoding while the selection pass runs; that overlap now counts on both sides.
- without validation: dermray with ``train.selection=last`` (no per-epoch pass) and the bare loop validating
  nothing, both training on all the fold's training images; the rate is the last epoch's training images over its
  data-wait + compute seconds (what dermray's metrics.parquet records as images_per_s).

The held-out fold, which dermray measures once after training, is outside every timed period.

``ratio`` (the headline, kept from before) is the with-validation ratio of the worse model (``ratio_uses`` says so):
both sides do what a run does each epoch. ``ratio_with_validation`` and ``ratio_without_validation`` are given
apart (each the worse model's), and per model.

Run with no arguments (``DERMRAY_BENCH_SMOKE=1``: mobilenet_v3_small only, 96 images at 64 px, results to a
temporary folder):

    .venv/bin/python benchmarks/train_throughput.py      # ~12 minutes on 2 cores

Writes benchmarks/results/train_throughput/results.json. Last line JSON: ratio, ratio_uses, ratio_with_validation,
ratio_without_validation and per model (<arch>_...): dermray_images_per_s, bare_images_per_s, ratio (the figures
the headline uses), the same with _with_validation / _without_validation, dermray_data_wait_s,
channels_last_speedup.
"""
from __future__ import annotations

import glob
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SMOKE, last_line, size, write_results  # noqa: E402

HAM = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA",
                                  pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")) / "ham10000"
THREADS = 2
CASES = size({  # model: (images per class, epochs, batch size, image size (None: the model's))
    "mobilenet_v3_small": (400, 3, 32, None),  # ~800 training images an epoch (~15 s): 240 was mostly start-up
    "inception_v3": (60, 2, 8, None),  # ~120 training images an epoch: 5 steps (20 per class) was all start-up
}, {  # smoke: mobilenet_v3_small only (each case is four Ray Train runs), at 64 px
    "mobilenet_v3_small": (24, 2, 8, 64),
})
MODES = ("with_validation", "without_validation")
SELECTION = {"with_validation": "inner", "without_validation": "last"}


def prepare(tmp: pathlib.Path, per_class: int) -> pathlib.Path:
    from dermray.cli import main

    labels = pd.read_csv(HAM / "labels.csv")
    subset = pd.concat([labels[labels.dx == dx].head(per_class) for dx in ("nv", "mel", "bkl", "bcc")])
    subset.to_csv(tmp / "labels.csv", index=False)
    assert main(["import", "ham10000", "--metadata", str(tmp / "labels.csv"), "--images", str(HAM / "images"),
                 "--output", str(tmp / "in")]) == 0
    assert main(["partition", "--manifest", str(tmp / "in" / "manifest.parquet"), "--taxonomy",
                 str(tmp / "in" / "taxonomy.parquet"), "--max-class-size", str(per_class // 2), "--folds", "2",
                 "--output", str(tmp / "out"), "--run-id", "bench"]) == 0
    return tmp


def config(tmp: pathlib.Path, arch: str, epochs: int, batch: int, image_size, mode: str):
    from dermray.runtime.config import load_config

    return load_config(None, [f"data.manifest={tmp / 'in' / 'manifest.parquet'}", f"output={tmp / 'out'}",
                              f"run_id=bench-{arch}-{mode}", f"train.arch={arch}", "train.weights=none",
                              f"train.epochs={epochs}", f"train.batch_size={batch}", "train.folds=[0]",
                              "train.cpus_per_worker=1", f"train.torch_threads={THREADS}", "train.amp=off",
                              f"train.selection={SELECTION[mode]}",
                              *([f"train.image_size={image_size}"] if image_size else []),
                              f"train.partition={tmp / 'out' / 'partition' / 'bench'}"])


def fold_rows(cfg) -> dict:
    """The rows fold 0 trains on ("train") and selects its epoch on ("select", with train.selection=inner), as
    dermray's own split_rows cuts them: the bare loop uses the same images."""
    from dermray.stages.train.data import split_rows
    from dermray.stages.train.plan import plan

    p = plan(cfg)
    return {k: v.to_pandas() for k, v in split_rows(0, p.table, cfg.train).items()}


def run_dermray(cfg, mode: str) -> dict:
    from dermray.runtime import layout
    from dermray.stages import train

    train.run(cfg)
    run_dir = layout.train_dir(cfg.output, cfg.run_id)
    m = pd.read_parquet(os.path.join(run_dir, "fold=0", "metrics.parquet"))
    last_epoch = int(m.epoch.max())
    last = m[(m.epoch == last_epoch) & (m.split == "train")].set_index("metric")["value"]
    # Every epoch's start and end (after its selection pass, before its checkpoint): the latest checkpoint's history.
    histories = [json.load(open(f)) for f in glob.glob(os.path.join(run_dir, "**", "history.json"), recursive=True)]
    history = max(histories, key=len)
    out = {"train_images_per_s": float(last["images_per_s"]), "data_wait_s": float(last["data_wait_s"]),
           "compute_s": float(last["compute_s"]), "images": int(last["images"]), "epochs": last_epoch + 1,
           "precision": history[-1].get("precision")}
    if len(history) >= 2:
        period = history[-1]["t_end"] - history[-2]["t_end"]
        out["period_s"] = period
        out["select_images"] = int(history[-1].get("select_images", 0))
        out["select_s"] = history[-1]["t_end"] - history[-1]["t_start"] - history[-1]["train_seconds"]
    out["images_per_s"] = out["images"] / out["period_s"] if mode == "with_validation" else out["train_images_per_s"]
    return out


class HamDataset:
    def __init__(self, rows: pd.DataFrame, size: int, mean, std, train: bool, pre, photometric):
        self.uris, self.labels = rows["uri"].tolist(), rows["class_index"].to_numpy()
        self.size, self.mean, self.std, self.train, self.pre, self.ph = size, mean, std, train, pre, photometric

    def __len__(self):
        return len(self.uris)

    def __getitem__(self, i):
        import torch

        from dermray.core.transforms import decode_image, eval_transform, to_array, train_transform

        rng = np.random.default_rng()
        with open(self.uris[i], "rb") as f:
            img = decode_image(f.read())
        img = train_transform(img, self.size, rng, self.pre, self.ph) if self.train else eval_transform(
            img, self.size, self.pre)
        return torch.from_numpy(to_array(img, self.mean, self.std)), int(self.labels[i])


def run_bare(cfg, rows: dict, n_classes: int, mode: str, ckpt_dir: str) -> dict:
    import torch
    import torch.nn.functional as F

    from dermray.runtime.trainloop import make_optimizer
    from dermray.store import models

    tc = cfg.train
    torch.set_num_threads(THREADS)
    spec = models.spec(tc.arch)
    image_size = tc.image_size or spec.input_size
    model = models.build_model(tc.arch, n_classes, weights="none").to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), tc)
    pre, ph = cfg.transforms.preprocess(), cfg.transforms.augmentation()
    loader = torch.utils.data.DataLoader(
        HamDataset(rows["train"], image_size, spec.mean, spec.std, True, pre, ph), batch_size=tc.batch_size,
        shuffle=True, num_workers=2, persistent_workers=True)
    validating = mode == "with_validation"
    val_loader = torch.utils.data.DataLoader(
        HamDataset(rows["select"], image_size, spec.mean, spec.std, False, pre, None), batch_size=tc.batch_size,
        num_workers=2, persistent_workers=True) if validating else None
    t_end_prev = t_end = None
    for epoch in range(tc.epochs):
        model.train()
        n, wait, compute = 0, 0.0, 0.0
        t = time.perf_counter()
        for x, y in loader:
            t_data = time.perf_counter()
            wait += t_data - t
            if len(y) < 2:  # as dermray: batch norm cannot train on one image
                t = time.perf_counter()
                continue
            x = x.contiguous(memory_format=torch.channels_last)  # as dermray's default
            out = model(x)
            logits = models.logits_of(out)
            loss = F.cross_entropy(logits, y)
            if getattr(out, "aux_logits", None) is not None:
                loss = loss + tc.aux_loss_weight * F.cross_entropy(out.aux_logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
            t = time.perf_counter()
            compute += t - t_data
        if validating:
            model.eval()
            seen = 0
            with torch.inference_mode():
                for x, y in val_loader:
                    F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
                    seen += len(y)
            t_end_prev, t_end = t_end, time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                       os.path.join(ckpt_dir, "checkpoint.pt"))
    out = {"train_images_per_s": n / (wait + compute), "data_wait_s": wait, "compute_s": compute, "images": n}
    if validating:
        out["period_s"] = t_end - t_end_prev
        out["select_images"] = seen
    out["images_per_s"] = n / out["period_s"] if validating else out["train_images_per_s"]
    return out


def channels_last_speedup(arch: str, batch: int, image_size, steps: int = 4) -> float:
    """Training steps per second on one fixed batch with channels_last over without (no data loading): whether
    train.channels_last should be on for CPU training."""
    import torch
    import torch.nn.functional as F

    from dermray.store import models

    torch.set_num_threads(THREADS)
    size_px = image_size or models.spec(arch).input_size
    x, y = torch.randn(batch, 3, size_px, size_px), torch.randint(0, 4, (batch,))
    rates = {}
    for cl in (False, True):
        torch.manual_seed(0)
        model = models.build_model(arch, 4, weights="none").train()
        xb = x
        if cl:
            model, xb = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for i in range(steps + 1):
            if i == 1:
                t = time.perf_counter()
            loss = F.cross_entropy(models.logits_of(model(xb)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rates[cl] = steps / (time.perf_counter() - t)
    return rates[True] / rates[False]


def main() -> None:
    import ray

    if not (HAM / "labels.csv").exists():
        sys.exit(f"HAM10000 not found at {HAM}")
    started = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    results = {}
    for arch, (per_class, epochs, batch, image_size) in CASES.items():
        with tempfile.TemporaryDirectory() as t:
            tmp = prepare(pathlib.Path(t), per_class)
            n_classes = len(pd.read_parquet(tmp / "out" / "partition" / "bench" / "training_classes.parquet"))
            r = {}
            for mode in MODES:
                cfg = config(tmp, arch, epochs, batch, image_size, mode)
                rows = fold_rows(cfg)
                d = run_dermray(cfg, mode)
                b = run_bare(cfg, rows, n_classes, mode, t)
                r[mode] = {"dermray": d, "bare": b, "ratio": d["images_per_s"] / b["images_per_s"]}
                print(f"{arch} {mode}: dermray {d['images_per_s']:.2f} img/s, bare {b['images_per_s']:.2f} img/s",
                      flush=True)
            results[arch] = r
    ray.shutdown()
    for arch, (_, _, batch, image_size) in CASES.items():
        results[arch]["channels_last_speedup"] = channels_last_speedup(arch, batch, image_size)
    print()
    print(f"{'model':<20} {'mode':<19} {'path':<8} {'images/s':>9} {'epoch s':>8} {'data wait s':>12} "
          f"{'compute s':>10} {'images':>7}")
    for arch, r in results.items():
        for mode in MODES:
            for path in ("dermray", "bare"):
                x = r[mode][path]
                print(f"{arch:<20} {mode:<19} {path:<8} {x['images_per_s']:>9.2f} {x.get('period_s', 0):>8.2f} "
                      f"{x['data_wait_s']:>12.2f} {x['compute_s']:>10.2f} {int(x['images']):>7}")
            print(f"{arch:<20} {mode:<19} ratio    {r[mode]['ratio']:>9.2f}")
        print(f"{arch:<20} channels_last training step speed-up on CPU: {r['channels_last_speedup']:.2f}x")
    print(f"machine: {os.cpu_count()} CPUs, torch threads {THREADS}; last epoch of each run; the headline ratio is "
          "with validation on both sides; target ratio >= 0.9"
          + ("  [SMOKE: tiny sizes, not a measurement]" if SMOKE else ""))
    figures = {"ratio": round(min(r["with_validation"]["ratio"] for r in results.values()), 3),
               "ratio_uses": "with_validation",
               **{f"ratio_{mode}": round(min(r[mode]["ratio"] for r in results.values()), 3) for mode in MODES}}
    for arch, r in results.items():
        head = r["with_validation"]
        figures |= {f"{arch}_dermray_images_per_s": round(head["dermray"]["images_per_s"], 3),
                    f"{arch}_bare_images_per_s": round(head["bare"]["images_per_s"], 3),
                    f"{arch}_ratio": round(head["ratio"], 3)}
        for mode in MODES:
            figures |= {f"{arch}_dermray_images_per_s_{mode}": round(r[mode]["dermray"]["images_per_s"], 3),
                        f"{arch}_bare_images_per_s_{mode}": round(r[mode]["bare"]["images_per_s"], 3),
                        f"{arch}_ratio_{mode}": round(r[mode]["ratio"], 3)}
        figures |= {f"{arch}_dermray_data_wait_s": round(r["without_validation"]["dermray"]["data_wait_s"], 3),
                    f"{arch}_channels_last_speedup": round(r["channels_last_speedup"], 3)}
    details = {arch: {"images_per_class": CASES[arch][0], "epochs": CASES[arch][1], "batch": CASES[arch][2],
                      "image_size": CASES[arch][3], **r} for arch, r in results.items()}
    write_results("train_throughput", figures, details, started)
    last_line(figures)


if __name__ == "__main__":
    main()
