"""The benchmarks page's tables (docs/benchmarks.md), generated from benchmarks/results/<name>/results.json: one
table per benchmark with its figures and the machine line (CPU model and flags, cores, versions) it was measured on.

    .venv/bin/python benchmarks/report.py            # rewrite the block between the page's markers
    .venv/bin/python benchmarks/report.py --print    # print the block, leave the page alone
    .venv/bin/python benchmarks/report.py --check    # exit 1 when the page's block is not what the results give

(``make bench-report``.) Results written in smoke mode (``"smoke": true``) are refused: they are not measurements.
To see how smoke results would render: ``report.py --results $TMPDIR/dermray-bench-smoke --allow-smoke --print``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

BENCH = pathlib.Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PAGE = BENCH.parent / "docs" / "benchmarks.md"
START, END = "<!-- bench-report:start -->", "<!-- bench-report:end -->"
LEGACY = {"gpu": ["h100.json"]}  # result files from before results.json


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{fmt(v[0], 3)}, {fmt(v[1], 3)}]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return str(v)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]
    return out


def machine_line(r: dict) -> str:
    m = r.get("machine")
    if not m and r.get("device"):  # a GPU run from before results.json recorded the machine: what it did record
        return (f"Machine: {r['device']}, torch {r.get('torch', '?')} (what the file records); its CPU, cores and "
                "other versions were not recorded, and no GPU has been lent since to run it again.")
    if not m:
        return "Machine: not recorded (measured before results.json recorded it; re-run to record it)."
    parts = [m.get("cpu", "?")]
    if m.get("cpu_flags") is not None:
        parts[0] += f" ({', '.join(m['cpu_flags']) or 'no AVX2'})"
    parts.append(f"{m.get('cores', '?')} cores")
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB")
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']}" + (f" x{m['gpu_count']}" if m.get("gpu_count", 1) > 1 else ""))
    versions = [f"{k[:-len('_version')]} {v}" for k, v in m.items() if k.endswith("_version")
                and k[:-len("_version")] in ("torch", "ray", "pyarrow", "polars", "duckdb")]
    if m.get("torch_threads"):
        versions.append(f"torch threads {m['torch_threads']}")
    when = f"; measured {r['measured_at'][:10]}" if r.get("measured_at") else ""
    took = f", {r['wall_minutes']} min" if r.get("wall_minutes") is not None else ""
    return f"Machine: {'; '.join(parts)}; {', '.join(versions)}{when}{took}."


# ---- one renderer per benchmark -----------------------------------------------------------------------------------
def partition(r: dict) -> list[str]:
    d = r.get("details", {})
    out = []
    if d.get("sizes"):
        rows = []
        for s in d["sizes"].values():
            derm = s["dermray"]["seconds"]
            for kind in ("dermray", *d.get("baselines", []), "ray_data"):
                x = s.get(kind)
                if not x:
                    continue
                note = (f"+ Ray start-up {x['startup_s']:.1f} s apart; pass 1 {x['pass1_s']:.1f} s" if kind == "dermray"
                        else f"counts {x['groupby_s']:.1f} s + duplicates {x['duplicates_s']:.1f} s; pass 1 only"
                        if kind == "ray_data" else "")
                rows.append([f"{s['rows']:,}", kind.replace("_", " "), x["seconds"],
                             "" if kind in ("dermray", "ray_data") else fmt(derm / x["seconds"]),
                             f"{s['rows'] / x['seconds'] / 1000:,.0f}k", f"{x['peak_rss_mb']:,.0f}", note])
        out += table(["rows", "path", "seconds", "dermray / it", "rows/s", "peak RSS MB", ""], rows, "llrrrrl")
    else:
        out += table(["figure", "value"], [[k, fmt(v)] for k, v in scalars(r)], "lr")
    out += ["", f"**ratio {fmt(r.get('ratio'))}** (dermray / {r.get('baseline', 'the baseline')}, the fastest "
                f"single-process baseline, at the largest size; vs pandas {fmt(r.get('ratio_vs_pandas'))}). "
                f"Lineage fingerprinting: {pct(r.get('lineage_overhead'))} of the stage (with vs without the hasher; "
                f"hashing alone spread over the cores: {pct(r.get('lineage_overhead_direct'))}). Driver peak RSS "
                f"{fmt(r.get('driver_peak_rss_mb_1m'))} MB at 1M rows, {fmt(r.get('driver_peak_rss_mb_5m'))} MB at 5M."]
    return out


def evaluate(r: dict) -> list[str]:
    rows = []
    if r.get("n_predictions_small"):
        rows.append([r["n_predictions_small"], r.get("dermray_s_200k"), r.get("sklearn_s_200k"), r.get("speedup_200k"),
                     "every replicate"])
    rows.append([r.get("n_predictions"), r.get("dermray_s"), r.get("sklearn_s_scaled"), r.get("speedup"),
                 "scikit-learn timed on 3 replicates, scaled"])
    return table(["predictions", "dermray s", "scikit-learn s", "speedup", ""], rows, "rrrrl") + [
        "", f"{fmt(r.get('n_bootstrap'))} lesion-resampled replicates; AUC {fmt(r.get('auc'), 4)} "
            f"[{fmt(r.get('ci_low'), 4)}, {fmt(r.get('ci_high'), 4)}]; CI ends agree with scikit-learn's to 3 "
            f"decimals: {fmt(r.get('ci_agree'))}; largest replicate difference {r.get('max_replicate_diff_10m', '-')}."]


def _archs(r: dict, suffix: str) -> list[str]:
    return [k[:-len(suffix)] for k in r if k.endswith(suffix)]


def train_throughput(r: dict) -> list[str]:
    rows = []
    for arch in _archs(r, "_channels_last_speedup"):
        modes = [m for m in ("with_validation", "without_validation") if f"{arch}_ratio_{m}" in r]
        for m in modes or [None]:
            sfx = f"_{m}" if m else ""
            rows.append([arch, m.replace("_", " ") if m else "(not recorded)",
                         r.get(f"{arch}_dermray_images_per_s{sfx}"), r.get(f"{arch}_bare_images_per_s{sfx}"),
                         f"**{fmt(r.get(f'{arch}_ratio{sfx}'))}**"])
    out = table(["model", "validation each epoch", "dermray img/s", "bare PyTorch img/s (DataLoader, 2 workers)",
                 "ratio"], rows, "llrrr")
    uses = r.get("ratio_uses")
    out += ["", f"Headline ratio {fmt(r.get('ratio'))} (the worse model, "
                f"{uses.replace('_', ' ') if uses else 'mode not recorded'}); with validation "
                f"{fmt(r.get('ratio_with_validation'))}, without {fmt(r.get('ratio_without_validation'))}. "
                "channels_last training step speed-up on CPU: "
                + ", ".join(f"{a} {fmt(r[f'{a}_channels_last_speedup'])}x" for a in _archs(r, "_channels_last_speedup"))
                + "."]
    return out


def score_throughput(r: dict) -> list[str]:
    rows = []
    for arch, x in r.items():
        if not isinstance(x, dict) or "dermray_images_per_s" not in x:
            continue
        rows.append([arch, x.get("images"), x.get("dermray_steady_images_per_s", x["dermray_images_per_s"]),
                     x.get("baseline_steady_images_per_s", x["baseline_images_per_s"]), f"**{fmt(x['ratio'])}**",
                     x.get("dermray_end_to_end_images_per_s"), x.get("baseline_end_to_end_images_per_s"),
                     f"**{fmt(x.get('ratio_end_to_end'))}**", x.get("dermray_startup_s"), x.get("naive_images_per_s")])
    return table(["model", "images", "dermray steady img/s", "baseline steady img/s (DataLoader, 2 workers)", "ratio",
                  "dermray end-to-end img/s", "baseline end-to-end img/s", "ratio", "dermray start-up s",
                  "naive Ray Data img/s"], rows, "lrrrrrrrrr") + [
        "", f"Ratios (the worse model): steady {fmt(r.get('ratio'))}, end to end {fmt(r.get('ratio_end_to_end'))}; "
            f"Ray start-up {fmt(r.get('ray_startup_s'))} s apart (a job on a running cluster does not pay it)."]


def score_scale(r: dict) -> list[str]:
    d = r.get("details", {})
    rows = [[f"{p['rows']:,}", f"{p['row_group']:,}", p["seconds"], f"{p['peak_rss_mb']:,.0f}",
             f"{p['already_done']:,}", f"{p['todo']:,}"] for p in d.get("plans", {}).values()]
    return table(["manifest rows", "rows per row group", "planning s", "driver peak RSS MB", "already scored",
                  "left to score"], rows, "rrrrrr") + [
        "", f"Driver peak RSS through planning + resumption: {fmt(r.get('driver_peak_rss_mb_1m'))} MB at 1M rows, "
            f"{fmt(r.get('driver_peak_rss_mb_10m'))} MB at 10M (**{fmt(r.get('rss_ratio_10m_1m'))}x**; target at most "
            f"1.2x and under 1,536 MB). Scored end to end: {fmt(r.get('scored_images'))} images at "
            f"**{fmt(r.get('images_per_s_1m'))} img/s**, driver peak RSS {fmt(r.get('driver_peak_rss_mb_scored_1m'))} "
            f"MB, rows lost **{fmt(r.get('rows_lost'))}**."]


def transfer(r: dict) -> list[str]:
    return table(["model", "AUC (melanoma vs nevus, biopsy-proven)", "95 % CI", "epochs"], [
        ["ImageNet-pretrained, last stages fine-tuned", f"**{fmt(r.get('auc_pretrained'), 3)}**",
         fmt(r.get("auc_pretrained_ci")), r.get("epochs_pretrained")],
        ["from scratch", f"**{fmt(r.get('auc_scratch'), 3)}**", fmt(r.get("auc_scratch_ci")), r.get("epochs_scratch")],
    ], "lrrr") + ["", f"{fmt(r.get('n_test'))} test images; {fmt(r.get('minutes'))} training minutes each; CIs "
                      f"disjoint: {fmt(r.get('ci_disjoint'))}."]


def reliability(r: dict) -> list[str]:
    return table(["figure", "value"], [
        ["faults injected / survived", f"{fmt(r.get('faults_injected'))} / {fmt(r.get('faults_survived'))}"],
        ["bad inputs tried / handled", f"{fmt(r.get('bad_inputs_tried'))} / {fmt(r.get('bad_inputs_handled'))}"],
        ["rows lost", fmt(r.get("rows_lost"))],
        ["load: images scored (32 px)", fmt(r.get("load_images"))],
        ["load: images/s", fmt(r.get("load_images_per_s"))],
        ["load: peak RSS, driver MB", fmt(r.get("peak_rss_driver_mb"))],
        ["load: peak RSS, all Ray processes MB (at a fifth of the load)",
         f"{fmt(r.get('peak_rss_mb'))} ({fmt(r.get('peak_rss_mb_at_fifth_load'))})"],
    ], "lr")


def near_duplicates(r: dict) -> list[str]:
    chosen = (r.get("chosen") or {}).get("similarity")
    rows = [[("**" + fmt(s["similarity"], 3) + "**") if s["similarity"] == chosen else fmt(s["similarity"], 3),
             s["cross_lesion_pairs"], s["cross_lesion_other_diagnosis"], s["same_lesion_pairs"],
             ", ".join(f"{k} {v:.2f}" for k, v in s["recall"].items())] for s in r.get("sweep", [])]
    proj = r.get("projection_5m", {})
    return table(["similarity", "pairs across lesions", "of other diagnosis", "same-lesion pairs",
                  "recall on planted copies"], rows, "rrrrl") + [
        "", f"{fmt(r.get('images'))} images ({fmt(r.get('planted'))} planted copies); describe "
            f"{fmt(r.get('describe_ms_per_image'))} ms/image, {fmt(r.get('candidate_pairs'))} LSH candidate pairs, "
            f"verify {fmt(r.get('verify_ms_per_pair'))} ms/pair; chosen: Hamming "
            f"{fmt((r.get('chosen') or {}).get('hamming'))}, similarity {fmt(chosen, 3)}. At 5M images: describe "
            f"{fmt(proj.get('describe_core_hours'))} core-hours."]


def ham10000(r: dict) -> list[str]:
    arms = [("", "defaults")] + ([("_plain", "plain")] if r.get("auc_melanoma_nevus_plain") is not None else [])
    rows = []
    for suffix, arm in arms:
        for name, key, metric in (("melanoma vs nevus", "auc_melanoma_nevus", "AUC"),
                                  ("carcinoma (bcc + akiec) vs benign keratosis", "auc_carcinoma_bkl", "AUC"),
                                  ("three-class", "accuracy_three_class", "accuracy")):
            n_key = "n_" + key.split("_", 1)[1] + suffix
            rows.append([arm if len(arms) > 1 else "", name, metric, f"**{fmt(r.get(key + suffix), 3)}**",
                         fmt(r.get(f"{key}_ci{suffix}")), r.get(n_key)])
    out = table(["arm", "task (biopsy-proven held-out lesions)", "metric", "value", "95 % CI", "images"], rows,
                "lllrrr")
    epochs = ", ".join(f"{arm} {fmt(r.get('epochs' + suffix))} ({r.get('precision' + suffix, '-')})"
                       for suffix, arm in arms)
    out += ["", f"{fmt(r.get('train_images'))} training images, {fmt(r.get('train_minutes'))} training minutes per "
                f"arm, epochs (precision chosen by train.amp=auto): {epochs}; {r.get('tta', '-')} test-time "
                f"augmentation; {fmt(r.get('minutes'))} minutes in all."]
    if r.get("locked_sensitivity_melanoma") is not None:
        out += ["", f"Melanoma operating point locked out of fold at sensitivity 0.95 (threshold "
                    f"{fmt(r.get('locked_threshold_melanoma'), 4)}): on the test split sensitivity "
                    f"{fmt(r.get('locked_sensitivity_melanoma'), 3)} {fmt(r.get('locked_sensitivity_melanoma_ci'))}, "
                    f"specificity {fmt(r.get('locked_specificity_melanoma'), 3)} "
                    f"{fmt(r.get('locked_specificity_melanoma_ci'))}; ECE {fmt(r.get('ece_before'), 3)} -> "
                    f"{fmt(r.get('ece_after'), 3)} after temperature scaling."]
    if r.get("locked_sensitivity_melanoma_where_fitted") is not None:
        carries = {1.0: "yes", 0.0: "no"}.get(r.get("locked_melanoma_carries_over"), "not judged")
        out += ["", f"Where it was fitted ({r.get('locked_melanoma_chosen_on', '?')}): sensitivity "
                    f"{fmt(r.get('locked_sensitivity_melanoma_where_fitted'), 3)} "
                    f"{fmt(r.get('locked_sensitivity_melanoma_where_fitted_ci'))}, specificity "
                    f"{fmt(r.get('locked_specificity_melanoma_where_fitted'), 3)} "
                    f"{fmt(r.get('locked_specificity_melanoma_where_fitted_ci'))}; carries over to the test split: "
                    f"{carries}."]
    robust = r.get("robustness") or {}
    if robust:
        conditions = list(next(iter(robust.values())).keys())
        conditions = [c for c in conditions if c != "none_bf16"]
        out += [""] + table(["melanoma vs nevus AUC, one view", *conditions],
                            [[arm, *[fmt(a.get(c, {}).get("auc"), 3) for c in conditions]]
                             for arm, a in robust.items()],
                            "l" + "r" * len(conditions))
        out += ["", f"Worst shifted AUC: defaults {fmt(r.get('auc_shifted_min_with_cc'), 3)}, plain "
                    f"{fmt(r.get('auc_shifted_min'), 3)}. Defaults minus plain (dihedral views): "
                    f"{fmt(r.get('auc_change_vs_plain'), 3)} against a CI half-width of "
                    f"{fmt(r.get('auc_ci_half_width'), 3)}."]
    if r.get("bf16_auc_delta") is not None:
        out += ["", f"bf16 scoring against fp32 (defaults model, unshifted, one view): AUC delta "
                    f"{fmt(r.get('bf16_auc_delta'), 4)}, max |dp| {fmt(r.get('bf16_max_abs_dp'), 3)}, top-1 agreement "
                    f"{fmt(r.get('bf16_top1_agreement'), 3)}."]
    if "saliency_sanity_conclusive" in r or "saliency_sanity_spearman_all_randomised" in r:
        out += ["", f"Saliency sanity (Spearman with the original maps, every layer randomised): "
                    f"{fmt(r.get('saliency_sanity_spearman_all_randomised'))}; conclusive: "
                    f"{fmt(r.get('saliency_sanity_conclusive'))}; near-duplicate pairs across lesions in the training "
                    f"manifest: {fmt(r.get('near_duplicate_pairs'))}."]
    return out


def gpu(r: dict) -> list[str]:
    rows = [[k[:-len("_images_per_s")].replace("_", " "), v] for k, v in r.items() if k.endswith("_images_per_s")]
    return table(["path", "images/s"], rows, "lr") + [
        "", f"{r.get('device', '-')}, torch {r.get('torch', '-')}: train ratio dermray / bare "
            f"**{fmt(r.get('train_ratio'))}**, score ratio **{fmt(r.get('score_ratio'))}**; GPU vs CPU probabilities: "
            f"fp32 max |diff| {fmt(r.get('score_gpu_fp32_vs_cpu_max_abs_prob_diff'), 4)}, bf16 "
            f"{fmt(r.get('score_gpu_bf16_vs_cpu_max_abs_prob_diff'), 4)}."]


def scalars(r: dict):
    return [(k, v) for k, v in r.items() if k not in ("machine", "details", "measured_at", "smoke", "wall_minutes")
            and not isinstance(v, dict)]


BENCHMARKS = [  # name, what it measures, renderer, rough time on 2 cores
    ("partition", "the partition stage against single-process polars, DuckDB and pandas doing the same work, and "
                  "pass 1's counts with Ray Data's groupby; generated manifests over the ISIC taxonomy", partition),
    ("score_throughput", "`dermray score` against a torch DataLoader (2 workers) feeding the same model, HAM10000 "
                         "JPEGs, batch 32, fp32", score_throughput),
    ("score_scale", "the scoring driver's memory through planning and resumption (90 % already scored) at 1M and "
                    "10M manifest rows, and 1M images scored end to end at 32 px", score_scale),
    ("train_throughput", "one fold through Ray Train against a bare PyTorch loop (DataLoader, 2 workers), the same "
                         "decode, colour constancy and augmentation, HAM10000 images, the last epoch",
     train_throughput),
    ("evaluate", "the lesion-bootstrap AUC CI against a loop of scikit-learn's roc_auc_score over the same "
                 "resamples", evaluate),
    ("reliability", "faults injected into real processes, a corpus of bad inputs, memory under load", reliability),
    ("near_duplicates", "near-duplicate detection on HAM10000 plus planted copies: the thresholds' false merges "
                        "and recall", near_duplicates),
    ("transfer", "ImageNet-pretrained vs from-scratch efficientnet_lite0 on HAM10000, the same training-time "
                 "budget", transfer),
    ("ham10000", "the whole pipeline on all 10,015 HAM10000 images, a held-out lesion-grouped test split", ham10000),
    ("ham10000_defaults", "the same, its defaults arm alone (DERMRAY_HAM_ARMS=defaults, no robustness re-scoring), "
                          "at a later commit: the locked melanoma point where it was fitted and on the test split",
     ham10000),
    ("gpu", "the GPU path (training step, Predictor, saliency) against bare bf16 loops, on a CUDA machine", gpu),
]
SCRIPTS = {"ham10000_defaults": "ham10000"}  # results folders that one script writes under another name


def load(name: str, results: pathlib.Path = RESULTS) -> tuple[dict | None, str | None]:
    folder = results / name
    for f in ["results.json", *LEGACY.get(name, [])]:
        if (folder / f).exists():
            return json.loads((folder / f).read_text()), f
    return None, None


def block(results: pathlib.Path = RESULTS, allow_smoke: bool = False) -> str:
    lines = [START, "<!-- Generated by benchmarks/report.py from benchmarks/results/*/results.json "
                    "(make bench-report): edit those, not this block. -->", ""]
    for name, what, render in BENCHMARKS:
        r, f = load(name, results)
        script = SCRIPTS.get(name, name)
        where = f" - `benchmarks/results/{name}/`" if name in SCRIPTS else ""
        lines += [f"## `benchmarks/{script}.py`{where}", "", f"{what[:1].upper()}{what[1:]}.", ""]
        if r is None:
            lines += [f"Not measured yet: run `.venv/bin/python benchmarks/{name}.py` (writes "
                      f"`benchmarks/results/{name}/results.json`), then `make bench-report`.", ""]
            continue
        if r.get("smoke") and not allow_smoke:
            raise SystemExit(f"benchmarks/results/{name}/{f} was written in smoke mode: not a measurement")
        try:
            lines += render(r)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # an older results.json: its figures as is
            lines += [f"(older results, shown as recorded: {type(e).__name__} {e})", ""]
            lines += table(["figure", "value"], [[k, fmt(v)] for k, v in scalars(r)], "lr")
        lines += ["", machine_line(r) + ("" if f == "results.json" else f" (from `{f}`)"), ""]
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the block; leave the page alone")
    ap.add_argument("--check", action="store_true", help="exit 1 when the page's block is out of date")
    ap.add_argument("--results", type=pathlib.Path, default=RESULTS, help="the results folder (default: %(default)s)")
    ap.add_argument("--allow-smoke", action="store_true", help="render smoke results too (with --print only)")
    args = ap.parse_args()
    if args.allow_smoke and not args.print:
        ap.error("--allow-smoke goes with --print: smoke results never go in the docs")
    text = block(args.results, args.allow_smoke)
    if args.print:
        print(text)
        return 0
    page = PAGE.read_text()
    if START not in page or END not in page:
        print(f"{PAGE}: no {START} ... {END} markers (put them where the tables go)", file=sys.stderr)
        return 2
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + text + tail
    if args.check:
        if new != page:
            print(f"{PAGE}'s measured-performance block is out of date: run make bench-report", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    print(f"{PAGE}: measured-performance block regenerated from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
