"""The gallery page: one row per class (the paper's saliency-figure form) and the sanity results."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dermray.core.templating import render
from dermray.runtime.config import RunConfig
from dermray.stages.saliency.sanity import SanityResult


def _relative(uri: str, base: str) -> str:
    return uri[len(base):].lstrip("/") if uri.startswith(base) else uri


def colour_scale(cmap: str = "inferno", stops: int = 9) -> str:
    """The overlay's colour scale as a CSS gradient (``attribution.overlay_png``'s colour map)."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.linspace(0, 1, stops))[:, :3]
    return ", ".join("#%02x%02x%02x" % tuple(int(round(c * 255)) for c in rgb) for rgb in colours)


def gallery_html(cfg: RunConfig, index: pd.DataFrame, checked: SanityResult, tasks, rdir: str) -> str:
    """The paper's saliency-figure form: per task, one row per class (the images whose truth is that class), each
    image with every method's overlay, wrapping to the window; blank maps are marked, the colour scale is shown;
    then the sanity-check table. Links are relative: the page works where the folder is (local, or an S3 static
    site). The page is templates/gallery.html.j2, which escapes every value."""
    shown = []
    for task in tasks:
        sub = index[index["task"] == task.name]
        if not sub.empty:
            shown.append({"title": task.name.replace("_", " "), "classes": [
                {"name": cls, "images": images(sub[sub["true_class"] == cls], rdir)} for cls in task.class_names]})
    return render("gallery.html.j2", run_id=cfg.run_id, colour_scale=colour_scale(), tasks=shown,
                  sanity=[[r.method, r.randomised, f"{r.spearman:.3f}", f"{r.ssim:.3f}", r.n_images, r.constant_maps]
                          for r in checked.table.itertuples()],
                  verdict="conclusive" if checked.conclusive else "inconclusive", why=checked.why,
                  flags=list(checked.flags.items()))


def images(rows: pd.DataFrame, rdir: str) -> list[dict]:
    """One class's images, each with its score, why it was chosen, its target and its maps (method, blank or not,
    link relative to the page)."""
    out = []
    for image_id, g in rows.groupby("image_id", sort=True):
        r0 = g.iloc[0]
        blank = g["blank_map"] if "blank_map" in g.columns else [False] * len(g)
        out.append({"id": image_id, "score": f"{r0['score']:.3f}", "reason": r0["reason"], "target": str(r0["target"]),
                    "maps": [{"method": m, "blank": b, "src": _relative(u, rdir)}
                             for m, u, b in zip(g["method"], g["png_uri"], blank)]})
    return out
