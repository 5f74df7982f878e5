"""Saliency maps and their sanity checks. Pure: torch, Captum, numpy, PIL; no Ray, no I/O.

Every method explains the log-probability of a target through the paper's inference algorithm: the network's
softmax over training classes times a membership matrix [n_classes, K] gives K target probabilities (task classes,
or training classes with the identity matrix); the target's score is the log of its summed probability, i.e. minus
the cross-entropy loss of that target. Maps are [H, W], non-negative, one value per pixel:

- ``gradient`` (Esteva et al.: the gradient of the loss with respect to each input pixel, L1 over the colour
  channels), ``smoothgrad`` (the same averaged over noisy copies of the input), ``integrated_gradients`` (from a
  black image, i.e. the normalised zero, in ``ig_steps`` steps; L1 over channels), ``gradcam`` (on the network's
  last convolutional block, ReLU, upsampled to the input).

Sanity checks (Adebayo et al., NeurIPS 2018): cascading model-parameter randomisation from the top (the head, then
ever more of the last stages), comparing each randomised map with the original by Spearman rank correlation and
SSIM; a method whose maps barely change does not explain what the model learned.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

METHODS = ("gradient", "smoothgrad", "integrated_gradients", "gradcam")


class TargetLogProb(nn.Module):
    """x [B, 3, S, S] -> log of summed target probabilities [B, K] (``matrix`` [n_classes, K] of 0/1)."""

    matrix: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, model: nn.Module, matrix: np.ndarray):
        super().__init__()
        self.model = model
        # A copy: arrays from Ray are read-only.
        self.register_buffer("matrix", torch.from_numpy(np.array(matrix, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dermray.store.models import logits_of

        logits = logits_of(self.model(x))
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        # log(sum of the target's softmax probabilities) = logsumexp(target logits) - logsumexp(all logits): exact
        # where the probabilities underflow (a clamped log had a zero gradient there, so a confidently rejected
        # target - a bottom-K image, a randomised network - got a blank map).
        member_log = torch.log(self.matrix.to(logits.dtype))  # 0 for a member class, -inf otherwise
        return (torch.logsumexp(logits.unsqueeze(2) + member_log.unsqueeze(0), dim=1)
                - torch.logsumexp(logits, dim=1, keepdim=True))


def attribute(f: TargetLogProb, x: torch.Tensor, targets: torch.Tensor, method: str, *, layer: nn.Module | None = None,
              smooth_samples: int = 16, smooth_noise: float = 0.15, ig_steps: int = 32, seed: int = 0) -> np.ndarray:
    """Maps [B, S, S] (float32, >= 0) of ``targets`` [B] (column indices of ``f.matrix``) for inputs ``x``."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Saliency

    x = x.detach().clone().requires_grad_(True)
    targets = targets.long()
    if method == "gradient":
        a = Saliency(f).attribute(x, target=targets, abs=True).sum(1)
    elif method == "smoothgrad":
        torch.manual_seed(seed)
        stdev = float(smooth_noise * (x.max() - x.min()).detach())
        a = NoiseTunnel(Saliency(f)).attribute(x, nt_type="smoothgrad", nt_samples=smooth_samples, stdevs=stdev,
                                               target=targets, abs=True).sum(1)
    elif method == "integrated_gradients":
        a = IntegratedGradients(f).attribute(x, baselines=torch.zeros_like(x), target=targets, n_steps=ig_steps,
                                             internal_batch_size=max(1, len(x)) * 8).abs().sum(1)
    elif method == "gradcam":
        if layer is None:
            raise ValueError("gradcam needs the last convolutional layer")
        cam = LayerGradCam(f, layer).attribute(x, target=targets, relu_attributions=True)
        a = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear").squeeze(1).clamp_min(0)
    else:
        raise ValueError(f"unknown saliency method {method!r} (choose from {', '.join(METHODS)})")
    return a.detach().float().cpu().numpy()


def resize_map(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map [S, S] resized to the original image's [height, width] (the evaluation transform is a plain resize)."""
    from PIL import Image

    if m.shape == (height, width):
        return m.astype(np.float32)
    resized = Image.fromarray(m.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def inside_fraction(m: np.ndarray, mask: np.ndarray) -> float:
    """Share of the attribution mass inside the lesion: sum(|m| * mask) / sum(|m|); NaN for an all-zero map."""
    if m.shape != mask.shape:
        raise ValueError(f"map {m.shape} and mask {mask.shape} differ in shape")
    a = np.abs(m.astype(np.float64))
    total = a.sum()
    return float((a * (mask > 0)).sum() / total) if total > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two |maps|. A constant map shares no ranking with a varying one (0); two constant maps
    are the same (1)."""
    from scipy.stats import spearmanr

    a, b = np.abs(a).ravel(), np.abs(b).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.ptp(a) == np.ptp(b) == 0 else 0.0
    return float(spearmanr(a, b).statistic)


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Structural similarity of two maps, each scaled to [0, 1] (Gaussian window, Wang et al. 2004 constants)."""
    from scipy.ndimage import gaussian_filter

    def unit(m):
        m = np.abs(m.astype(np.float64))
        r = np.ptp(m)
        return (m - m.min()) / r if r > 0 else np.zeros_like(m)

    x, y = unit(a), unit(b)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = gaussian_filter(x, sigma), gaussian_filter(y, sigma)
    vx = gaussian_filter(x * x, sigma) - mx * mx
    vy = gaussian_filter(y * y, sigma) - my * my
    cxy = gaussian_filter(x * y, sigma) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def randomise(modules: list[nn.Module], seed: int) -> None:
    """Re-draw the weights of every convolution and linear layer in ``modules`` (their default initialisation);
    batch-norm statistics stay, so activations keep their scale."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in modules:
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.reset_parameters()
    finally:
        torch.random.set_rng_state(gen_state)


def recalibrate_batchnorm(model: nn.Module, modules: list[nn.Module], x: torch.Tensor) -> None:
    """After ``randomise``: the batch-norm layers among ``modules`` get their default affine parameters back and
    their running statistics re-estimated on ``x`` (one forward pass, cumulative average). Without this the trained
    statistics normalise the re-drawn convolutions' outputs by the wrong scale: measured on the ImageNet
    EfficientNet-Lite0 with every layer re-drawn, the network gave every image the same log-probability (-1.45)
    and gradient maps of at most 5e-7 - blank maps that score Spearman 0 and pass the sanity test for the wrong
    reason. Re-estimated, the randomised network responds to its input (maps of ~1 at the same level)."""
    norms = [b for module in modules for b in module.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    for b in norms:
        b.reset_parameters()  # running stats to 0 / 1 and the affine parameters to 1 / 0
        b.momentum = None  # cumulative: the statistics of exactly this batch
        b.train()
    with torch.no_grad():
        model(x)
    for b in norms:
        b.eval()
    model.train(was_training)


def blank(m: np.ndarray, reference: np.ndarray) -> bool:
    """Whether a map is blank: constant, or vanishing next to the trained model's map of the same image (its
    largest value under 1e-4 of the reference's). A similarity computed on blank maps says nothing."""
    top = float(np.abs(m).max()) if m.size else 0.0
    return bool(np.ptp(m) == 0 or top <= 1e-4 * float(np.abs(reference).max()))


def flat(m: np.ndarray) -> bool:
    """Whether one map shows nothing: constant, or its spread under 1e-6 of its largest magnitude (Grad-CAM's final
    ReLU blanks a map whose weighted activations are all negative)."""
    top = float(np.abs(m).max()) if m.size else 0.0
    return bool(m.size == 0 or float(np.ptp(m)) <= 1e-6 * max(top, 1e-30))


def cascade(stages: list[list[nn.Module]], heads: list[nn.Module], levels: int) -> list[tuple[str, list[nn.Module]]]:
    """Cumulative top-down randomisation levels: the head, then the head and ever more of the last stages, ending
    with the whole network; ``levels`` of them, evenly spaced over the stages."""
    n = len(stages)
    cut = sorted({round(i * n / max(levels - 1, 1)) for i in range(levels)})
    out = []
    for k in cut:
        mods = heads + [m for stage in stages[n - k:] for m in stage]
        name = "head" if k == 0 else ("all" if k == n else f"head+last {k} of {n} stages")
        out.append((name, mods))
    return out


def overlay_png(image: np.ndarray, m: np.ndarray, cmap: str = "inferno", min_height: int = 256) -> bytes:
    """PNG of the image beside the image overlaid with the map (scaled to its 99th percentile), legible colours;
    small images are enlarged to ``min_height`` pixels so that the map can be read."""
    import matplotlib
    from PIL import Image

    if image.shape[0] < min_height:
        factor = int(np.ceil(min_height / image.shape[0]))
        size = (image.shape[1] * factor, image.shape[0] * factor)
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        m = resize_map(m.astype(np.float32), size[1], size[0])
    a = np.abs(m.astype(np.float32))
    hi = float(np.percentile(a, 99)) or float(a.max()) or 1.0
    a = np.clip(a / hi, 0.0, 1.0)
    colour = matplotlib.colormaps[cmap](a)[..., :3] * 255.0
    alpha = (0.25 + 0.6 * a)[..., None]
    blended = (image.astype(np.float32) * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)
    side = np.concatenate([image.astype(np.uint8), np.full((image.shape[0], 4, 3), 255, np.uint8), blended], axis=1)
    buf = io.BytesIO()
    Image.fromarray(side).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def npy_bytes(m: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, m.astype(np.float16), allow_pickle=False)
    return buf.getvalue()
