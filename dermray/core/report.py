"""The evaluation report and its figures: ROC curves with the readers (the paper's Figure 3 form), reliability
and confusion plots, report.html (self-contained) and report.md. Rendering only: the numbers come from the
evaluation's tables.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from dermray.core.evaluation_tasks import Task
from dermray.core.formatting import external_rows, fmt
from dermray.core.templating import render


def identical_subsets(metrics: list[dict]) -> dict[str, str]:
    """{subset: "all"} for every subset whose metric rows are the "all" rows over again (the same metrics, values,
    intervals and counts: "biopsy" when every image is biopsy-proven), so that a report shows them once."""
    def key(r):
        return (r["task"], r["metric"])

    def row(r):
        return (r["value"], r["ci_low"], r["ci_high"], r["n"])

    by_subset: dict[str, dict] = {}
    for r in metrics:
        by_subset.setdefault(r["subset"], {})[key(r)] = row(r)
    base = by_subset.get("all", {})
    out = {}
    for subset, rows in by_subset.items():
        tasks = {task for task, _ in rows}
        if subset != "all" and rows and rows == {k: v for k, v in base.items() if k[0] in tasks}:
            out[subset] = "all"
    return out


def render_plots(t, tasks: list[Task]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    same = identical_subsets(t.metrics)
    for task in tasks:
        for subset in ("all", "biopsy"):
            c = t.curves.get((task.name, subset))
            if not c or subset in same:
                continue
            if task.is_binary:
                fig, ax = plt.subplots(figsize=(5, 5))
                ax.plot(c["fpr"], c["tpr"], color="#1f4e9c", lw=2,
                        label=f"CNN (AUC {c['auc']:.3f}, 95% CI {c['ci'][0]:.3f}-{c['ci'][1]:.3f})")
                ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
                for name, sens, spec in c.get("locked", [])[:1]:
                    ax.scatter([1 - spec], [sens], color="black", marker="D", s=45, zorder=5,
                               label=f"CNN at its locked point ({name})")
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
                    for r in cal:  # each bin's count: a point made of 3 images says little
                        ax.annotate(f"n={r['n']}", (r["mean_predicted"], r["observed"]), textcoords="offset points",
                                    xytext=(4, -10), fontsize=7, color="#555")
                    ax.set_xlabel("Mean predicted probability")
                    ax.set_ylabel("Observed frequency")
                    ax.set_title(f"Reliability: {task.name} ({subset})", fontsize=10)
                    out[f"reliability_{task.name}_{subset}.png"] = _png(fig)
            else:
                out[f"confusion_{task.name}_{subset}.png"] = confusion_png(
                    c, f"{task.name} ({subset}), accuracy {c['accuracy']:.3f}")
    return out


def confusion_png(c: dict, title: str) -> bytes:
    """The confusion matrix, row-normalised, each cell with its share and its count (the last column: undecided)."""
    import matplotlib.pyplot as plt

    cm = c["confusion"].astype(float)
    k = cm.shape[0]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * (k + 1), 1.2 + 0.7 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):  # the row's share, and the count under it
        for j in range(k + 1):
            ax.text(j, i, f"{norm[i, j]:.2f}\n{int(cm[i, j]):,}", ha="center", va="center",
                    fontsize=6 if k > 5 else 7, color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(k + 1), c["names"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), c["names"][:k], fontsize=8)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def training_curves(histories: dict) -> dict[str, bytes]:
    """{"training_curves.png": ...}: per fold, the loss on the training data and on the selection split, and the
    selection split's top-1, per epoch (numbered from 1); {} without histories. ``histories``: fold name -> long
    rows (epoch, split, metric, value) as train writes them (metrics.parquet)."""
    if not histories:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, (fold, h) in enumerate(sorted(histories.items())):
        colour = f"C{i % 10}"
        first = int(h["epoch"].min()) if len(h) else 0
        for split, style in (("train", "-"), ("select", "--")):
            for ax, metric in ((loss_ax, "loss"), (top1_ax, "top1")):
                rows = h[(h["split"] == split) & (h["metric"] == metric)].sort_values("epoch")
                if len(rows) and not (ax is top1_ax and split == "train"):
                    ax.plot(rows["epoch"] - first + 1, rows["value"], style, color=colour, marker="o", ms=3,
                            label=f"{fold} ({'training' if split == 'train' else 'selection split'})")
    loss_ax.set_title("Loss per epoch", fontsize=10)
    top1_ax.set_title("Top-1 on the selection split", fontsize=10)
    for ax in (loss_ax, top1_ax):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return {"training_curves.png": _png(fig)}


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _ci(r) -> str:
    return f" [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if r.get("ci_low") is not None else ""


def headline_cards(summary: dict, t, tasks: list[Task]) -> list[dict]:
    """Per task, what a reader needs first: for a binary task the AUC with its CI and the sensitivity and
    specificity at the model's locked operating point (CIs), on the biopsy-proven images when there are any; for
    a multi-class task the accuracy with its CI; with the images and lesions behind each number."""
    by = {(r["task"], r["subset"], r["metric"]): r for r in t.metrics}
    same = identical_subsets(t.metrics)  # a subset that repeats "all" has its figures under "all"
    cards = []
    for task in tasks:
        subset = "biopsy" if (task.name, "biopsy", "n_positive") in by or (task.name, "biopsy", "accuracy") in by \
            else "all"
        figures = same.get(subset, subset)
        card = {"task": task.name, "subset": subset, "binary": task.is_binary}
        if task.is_binary:
            card["auc"] = by.get((task.name, subset, "auc"))
            card["n_groups"] = by.get((task.name, subset, "n_groups"))
            locked = sorted({m.split("@locked:", 1)[1] for (tn, sb, m) in by if tn == task.name and sb == subset
                             and m.startswith("threshold@locked:")},
                            key=lambda n: (not n.startswith("sens"), n != "youden", n))  # the scoring default first
            point = locked[0] if locked else None
            card["point"] = point
            for rate in ("sensitivity", "specificity", "ppv", "npv", "sensitivity_oof", "specificity_oof",
                         "carries_over"):
                card[rate] = by.get((task.name, subset, f"{rate}@locked:{point}")) if point else None
            for metric in READER_METRICS:
                card[metric] = by.get((task.name, subset, metric))
            card["plot"] = f"roc_{task.name}_{figures}.png"
            card["reliability"] = f"reliability_{task.name}_{figures}.png"
        else:
            card["accuracy"] = by.get((task.name, subset, "accuracy"))
            card["balanced_accuracy"] = by.get((task.name, subset, "balanced_accuracy"))
            card["recall"] = [(name, by.get((task.name, subset, f"sensitivity@0.5[{name}]")))
                              for name in task.class_names]
            card["plot"] = f"confusion_{task.name}_{figures}.png"
        cards.append(card)
    return cards


READER_METRICS = ("readers_n", "readers_mean_sensitivity", "readers_mean_specificity", "readers_below_model_curve",
                  "model_sensitivity_at_readers_mean_specificity", "model_specificity_at_readers_mean_sensitivity")


def readers_sentence(card: dict) -> str | None:
    """The paper's question for a binary task, answered in one sentence: the CNN against the dermatologists'
    mean point (their number, mean sensitivity and specificity), its sensitivity at their mean specificity and its
    specificity at their mean sensitivity with intervals, and how many of them lie below its ROC curve."""
    n = card.get("readers_n")
    if not n or not n["value"]:
        return None
    readers = int(n["value"])
    mean_sens, mean_spec = card["readers_mean_sensitivity"], card["readers_mean_specificity"]
    sens, spec = card["model_sensitivity_at_readers_mean_specificity"], card[
        "model_specificity_at_readers_mean_sensitivity"]
    below = card["readers_below_model_curve"]

    def verdict(model: dict | None, reader: float) -> str:
        if not model or model["value"] is None:
            return ""
        if model["ci_low"] is not None and model["ci_low"] > reader:
            return " (higher)"
        if model["ci_high"] is not None and model["ci_high"] < reader:
            return " (lower)"
        return " (no clear difference)"

    parts = [f"Against {readers} dermatologist{'s' if readers != 1 else ''} (mean sensitivity "
             f"{fmt(mean_sens['value'])}, specificity {fmt(mean_spec['value'])}):"]
    if sens and sens["value"] is not None:
        parts.append(f"at their mean specificity the CNN's sensitivity is {fmt(sens['value'])}{_ci(sens)}"
                     f"{verdict(sens, mean_sens['value'])};")
    if spec and spec["value"] is not None:
        parts.append(f"at their mean sensitivity its specificity is {fmt(spec['value'])}{_ci(spec)}"
                     f"{verdict(spec, mean_spec['value'])};")
    if below and below["value"] is not None:
        parts.append(f"{int(below['value'])} of {readers} lie below its ROC curve.")
    return " ".join(parts).rstrip(";") + ("" if parts[-1].endswith(".") else ".")


def set_sentence(summary: dict) -> str:
    n, lesions, biopsy = summary["images"], summary.get("lesions"), summary.get("biopsy_images")
    parts = [f"{n:,} images"]
    if lesions:
        parts.append(f"of {lesions:,} lesions")
    text = " ".join(parts)
    if biopsy is not None:
        text += f", {biopsy:,} of them biopsy-proven (the numbers below are on those when the task has any)"
    models = ", ".join(summary.get("model_ids", [])) or "?"
    return (f"This is the evaluation of model {models} on {text}. Confidence intervals resample lesions, not "
            f"images; sensitivity and specificity are at the model's operating point, locked out of fold before "
            f"it saw these images.")


def render_report(summary: dict, t, plots: dict[str, bytes], tasks: list[Task] | None = None,
                  model_card: str | None = None) -> tuple[str, str]:
    """(report.md, report.html): the answer first - one card per task with its headline numbers and figure - then
    the detailed tables, folded. The pages are templates/report.md.j2 and report.html.j2, given the same values
    (so that they cannot drift); the HTML one escapes every value."""
    cards = [card_values(c, plots) for c in headline_cards(summary, t, tasks or [])]
    # Every row of metrics.parquet, but a subset that repeats "all" (every image biopsy-proven) once.
    same = identical_subsets(t.metrics)
    rows = sorted((r for r in t.metrics if r["subset"] not in same), key=lambda r: (r["task"], r["subset"]))
    on_cards = {image["name"] for c in cards for image in c["images"]}
    lineage = summary.get("lineage", {})
    values = {
        "run_id": summary["run_id"], "set_sentence": set_sentence(summary), "cards": cards,
        "external_head": ["task", "subset", "cohort", "AUC (95% CI), n", "reference", "reference AUC (95% CI), n",
                          "difference (95% CI)"], "external": external_rows(t.metrics),
        "rows": [{"task": r["task"], "subset": r["subset"], "metric": r["metric"], "value": fmt(r["value"]),
                  "has_ci": r["ci_low"] is not None, "ci_low": fmt(r["ci_low"]), "ci_high": fmt(r["ci_high"]),
                  "n": r["n"], "note": r["note"] or ""} for r in rows],
        "shown_once": "; ".join(f"{s} = {a} (the same images): shown once" for s, a in sorted(same.items())),
        "other_images": [image(name, png) for name, png in plots.items() if name not in on_cards],
        "model_card": model_card, "lineage_id": str(lineage.get("id")),
        "predictions": str(lineage.get("inputs", {}).get("predictions", {}).get("content"))[:16],
        "models": ", ".join(summary.get("model_ids", []))}
    return render("report.md.j2", **values), render("report.html.j2", **values)


def image(name: str, png: bytes) -> dict:
    return {"name": name, "png": base64.b64encode(png).decode()}


def card_values(c: dict, plots: dict[str, bytes]) -> dict:
    """A headline card (``headline_cards``) written out: its headline line; for a binary task the locked operating
    point and the readers' sentence, for a multi-class task the recall per class; the images and lesions behind
    it; its figures (the ROC or confusion matrix, then the reliability)."""
    out = {"task": c["task"], "subset": c["subset"], "binary": c["binary"], "readers": None, "op": None,
           "recall": None, "images": [image(name, plots[name]) for name in (c["plot"], c.get("reliability"))
                                      if name in plots]}
    if c["binary"]:
        auc = c["auc"]
        line = f"AUC {fmt(auc['value']) if auc else '—'}{_ci(auc) if auc else ''}"
        if auc and auc["value"] is None and auc.get("note"):  # e.g. not estimable: say why
            line += f" ({auc['note']})"
        sens, spec = c["sensitivity"], c["specificity"]
        op = (f"at the locked point {c['point']}: sensitivity {fmt(sens['value'])}{_ci(sens)}, specificity "
              f"{fmt(spec['value'])}{_ci(spec)}" if sens and spec else "no locked operating point")
        oof_sens, oof_spec, carried = c.get("sensitivity_oof"), c.get("specificity_oof"), c.get("carries_over")
        if sens and spec and oof_sens and oof_spec and oof_sens["value"] is not None:
            op += (f" (out of fold: sensitivity {fmt(oof_sens['value'])}{_ci(oof_sens)}, specificity "
                   f"{fmt(oof_spec['value'])}{_ci(oof_spec)})")
        if carried and carried["value"] == 0:
            op += f". WARNING: this point {carried['note']}"
        n = auc["n"] if auc else 0
        lesions = int(c["n_groups"]["value"]) if c.get("n_groups") and c["n_groups"]["value"] is not None else None
        out |= {"line": line, "op": op, "readers": readers_sentence(c),
                "count": f"{n:,} images" + (f", {lesions:,} lesions" if lesions else "")}
    else:
        acc, balanced = c["accuracy"], c.get("balanced_accuracy")
        # Balanced accuracy first: a model that calls every lesion benign has a high accuracy on a set that is
        # mostly benign, and the per-class recall shows which classes it misses.
        out |= {"line": f"balanced accuracy {fmt(balanced['value']) if balanced else '—'}; accuracy "
                        f"{fmt(acc['value']) if acc else '—'}{_ci(acc) if acc else ''}",
                "recall": ", ".join(f"{name} {fmt(r['value']) if r else '—'}" + (f" (n={r['n']})" if r else "")
                                    for name, r in c.get("recall", [])),
                "count": f"{acc['n'] if acc else 0:,} images"}
    return out
