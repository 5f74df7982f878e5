"""The sanity checks (model-parameter randomisation): how similar each method's maps stay as the network is
randomised from the head down, which methods are flagged, and whether the test could conclude."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dermray.stages.saliency.actors import ExplainJob, load_images


def sanity_rows(job: ExplainJob, audit: pd.DataFrame) -> list[dict]:
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

    ens, matrix, methods, sc = job.ens, job.matrix, job.methods, job.options
    f, layer, device = job.explainer()
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


@dataclass(frozen=True)
class SanityResult:
    """The sanity test as the outputs show it: its table (one row per method and level, flagged methods marked),
    the flagged methods with why, and the verdict (``sanity_verdict``)."""
    rows: list[dict]
    table: pd.DataFrame
    flags: dict[str, str]
    conclusive: bool
    why: str


def sanity_result(rows: list[dict], threshold: float) -> SanityResult:
    flags = flag_methods(rows, threshold) if rows else {}
    table = pd.DataFrame(rows, columns=["method", "level", "randomised", "spearman", "ssim", "n_images",
                                        "constant_maps"])
    table["flagged"] = table["method"].map(lambda m: m in flags)
    return SanityResult(rows, table, flags, *sanity_verdict(rows))
