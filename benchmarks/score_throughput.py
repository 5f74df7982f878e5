"""Scoring throughput: `dermray score` (Ray Data decode tasks feeding an actor-pool Predictor, predictions written
as Parquet) vs the best plain PyTorch baseline (a torch DataLoader with 2 decode worker processes feeding the same
model, same torch threads, same channels_last + inference_mode, same images, same batch size), in the same run,
for mobilenet_v3_small at 224 px and inception_v3 at 299 px, on HAM10000 images. Steady state is measured from the
first batch of results to the last; the fixed start-up cost (Ray start, actor and model construction, first batch)
is reported separately. Needs ../shared/data/ham10000. Run with no arguments:

    .venv/bin/python benchmarks/score_throughput.py

Last line JSON: ratio (the worse model's dermray / baseline images per second) and each model's figures.
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
BATCH = 32
CASES = {"mobilenet_v3_small": 2000, "inception_v3": 192}  # model: images scored


def make_fold(tmp: pathlib.Path, arch: str) -> pathlib.Path:
    """A fold directory as `dermray train` writes it; random weights (speed does not depend on them)."""
    import torch

    from dermray import artifacts, models

    s = models.spec(arch)
    classes = [{"class_index": i, "node_id": f"c{i}", "name": f"c{i}", "n_images": 1, "scope": "subtree"}
               for i in range(7)]
    fold = tmp / "train" / arch / "fold=0"
    (fold / "best").mkdir(parents=True)
    torch.save(models.build_model(arch, len(classes), weights="none").state_dict(), fold / "best" / "model.pt")
    artifacts.write_card(artifacts.ModelCard(
        model_id=f"bench/{arch}", architecture=arch, input_size=s.input_size,
        normalisation={"mean": list(s.mean), "std": list(s.std)}, training_classes=classes,
        classes_hash=artifacts.classes_hash(classes),
        weights_sha256=artifacts.weights_sha256(str(fold / "best" / "model.pt"))), str(fold))
    return fold


def run_dermray(tmp: pathlib.Path, fold: pathlib.Path, manifest: pathlib.Path, arch: str) -> dict:
    from dermray import score
    from dermray.config import load_config

    t0 = time.perf_counter()
    s = score.run(load_config(None, [
        f"score.input={manifest}", f"score.checkpoints={fold}", f"output={tmp / 'out'}", f"run_id={manifest.stem}",
        f"score.batch_size={BATCH}", f"score.torch_threads={THREADS}", "score.channels_last=true",
        "ray.num_cpus=2", "score.rows_per_file=100000"]))
    wall = time.perf_counter() - t0
    assert s["scored"] == len(pd.read_parquet(manifest)), s
    return {"images": s["scored"], "images_per_s": s["steady_images_per_s"], "startup_s": s["startup_s"],
            "wall_s": round(wall, 2)}


def run_naive(fold: pathlib.Path, manifest: pathlib.Path, arch: str) -> dict:
    """The naive Ray Data pipeline, for the record: read_parquet -> map_batches(decode) -> map_batches(Predictor,
    ActorPoolStrategy) with default resources. One Parquet file is one block, so one task decodes everything; equal
    CPU requests let Ray fuse decoding into the model actor (decode and inference run one after the other); and the
    actor's torch runs on one thread (Ray starts workers with OMP_NUM_THREADS=1)."""
    import ray
    import ray.data

    from dermray import artifacts, score, storage

    ens = artifacts.load_ensemble([str(fold)])
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = (ray.data.read_parquet(str(manifest), columns=["image_id", "uri"])
              .map_batches(score.decode_rows, batch_size=BATCH, fn_kwargs={"size": ens.size, "max_pixels": 10**8,
                                                                           "retry": storage.DEFAULT_RETRY})
              .map_batches(score.Predictor, batch_size=BATCH, compute=ray.data.ActorPoolStrategy(size=1),
                           fn_constructor_kwargs={"ensemble": ens, "threads": 1, "channels_last": True,
                                                  "tta": "none", "use_gpu": False}))
        t = np.concatenate([b["t_model"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    finally:
        ray.shutdown()
    return {"images": len(t), "images_per_s": round(len(t) / (t[:, 1].max() - t[:, 0].min()), 2),
            "wall_s": round(time.perf_counter() - t0, 2)}


class Images:
    def __init__(self, uris: list[str], size: int, mean, std):
        self.uris, self.size, self.mean, self.std = uris, size, mean, std

    def __len__(self):
        return len(self.uris)

    def __getitem__(self, i):
        import torch

        from dermray.transforms import decode_image, eval_transform, to_array

        with open(self.uris[i], "rb") as f:
            img = eval_transform(decode_image(f.read()), self.size)
        return torch.from_numpy(to_array(img, self.mean, self.std))


def run_baseline(fold: pathlib.Path, uris: list[str], arch: str) -> dict:
    import torch

    from dermray import models

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    s = models.spec(arch)
    model = models.build_model(arch, 7, weights=str(fold / "best" / "model.pt")).eval()
    model = model.to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(Images(uris, s.input_size, s.mean, s.std), batch_size=BATCH,
                                         num_workers=2, persistent_workers=False, prefetch_factor=4)
    n, out, t_first = 0, [], None
    with torch.inference_mode():
        for x in loader:
            t_first = t_first or time.perf_counter()
            out.append(torch.softmax(model(x.contiguous(memory_format=torch.channels_last)), 1).numpy())
            n += len(x)
    t_end = time.perf_counter()
    assert n == len(uris)
    return {"images": n, "images_per_s": round(n / (t_end - t_first), 2), "startup_s": round(t_first - t0, 2),
            "wall_s": round(t_end - t0, 2)}


def main() -> int:
    if not (HAM / "labels.csv").exists():
        print(f"HAM10000 not found at {HAM}", file=sys.stderr)
        return 1
    labels = pd.read_csv(HAM / "labels.csv")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        for arch, n in CASES.items():
            fold = make_fold(tmp, arch)
            rows = labels.head(n)
            uris = [str(HAM / f) for f in rows["file"]]
            manifest = tmp / f"manifest-{arch}.parquet"
            pd.DataFrame({"image_id": rows["image_id"], "uri": uris, "label": rows["dx"]}).to_parquet(manifest)
            base = run_baseline(fold, uris, arch)
            derm = run_dermray(tmp, fold, manifest, arch)
            naive = run_naive(fold, manifest, arch)
            results[arch] = {"dermray": derm, "baseline": base, "naive": naive,
                             "ratio": round(derm["images_per_s"] / base["images_per_s"], 3)}
    print(f"\nScoring throughput, {os.cpu_count()} CPUs, torch threads {THREADS}, batch {BATCH}, channels_last, "
          "HAM10000 JPEGs (200x150) resized to the model size")
    print(f"{'model':<20} {'images':>7} {'dermray img/s':>14} {'baseline img/s':>15} {'ratio':>6} "
          f"{'dermray start-up s':>19} {'baseline start-up s':>20} {'naive Ray Data img/s':>21}")
    for arch, r in results.items():
        print(f"{arch:<20} {r['dermray']['images']:>7} {r['dermray']['images_per_s']:>14.2f} "
              f"{r['baseline']['images_per_s']:>15.2f} {r['ratio']:>6.3f} {r['dermray']['startup_s']:>19.2f} "
              f"{r['baseline']['startup_s']:>20.2f} {r['naive']['images_per_s']:>21.2f}")
    out = {"ratio": min(r["ratio"] for r in results.values())}
    for arch, r in results.items():
        out[arch] = {"ratio": r["ratio"], "dermray_images_per_s": r["dermray"]["images_per_s"],
                     "baseline_images_per_s": r["baseline"]["images_per_s"],
                     "dermray_startup_s": r["dermray"]["startup_s"], "baseline_startup_s": r["baseline"]["startup_s"],
                     "naive_images_per_s": r["naive"]["images_per_s"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
