"""The gallery page: one row per class (the paper's saliency-figure form) and the sanity results."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd

from dermray.runtime.config import RunConfig
from dermray.stages.saliency.sanity import SanityResult


def _relative(uri: str, base: str) -> str:
    return uri[len(base):].lstrip("/") if uri.startswith(base) else uri


def colour_scale(cmap: str = "inferno", stops: int = 9) -> str:
    """The overlay's colour scale as a CSS gradient (``attribution.overlay_png``'s colour map)."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.linspace(0, 1, stops))[:, :3]
    return ", ".join("#%02x%02x%02x" % tuple(int(round(c * 255)) for c in rgb) for rgb in colours)


STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:100%}td,th{padding:4px 8px;vertical-align:top}"
         ".row{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:1em}.image{border:1px solid #ddd;padding:6px}"
         ".maps{display:flex;flex-wrap:wrap;gap:6px}.maps img{height:150px;max-width:100%}"
         ".blank{color:#b00;font-weight:bold}.flag{color:#b00;font-weight:bold}table{border-collapse:collapse}"
         "th{background:#eee;text-align:left}.scale{display:inline-block;width:240px;height:12px;"
         "vertical-align:middle;border:1px solid #999}")


def gallery_html(cfg: RunConfig, index: pd.DataFrame, checked: SanityResult, tasks, rdir: str) -> str:
    """The paper's saliency-figure form: per task, one row per class (the images whose truth is that class), each
    image with every method's overlay, wrapping to the window; blank maps are marked, the colour scale is shown;
    then the sanity-check table. Links are relative: the page works where the folder is (local, or an S3 static
    site)."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
             f"content='width=device-width'><title>dermray saliency {e(cfg.run_id)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Saliency maps — run {e(cfg.run_id)}</h1>",
             "<p>Each image is shown beside its map. Colour scale: <span class='scale' style='background:"
             f"linear-gradient(to right, {colour_scale()})'></span> from 0 (left) to the map's 99th percentile of "
             "|attribution| (right, and above): the pixels whose change moves the target's log-probability most. "
             "Each map is scaled on its own; a map marked <span class='blank'>blank</span> is constant and shows "
             "nothing. Maps explain one model; the sanity checks below say whether a method's maps depend on what "
             "the model learned.</p>"]
    for task in tasks:
        sub = index[index["task"] == task.name]
        if sub.empty:
            continue
        parts.append(f"<h2>{e(task.name.replace('_', ' '))}</h2>")
        for cls in task.class_names:
            rows = sub[sub["true_class"] == cls]
            cells = []
            for image_id, g in rows.groupby("image_id", sort=True):
                r0 = g.iloc[0]
                blank = g["blank_map"] if "blank_map" in g.columns else [False] * len(g)
                imgs = "".join(
                    f"<div>{e(m)}{' <span class=blank>blank</span>' if b else ''}<br>"
                    f"<img src='{e(_relative(u, rdir))}' alt='{e(image_id)} {e(m)}'></div>"
                    for m, u, b in zip(g["method"], g["png_uri"], blank))
                cells.append(f"<div class='image'><b>{e(image_id)}</b><br>score {r0['score']:.3f} "
                             f"({e(r0['reason'])}), target {e(str(r0['target']))}<div class='maps'>{imgs}</div></div>")
            parts.append(f"<h3>{e(cls)} ({len(cells)} images)</h3><div class='row'>"
                         f"{''.join(cells) or '<p>none</p>'}</div>")
    parts.append("<h2>Sanity checks: model-parameter randomisation (Adebayo et al. 2018)</h2>")
    sanity = checked.table
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
        parts.append(f"<p><b>Verdict: {'conclusive' if checked.conclusive else 'inconclusive'}</b> "
                     f"({e(checked.why)}).</p>")
        for m, why in checked.flags.items():
            parts.append(f"<p class='flag'>{e(m)}: {e(why)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
