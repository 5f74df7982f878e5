"""The whole pipeline on real images: all 10,015 HAM10000 images through `dermray import ham10000`, a held-out
lesion-grouped test split (20 % of lesions; its biopsy-proven images are scored), `dermray pipeline` (partition
with 9 lesion-grouped folds as in the paper, ImageNet-pretrained EfficientNet-Lite0 at 160 px fine-tuned on its
last stages for a fixed training budget (fold 0's model only: 2 CPUs train one model in the time), the learning
rate divided by 16 after 7 epochs, the test split scored with the cross-validation model and its 8 dihedral views
averaged (the training augmentation rotates and flips), evaluation, saliency with the randomisation sanity test).
Reports biopsy-proven melanoma vs nevus and carcinoma (bcc + akiec) vs benign keratosis (bkl) AUC with
lesion-bootstrap 95 % CIs, the 3-class accuracy, and the saliency sanity results. Needs ../shared/data/ham10000;
then the same recipe again without colour constancy and photometric augmentation ("plain"), and both models
re-scored on the test split under four fixed photometric shifts (a warm colour cast, 40 % darker, Gaussian blur,
JPEG quality 40): the robustness the new defaults buy. About 2 hours on 2 cores (DERMRAY_HAM_TRAIN_MINUTES sets
each arm's training budget, default 45; DERMRAY_HAM_ARMS=defaults runs the first arm only). Run with no arguments:

    .venv/bin/python benchmarks/ham10000.py

Results (JSON with the machine, and the evaluation report in Markdown) go to benchmarks/results/ham10000/.
DERMRAY_BENCH_SMOKE=1: 600 images (biopsy-proven first), 64 px, seconds of training, results to a temporary folder.
Last line JSON: auc_melanoma_nevus, auc_melanoma_nevus_ci, auc_carcinoma_bkl, auc_carcinoma_bkl_ci, the locked
melanoma operating point on the test split, ECE before and after calibration, near_duplicate_pairs,
saliency_sanity_conclusive, auc_shifted_min (plain) and auc_shifted_min_with_cc (defaults), bf16_auc_delta (the
defaults model scoring the test split in bf16 against fp32, one view), and the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import pandas as pd

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import SMOKE, last_line, results_dir, size, write_results  # noqa: E402

HAM = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA", REPO.parent / "shared" / "data")) / "ham10000"
TRAIN_MINUTES = float(os.environ.get("DERMRAY_HAM_TRAIN_MINUTES", size("45", "0.1")))
SMOKE_PER_DX = 120  # images per diagnosis in smoke mode (biopsy-proven first)
TEST_SHARE = 0.2
ARMS = [a.strip() for a in os.environ.get("DERMRAY_HAM_ARMS", "defaults,plain").split(",") if a.strip()]
# DERMRAY_HAM_ROBUSTNESS=0: no re-scoring under the photometric shifts (a shorter run; its keys are then absent).
ROBUSTNESS = os.environ.get("DERMRAY_HAM_ROBUSTNESS", "1") != "0"
# One arm alone writes its own results folder (ham10000_defaults, ...): the two-arm file keeps both arms' figures.
RESULTS_NAME = "ham10000" if set(ARMS) == {"defaults", "plain"} else "ham10000_" + "_".join(ARMS)
# The second arm: the recipe before issue 21 (no colour constancy, geometric augmentation only).
PLAIN = ["transforms.color_constancy=none", "transforms.photometric=false"]
TARGET = "sens0.95"  # the operating point locked at sensitivity 0.95 (evaluate.target_sensitivity)


def split(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Lesion-grouped: a lesion is in the test split when the hash of its id falls in the first 20 %."""
    h = manifest["group_id"].map(lambda g: int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) / 16 ** 8)
    test = h < TEST_SHARE
    return manifest[~test], manifest[test]


def shifted(image, shift: str):
    """``image`` (PIL, RGB) under one fixed photometric shift, and the format to store it in (PNG: lossless, so
    that only the shift changes the pixels; JPEG for the JPEG shift itself)."""
    from PIL import Image, ImageEnhance, ImageFilter

    if shift == "colour_cast":  # warm cast: red up 15 %, blue down 15 % (a tungsten-lit clinic photograph)
        a = np.asarray(image, np.float32) * np.array([1.15, 1.0, 0.85], np.float32)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), ("PNG", {})
    if shift == "darker":
        return ImageEnhance.Brightness(image).enhance(0.6), ("PNG", {})
    if shift == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=2)), ("PNG", {})
    if shift == "jpeg40":
        return image, ("JPEG", {"quality": 40})
    raise ValueError(shift)


SHIFTS = ("colour_cast", "darker", "blur", "jpeg40")


def write_shifted(test: pd.DataFrame, shift: str, folder: pathlib.Path) -> pathlib.Path:
    """The test manifest with every image replaced by its shifted copy under ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for image_id, uri in zip(test["image_id"], test["uri"]):
        with Image.open(uri) as im:
            out, (fmt, opts) = shifted(im.convert("RGB"), shift)
        path = folder / f"{image_id}.{'jpg' if fmt == 'JPEG' else 'png'}"
        out.save(path, fmt, **opts)
        uris.append(str(path))
    manifest = folder / "manifest.parquet"
    test.assign(uri=uris).to_parquet(manifest, index=False)
    return manifest


def metric(m: pd.DataFrame, task: str, name: str, subset: str = "all") -> tuple:
    """(value, [ci_low, ci_high], n) of one metrics row."""
    r = m[(m.task == task) & (m.subset == subset) & (m.metric == name)]
    if r.empty:
        return None, None, 0
    r = r.iloc[0]
    ci = None if pd.isna(r.ci_low) else [round(float(r.ci_low), 4), round(float(r.ci_high), 4)]
    return (None if pd.isna(r.value) else round(float(r.value), 4)), ci, int(r.n)


def run_arm(base: list[str], out: pathlib.Path, run_id: str, extra: list[str]) -> dict:
    """One arm of the pipeline: its summary, metrics, the first fold's card and training history."""
    from dermray.apps import pipeline
    from dermray.runtime import artifacts
    from dermray.runtime.config import load_config

    cfg = load_config(str(REPO / "configs" / "ham10000.yaml"), [*base, f"run_id={run_id}", *extra])
    s = pipeline.run(cfg)
    print(pipeline.format_summary(s))
    fold = out / "train" / run_id / "fold=0"
    return {"summary": s, "metrics": pd.read_parquet(out / "metrics" / run_id / "metrics.parquet"),
            "card": artifacts.read_card(str(fold / "model_card.json")),
            "history": pd.read_parquet(fold / "metrics.parquet")}


def robustness(base: list[str], out: pathlib.Path, run_id: str, manifests: dict, bf16: bool = False) -> dict:
    """Melanoma-vs-nevus AUC of arm ``run_id``'s model on the unshifted and each shifted test split (one view:
    test-time augmentation off, so that only the shift differs between conditions); with ``bf16`` also the
    unshifted split scored under bf16 autocast ("none_bf16": its AUC against fp32's is bf16_auc_delta)."""
    from dermray.apps import pipeline
    from dermray.runtime.config import load_config

    aucs = {}
    conditions = [(c, m, "off") for c, m in manifests.items()] + ([("none_bf16", manifests["none"], "bf16")]
                                                                  if bf16 else [])
    for condition, manifest, amp in conditions:
        rid = f"{run_id}-{condition}"
        cfg = load_config(str(REPO / "configs" / "ham10000.yaml"), [
            *base, f"run_id={rid}", "pipeline.stages=[score,evaluate]", f"pipeline.test_manifest={manifest}",
            f"score.checkpoints=[{out / 'train' / run_id}]", f"train.partition={out / 'partition' / run_id}",
            "score.tta=none", f"score.amp={amp}", f"evaluate.n_bootstrap={size(200, 20)}"])
        pipeline.run(cfg)
        value, ci, n = metric(pd.read_parquet(out / "metrics" / rid / "metrics.parquet"), "melanoma_vs_nevus", "auc")
        aucs[condition] = {"auc": value, "ci": ci, "n": n}
        print(f"robustness {run_id} {condition}: melanoma vs nevus AUC {value} {ci} (n={n})")
    return aucs


def main() -> int:
    from dermray.cli import main as cli
    from dermray.runtime import layout

    if not (HAM / "labels.csv").exists():
        print(f"HAM10000 not found at {HAM}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    results = results_dir(RESULTS_NAME)
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        metadata = HAM / "labels.csv"
        if SMOKE:
            labels = pd.read_csv(metadata).sort_values("dx_type", key=lambda c: c != "histo", kind="stable")
            pd.concat([labels[labels.dx == dx].head(SMOKE_PER_DX) for dx in ("nv", "mel", "bkl", "bcc", "akiec")]
                      ).to_csv(tmp / "labels.csv", index=False)
            metadata = tmp / "labels.csv"
        assert cli(["import", "ham10000", "--metadata", str(metadata), "--images", str(HAM / "images"),
                    "--output", str(tmp / "in")]) == 0
        manifest = pd.read_parquet(tmp / "in" / "manifest.parquet")
        train, test = split(manifest)
        assert not set(train.group_id) & set(test.group_id)
        train.to_parquet(tmp / "in" / "train.parquet", index=False)
        test.to_parquet(tmp / "in" / "test.parquet", index=False)
        out = tmp / "out"
        base = [f"output={out}", f"data.manifest={tmp / 'in' / 'train.parquet'}",
                f"data.taxonomy={tmp / 'in' / 'taxonomy.parquet'}", f"data.tasks={tmp / 'in' / 'tasks.yaml'}",
                f"pipeline.test_manifest={tmp / 'in' / 'test.parquet'}", f"partition.folds={size(9, 3)}",
                f"partition.max_class_size={size(1000, 100)}", "train.folds=[0]",
                f"train.image_size={size(160, 64)}", f"train.epochs={size(100, 1)}", "train.lr_decay_epochs=7",
                f"train.max_minutes={TRAIN_MINUTES}", "train.amp=auto",
                "train.cpus_per_worker=1", "train.torch_threads=2", "train.data_cpus=0.5", "score.batch_size=64",
                "score.tta=dihedral", "evaluate.subgroups=[]", "ray.num_cpus=2"]
        arms = {}
        if "defaults" in ARMS:
            arms["defaults"] = run_arm(base, out, "ham", [
                "saliency.methods=[gradient,gradcam]", "saliency.k=4", "saliency.audit_size=6",
                f"saliency.masks={HAM}/masks/{{image_id}}_segmentation.png"])
            shutil.copy(out / "metrics" / "ham" / "report.md", results / "report.md")
            sanity = pd.read_parquet(out / "saliency" / "ham" / "sanity.parquet")
            index = pd.read_parquet(out / "saliency" / "ham" / "saliency_index.parquet")
            saliency_summary = json.loads(pathlib.Path(layout.summary_uri(str(out), "saliency", "ham")).read_text())
            partition_summary = json.loads(pathlib.Path(layout.summary_uri(str(out), "partition", "ham")).read_text())
        if "plain" in ARMS:
            arms["plain"] = run_arm(base, out, "ham-plain",
                                    [*PLAIN, "pipeline.stages=[partition,train,score,evaluate]"])
        # Robustness: the biopsy-proven test images, shifted once, scored by each arm's model.
        biopsy = test[test.label_source == "biopsy"]
        manifests = {"none": tmp / "in" / "test.parquet"}
        for shift in SHIFTS if ROBUSTNESS else ():
            manifests[shift] = write_shifted(biopsy, shift, tmp / "shifted" / shift)
        robust = {arm: robustness(base, out, "ham" if arm == "defaults" else "ham-plain", manifests,
                                  bf16=arm == "defaults") for arm in arms} if ROBUSTNESS else {}
        if "defaults" in arms and ROBUSTNESS:
            bf16_probs, fp32_probs = (np.stack(pd.read_parquet(out / "predictions" / f"ham-{c}" / "predictions")
                                               .sort_values("image_id")["probs"].to_numpy())
                                      for c in ("none_bf16", "none"))

    result: dict = {"arms": ARMS, "test_images": int(len(test)), "test_biopsy_images": int(len(biopsy)),
                    "train_images": int(len(train)), "train_minutes": TRAIN_MINUTES, "partition_folds": size(9, 3),
                    "tta": "dihedral"}
    for arm, a in arms.items():
        suffix = "" if arm == "defaults" else "_plain"
        m, card = a["metrics"], a["card"]
        for key, task, name in (("auc_melanoma_nevus", "melanoma_vs_nevus", "auc"),
                                ("auc_carcinoma_bkl", "carcinoma_vs_benign_keratosis", "auc"),
                                ("accuracy_three_class", "three_class", "accuracy")):
            value, ci, n = metric(m, task, name)
            result[key + suffix], result[f"{key}_ci{suffix}"] = value, ci
            result[f"n_{key.split('_', 1)[1]}{suffix}"] = n
        result["epochs" + suffix] = int(a["history"]["epoch"].max()) + 1
        result["precision" + suffix] = card.precision or "fp32"
        result["preprocess" + suffix] = card.preprocess or {"color_constancy": "none"}
        point = [p for p in card.operating_points if p.task == "melanoma_vs_nevus" and p.name == TARGET]
        result["locked_threshold_melanoma" + suffix] = round(point[0].threshold, 4) if point else None
        for rate in ("sensitivity", "specificity"):
            value, ci, _ = metric(m, "melanoma_vs_nevus", f"{rate}@locked:{TARGET}")
            result[f"locked_{rate}_melanoma{suffix}"], result[f"locked_{rate}_melanoma_ci{suffix}"] = value, ci
            # Issue 28: the same point's rates where it was fitted (its chosen_on), beside the test's.
            value, ci, _ = metric(m, "melanoma_vs_nevus", f"{rate}_oof@locked:{TARGET}")
            result[f"locked_{rate}_melanoma_where_fitted{suffix}"] = value
            result[f"locked_{rate}_melanoma_where_fitted_ci{suffix}"] = ci
        result["locked_melanoma_carries_over" + suffix] = metric(m, "melanoma_vs_nevus",
                                                                 f"carries_over@locked:{TARGET}")[0]
        result["locked_melanoma_chosen_on" + suffix] = point[0].chosen_on if point else None
        result["ece_before" + suffix] = metric(m, "melanoma_vs_nevus", "ece_uncalibrated")[0]
        result["ece_after" + suffix] = metric(m, "melanoma_vs_nevus", "ece")[0]
        result["stages" + suffix] = a["summary"]["stages"]
    for arm, aucs in robust.items():
        suffix = "_with_cc" if arm == "defaults" else ""
        shifted_aucs = [aucs[s]["auc"] for s in SHIFTS if aucs[s]["auc"] is not None]
        result["auc_shifted_min" + suffix] = min(shifted_aucs) if shifted_aucs else None
        result["auc_unshifted_one_view" + suffix] = aucs["none"]["auc"]
    result["robustness"] = robust
    if "defaults" in robust and ROBUSTNESS:
        r = robust["defaults"]
        result["bf16_auc_delta"] = round(abs(r["none_bf16"]["auc"] - r["none"]["auc"]), 4)
        result["bf16_max_abs_dp"] = round(float(np.abs(bf16_probs - fp32_probs).max()), 4)
        result["bf16_top1_agreement"] = round(float((bf16_probs.argmax(1) == fp32_probs.argmax(1)).mean()), 4)
    if "defaults" in arms:
        nd = partition_summary.get("near_duplicates") or {}
        last = sanity.sort_values("level").groupby("method").last()
        result |= {
            "near_duplicate_pairs": nd.get("crossed_groups"), "near_duplicate_pairs_same_lesion":
                None if nd.get("pairs") is None else nd["pairs"] - nd.get("crossed_groups", 0),
            "saliency_sanity_conclusive": bool(saliency_summary.get("sanity_conclusive")),
            "saliency_sanity_spearman_all_randomised": {k: round(float(v), 3) for k, v in last["spearman"].items()},
            "saliency_sanity_constant_maps_all_randomised": {k: int(v) for k, v in last["constant_maps"].items()},
            "saliency_inside_lesion": {k: round(float(v), 3)
                                       for k, v in index.groupby("method")["inside_lesion"].mean().items()},
            "target_met": result["auc_melanoma_nevus"] is not None and result["auc_melanoma_nevus"] >= 0.85}
    if "defaults" in arms and "plain" in arms and result["auc_melanoma_nevus_ci"]:
        lo, hi = result["auc_melanoma_nevus_ci"]
        result["auc_change_vs_plain"] = round(result["auc_melanoma_nevus"] - result["auc_melanoma_nevus_plain"], 4)
        result["auc_ci_half_width"] = round((hi - lo) / 2, 4)
    result["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    write_results(RESULTS_NAME, result)
    print_table(result, robust)
    last_line({k: result.get(k) for k in (
        "auc_melanoma_nevus", "auc_melanoma_nevus_ci", "auc_carcinoma_bkl", "auc_carcinoma_bkl_ci",
        "accuracy_three_class", "locked_threshold_melanoma", "locked_sensitivity_melanoma",
        "locked_sensitivity_melanoma_ci", "locked_specificity_melanoma", "locked_specificity_melanoma_ci",
        "ece_before", "ece_after", "near_duplicate_pairs", "saliency_sanity_conclusive", "epochs", "precision",
        "auc_melanoma_nevus_plain", "auc_change_vs_plain", "auc_ci_half_width", "auc_shifted_min",
        "auc_shifted_min_with_cc", "bf16_auc_delta", "bf16_max_abs_dp", "target_met", "minutes",
        "locked_sensitivity_melanoma_where_fitted", "locked_specificity_melanoma_where_fitted",
        "locked_melanoma_carries_over")})
    return 0


def print_table(result: dict, robust: dict) -> None:
    print(f"\nHAM10000, biopsy-proven held-out lesions ({result['test_biopsy_images']} images), 2 CPUs:")
    print(f"{'arm':<9} {'task':<36} {'metric':<9} {'value':>6}  95 % CI")
    for suffix, arm in (("", "defaults"), ("_plain", "plain")):
        for name, key in (("melanoma vs nevus", "auc_melanoma_nevus"), ("carcinoma vs bkl", "auc_carcinoma_bkl"),
                          ("three-class accuracy", "accuracy_three_class")):
            if result.get(key + suffix) is not None:
                print(f"{arm:<9} {name:<36} {'':<9} {result[key + suffix]:>6.3f}  {result[f'{key}_ci{suffix}']}")
    if result.get("locked_sensitivity_melanoma") is not None:
        print(f"locked melanoma threshold {result['locked_threshold_melanoma']} (out of fold, sensitivity 0.95): "
              f"test sensitivity {result['locked_sensitivity_melanoma']} {result['locked_sensitivity_melanoma_ci']}, "
              f"specificity {result['locked_specificity_melanoma']} {result['locked_specificity_melanoma_ci']}")
    print(f"ECE {result.get('ece_before')} -> {result.get('ece_after')} (temperature scaling, out of fold)")
    print(f"{'robustness (one view)':<24}" + "".join(f"{c:>13}" for c in ("none", *SHIFTS)))
    for arm, aucs in robust.items():
        print(f"{arm:<24}" + "".join(f"{'-' if aucs[c]['auc'] is None else format(aucs[c]['auc'], '.3f'):>13}"
                                     for c in ("none", *SHIFTS)))
    if "bf16_auc_delta" in result:
        print(f"bf16 scoring (unshifted, one view): AUC delta {result['bf16_auc_delta']}, max |dp| "
              f"{result['bf16_max_abs_dp']}, top-1 agreement {result['bf16_top1_agreement']}")
    if "saliency_sanity_conclusive" in result:
        print(f"saliency sanity conclusive: {result['saliency_sanity_conclusive']}; Spearman, fully randomised: "
              f"{result['saliency_sanity_spearman_all_randomised']}")


if __name__ == "__main__":
    sys.exit(main())
