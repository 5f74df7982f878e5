"""The gallery page: one row per class (the paper's saliency-figure form) and the sanity results."""
from __future__ import annotations

import html

import pandas as pd

from dermray.runtime.config import RunConfig
from dermray.stages.saliency.sanity import SanityResult


def _relative(uri: str, base: str) -> str:
    return uri[len(base):].lstrip("/") if uri.startswith(base) else uri


def gallery_html(cfg: RunConfig, index: pd.DataFrame, checked: SanityResult, tasks, rdir: str) -> str:
    """The paper's saliency-figure form: per task, one row per class (the images whose truth is that class), each
    image with every method's overlay; then the sanity-check table. Links are relative: the page works where the
    folder is (local, or an S3 static site)."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dermray saliency {e(cfg.run_id)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;vertical-align:top}"
             "img{height:150px}.flag{color:#b00;font-weight:bold}table{border-collapse:collapse}"
             "th{background:#eee}</style></head><body>",
             f"<h1>Saliency maps — run {e(cfg.run_id)}</h1>",
             "<p>Each image is shown beside its map (brighter = the pixels whose change moves the target's "
             "log-probability most). Maps explain one model; the sanity checks below say whether a method's maps "
             "depend on what the model learned.</p>"]
    for task in tasks:
        sub = index[index["task"] == task.name]
        if sub.empty:
            continue
        parts.append(f"<h2>{e(task.name)}</h2><table>")
        for cls in task.class_names:
            rows = sub[sub["true_class"] == cls]
            cells = []
            for image_id, g in rows.groupby("image_id", sort=True):
                r0 = g.iloc[0]
                imgs = "".join(f"<div>{e(m)}<br><img src='{e(_relative(u, rdir))}' alt='{e(image_id)} {e(m)}'></div>"
                               for m, u in zip(g["method"], g["png_uri"]))
                cells.append(f"<td><b>{e(image_id)}</b><br>score {r0['score']:.3f} ({e(r0['reason'])}), target "
                             f"{e(str(r0['target']))}{imgs}</td>")
            parts.append(f"<tr><th>{e(cls)}<br>({len(cells)} images)</th>{''.join(cells) or '<td>none</td>'}</tr>")
        parts.append("</table>")
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
