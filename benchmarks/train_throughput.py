"""Training throughput of one fold: dermray's Ray Train path (Ray Data decoding + augmentation streamed to a
TorchTrainer worker) vs a bare PyTorch loop (torch DataLoader with 2 worker processes running the same decode and
augmentation), same model, same images, same batch size, same torch threads, channels_last in both, in the same
run, for mobilenet_v3_small (224 px) and inception_v3 (299 px). Steady state: the last of the epochs (the first pays
start-up). Needs ../shared/data/ham10000. Run with no arguments:

    .venv/bin/python benchmarks/train_throughput.py

Last line JSON: ratio (the worse model's dermray / bare images per second) and each model's figures.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import pandas as pd

HAM = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")) / "ham10000"
THREADS = 2
CASES = {  # model: (images per class, epochs, batch size)
    "mobilenet_v3_small": (400, 3, 32),  # ~800 training images an epoch (~15 s): 240 was mostly start-up
    "inception_v3": (60, 2, 8),  # ~120 training images an epoch: 5 steps (20 per class) was all start-up
}


def prepare(tmp: pathlib.Path, per_class: int) -> tuple[pathlib.Path, pd.DataFrame]:
    from dermray.cli import main

    labels = pd.read_csv(HAM / "labels.csv")
    subset = pd.concat([labels[labels.dx == dx].head(per_class) for dx in ("nv", "mel", "bkl", "bcc")])
    subset.to_csv(tmp / "labels.csv", index=False)
    assert main(["import", "ham10000", "--metadata", str(tmp / "labels.csv"), "--images", str(HAM / "images"),
                 "--output", str(tmp / "in")]) == 0
    assert main(["partition", "--manifest", str(tmp / "in" / "manifest.parquet"), "--taxonomy",
                 str(tmp / "in" / "taxonomy.parquet"), "--max-class-size", str(per_class // 2), "--folds", "2",
                 "--output", str(tmp / "out"), "--run-id", "bench"]) == 0
    lab = pd.read_parquet(tmp / "out" / "partition" / "bench" / "labels.parquet")
    man = pd.read_parquet(tmp / "in" / "manifest.parquet")
    return tmp, lab.merge(man[["image_id", "uri"]], on="image_id")


def run_dermray(tmp: pathlib.Path, arch: str, epochs: int, batch: int) -> dict:
    from dermray import train
    from dermray.config import load_config

    cfg = load_config(None, [f"data.manifest={tmp / 'in' / 'manifest.parquet'}", f"output={tmp / 'out'}",
                             f"run_id=bench-{arch}", f"train.arch={arch}", "train.weights=none",
                             f"train.epochs={epochs}", f"train.batch_size={batch}", "train.folds=[0]",
                             "train.cpus_per_worker=1", f"train.torch_threads={THREADS}",
                             f"train.partition={tmp / 'out' / 'partition' / 'bench'}"])
    train.run(cfg)
    m = pd.read_parquet(tmp / "out" / "train" / f"bench-{arch}" / "fold=0" / "metrics.parquet")
    last = m[(m.epoch == epochs - 1) & (m.split == "train")].set_index("metric")["value"]
    return {"images_per_s": last["images_per_s"], "data_wait_s": last["data_wait_s"],
            "compute_s": last["compute_s"], "images": last["images"]}


class HamDataset:
    def __init__(self, rows: pd.DataFrame, size: int, mean, std):
        self.uris, self.labels = rows["uri"].tolist(), rows["class_index"].to_numpy()
        self.size, self.mean, self.std = size, mean, std

    def __len__(self):
        return len(self.uris)

    def __getitem__(self, i):
        import torch

        from dermray.transforms import decode_image, to_array, train_transform

        rng = np.random.default_rng()
        with open(self.uris[i], "rb") as f:
            img = train_transform(decode_image(f.read()), self.size, rng)
        return torch.from_numpy(to_array(img, self.mean, self.std)), int(self.labels[i])


def run_bare(rows: pd.DataFrame, n_classes: int, arch: str, epochs: int, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dermray import models
    from dermray.train import make_optimizer

    torch.set_num_threads(THREADS)
    spec = models.spec(arch)
    model = models.build_model(arch, n_classes, weights="none").to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), {"optimizer": "rmsprop", "lr": 1e-3, "weight_decay": 0.0})
    loader = torch.utils.data.DataLoader(HamDataset(rows, spec.input_size, spec.mean, spec.std), batch_size=batch,
                                         shuffle=True, num_workers=2, persistent_workers=True)
    for epoch in range(epochs):
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
                loss = loss + 0.4 * F.cross_entropy(out.aux_logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
            t = time.perf_counter()
            compute += t - t_data
    return {"images_per_s": n / (wait + compute), "data_wait_s": wait, "compute_s": compute, "images": n}


def channels_last_speedup(arch: str, batch: int, steps: int = 4) -> float:
    """Training steps per second on one fixed batch with channels_last over without (no data loading): whether
    train.channels_last should be on for CPU training."""
    import torch
    import torch.nn.functional as F

    from dermray import models

    torch.set_num_threads(THREADS)
    size = models.spec(arch).input_size
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 4, (batch,))
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
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results = {}
    for arch, (per_class, epochs, batch) in CASES.items():
        with tempfile.TemporaryDirectory() as t:
            tmp, rows = prepare(pathlib.Path(t), per_class)
            n_classes = len(pd.read_parquet(tmp / "out" / "partition" / "bench" / "training_classes.parquet"))
            d = run_dermray(tmp, arch, epochs, batch)
            b = run_bare(rows[rows.fold != 0], n_classes, arch, epochs, batch)
            results[arch] = {"dermray": d, "bare": b, "ratio": d["images_per_s"] / b["images_per_s"]}
            print(f"{arch}: dermray {d['images_per_s']:.2f} img/s, bare {b['images_per_s']:.2f} img/s", flush=True)
    ray.shutdown()
    for arch, (_, _, batch) in CASES.items():
        results[arch]["channels_last_speedup"] = channels_last_speedup(arch, batch)
    print()
    print(f"{'model':<20} {'path':<8} {'images/s':>9} {'data wait s':>12} {'compute s':>10} {'images':>7}")
    for arch, r in results.items():
        for path in ("dermray", "bare"):
            x = r[path]
            print(f"{arch:<20} {path:<8} {x['images_per_s']:>9.2f} {x['data_wait_s']:>12.2f} {x['compute_s']:>10.2f} "
                  f"{int(x['images']):>7}")
        print(f"{arch:<20} ratio    {r['ratio']:>9.2f}   (channels_last training step speed-up on CPU: "
              f"{r['channels_last_speedup']:.2f}x)")
    print(f"machine: {os.cpu_count()} CPUs, torch threads {THREADS}; last epoch of each run; target ratio >= 0.9")
    print(json.dumps({"ratio": round(min(r["ratio"] for r in results.values()), 3)} | {
        f"{arch}_{k}": round(v, 3) for arch, r in results.items()
        for k, v in (("dermray_images_per_s", r["dermray"]["images_per_s"]),
                     ("bare_images_per_s", r["bare"]["images_per_s"]), ("ratio", r["ratio"]),
                     ("dermray_data_wait_s", r["dermray"]["data_wait_s"]),
                     ("channels_last_speedup", r["channels_last_speedup"]))}))


if __name__ == "__main__":
    main()
