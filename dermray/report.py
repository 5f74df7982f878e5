"""The evaluation report and its figures: ROC curves with the readers (the paper's Figure 3 form), reliability
and confusion plots, report.html (self-contained) and report.md. Rendering only: the numbers come from the
evaluation's tables.
"""
from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

from dermray.tasks import Task


def render_plots(t, tasks: list[Task]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for task in tasks:
        for subset in ("all", "biopsy"):
            c = t.curves.get((task.name, subset))
            if not c:
                continue
            if task.is_binary:
                fig, ax = plt.subplots(figsize=(5, 5))
                ax.plot(c["fpr"], c["tpr"], color="#1f4e9c", lw=2,
                        label=f"CNN (AUC {c['auc']:.3f}, 95% CI {c['ci'][0]:.3f}-{c['ci'][1]:.3f})")
                ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
                if c["readers"]:
                    rs = np.array([[p[1], p[2]] for p in c["readers"]], dtype=float)
                    ax.scatter(1 - rs[:, 1], rs[:, 0], color="#d62728", s=25, label="Dermatologists", zorder=3)
                    ax.scatter([1 - np.nanmean(rs[:, 1])], [np.nanmean(rs[:, 0])], color="#2ca02c", s=80,
                               marker="P", label="Average dermatologist", zorder=4)
                ax.set_xlabel("1 - specificity (false positive rate)")
                ax.set_ylabel("Sensitivity (true positive rate)")
                ax.set_title(f"{task.name} ({subset}: {c['n_pos']} pos, {c['n_neg']} neg)", fontsize=10)
                ax.set_xlim(-0.01, 1.01)
                ax.set_ylim(-0.01, 1.01)
                ax.legend(loc="lower right", fontsize=8)
                out[f"roc_{task.name}_{subset}.png"] = _png(fig)
                cal = [r for r in c["calibration"] if r["n"]]
                if cal:
                    fig, ax = plt.subplots(figsize=(4.5, 4.5))
                    ax.plot([0, 1], [0, 1], color="#bbbbbb", ls="--", lw=1)
                    ax.plot([r["mean_predicted"] for r in cal], [r["observed"] for r in cal], "o-", color="#1f4e9c")
                    ax.set_xlabel("Mean predicted probability")
                    ax.set_ylabel("Observed frequency")
                    ax.set_title(f"Reliability: {task.name} ({subset})", fontsize=10)
                    out[f"reliability_{task.name}_{subset}.png"] = _png(fig)
            else:
                cm = c["confusion"].astype(float)
                k = cm.shape[0]
                norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
                fig, ax = plt.subplots(figsize=(1.0 + 0.7 * (k + 1), 1.0 + 0.6 * k))
                ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
                for i in range(k):
                    for j in range(k + 1):
                        ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.6 else "black")
                ax.set_xticks(range(k + 1), c["names"], rotation=45, ha="right", fontsize=8)
                ax.set_yticks(range(k), c["names"][:k], fontsize=8)
                ax.set_xlabel("Predicted")
                ax.set_ylabel("True")
                ax.set_title(f"{task.name} ({subset}), accuracy {c['accuracy']:.3f}", fontsize=10)
                out[f"confusion_{task.name}_{subset}.png"] = _png(fig)
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def fmt(v) -> str:
    """A metric for people: 3 decimals, an em dash when undefined."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def render_report(summary: dict, t, plots: dict[str, bytes]) -> tuple[str, str]:
    rows = [r for r in t.metrics if r["metric"] in ("auc", "accuracy", "balanced_accuracy", "sensitivity@0.5",
                                                    "specificity@0.5", "ece", "readers_below_model_curve",
                                                    "model_sensitivity_at_readers_mean_specificity")]
    md = [f"# dermray evaluation — run `{summary['run_id']}`", "",
          f"Predictions: `{summary['predictions']}` ({summary['images']} images). Subsets: "
          + ", ".join(summary["subsets"]) + ".", "",
          "| task | subset | metric | value | 95% CI | n | note |", "|---|---|---|---:|---|---:|---|"]
    for r in rows:
        ci = f"{fmt(r['ci_low'])}–{fmt(r['ci_high'])}" if r["ci_low"] is not None else ""
        md.append(f"| {r['task']} | {r['subset']} | {r['metric']} | {fmt(r['value'])} | {ci} | {r['n']} | "
                  f"{r['note'] or ''} |")
    md += ["", "Full tables: metrics.parquet, roc.parquet, confusion.parquet, readers.parquet, calibration.parquet.",
           ""]
    md += [f"![{name}](plots/{name})" for name in plots]
    table_html = "".join(
        f"<tr><td>{html.escape(r['task'])}</td><td>{html.escape(r['subset'])}</td><td>{html.escape(r['metric'])}</td>"
        f"<td>{fmt(r['value'])}</td><td>{fmt(r['ci_low'])}–{fmt(r['ci_high'])}</td><td>{r['n']}</td>"
        f"<td>{html.escape(r['note'] or '')}</td></tr>" for r in rows)
    images = "".join(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'/><figcaption>{html.escape(name)}</figcaption></figure>"
                     for name, png in plots.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dermray evaluation {html.escape(summary['run_id'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}figure{{display:inline-block;margin:8px}}
img{{max-width:480px}}</style></head><body>
<h1>dermray evaluation — run {html.escape(summary['run_id'])}</h1>
<p>Predictions: {html.escape(summary['predictions'])} ({summary['images']} images). Subsets: {html.escape(', '.join(summary['subsets']))}.</p>
<table><tr><th>task</th><th>subset</th><th>metric</th><th>value</th><th>95% CI</th><th>n</th><th>note</th></tr>{table_html}</table>
<h2>Figures</h2>{images}</body></html>"""
    return "\n".join(md) + "\n", page
