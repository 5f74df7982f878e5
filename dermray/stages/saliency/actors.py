"""The Ray Data actor: builds the model and the explainer once, then computes, overlays and writes the maps of
every selected image and method."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dermray.runtime import artifacts
from dermray.stages.saliency.shared import safe_name
from dermray.store import storage


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


@dataclass(frozen=True)
class ExplainJob:
    """What the actors and the sanity task are handed: the model, the target matrix [training classes, targets],
    the methods, their options (smooth_samples, smooth_noise, ig_steps, seed, masks, sanity_levels), the torch
    threads and whether to use the GPU."""
    ens: Any
    matrix: np.ndarray
    methods: list[str]
    options: dict
    threads: int
    use_gpu: bool

    def explainer(self):
        return build_explainer(self.ens, self.matrix, self.threads, self.use_gpu)


class Explainer:
    """Ray Data actor: the model built once; ``__call__`` computes every method's maps for a batch of selected
    images, writes the PNGs and .npy files, and returns their index rows."""

    def __init__(self, job: ExplainJob, out_dir: str):
        self.f, self.layer, self.device = job.explainer()
        self.ens, self.methods, self.sc, self.out_dir = job.ens, job.methods, job.options, out_dir

    def __call__(self, batch: dict) -> dict:
        import torch

        from dermray.runtime.attribution import attribute, flat, inside_fraction, npy_bytes, overlay_png, resize_map

        originals, x = load_images(list(batch["uri"]), self.ens, self.device)
        targets = torch.as_tensor(batch["col"].astype(np.int64), device=self.device)
        out: dict[str, list] = {k: [] for k in ("image_id", "task", "method", "png_uri", "npy_uri", "inside_lesion",
                                                "blank_map")}
        for method in self.methods:
            maps = attribute(self.f, x, targets, method, layer=self.layer, smooth_samples=self.sc["smooth_samples"],
                             smooth_noise=self.sc["smooth_noise"], ig_steps=self.sc["ig_steps"], seed=self.sc["seed"])
            for i, (image_id, task) in enumerate(zip(batch["image_id"], batch["task"])):
                img = originals[i]
                m = resize_map(maps[i], img.shape[0], img.shape[1])
                stem = f"{safe_name(image_id)}__{safe_name(task)}"
                png = storage.join(self.out_dir, method, f"{stem}.png")
                npy = storage.join(self.out_dir, method, f"{stem}.npy")
                storage.write_bytes(png, overlay_png(img, m))
                storage.write_bytes(npy, npy_bytes(m))
                inside = np.nan
                if self.sc["masks"]:
                    inside = inside_fraction(m, _mask(self.sc["masks"], image_id, img.shape[:2]))
                for k, v in (("image_id", image_id), ("task", task), ("method", method), ("png_uri", png),
                             ("npy_uri", npy), ("inside_lesion", inside), ("blank_map", flat(m))):
                    out[k].append(v)
        types = {"inside_lesion": np.float64, "blank_map": bool}
        return {k: np.array(v, dtype=types.get(k, object)) for k, v in out.items()}


def _mask(pattern: str, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The lesion mask of an image (any image whose non-zero pixels are the lesion), at the image's size."""
    from PIL import Image

    from dermray.core.transforms import decode_image

    img = decode_image(storage.read_bytes(pattern.format(image_id=image_id))).convert("L")
    if img.size != (shape[1], shape[0]):
        img = img.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(img) > 127
