"""The whole pipeline on real images: all 10,015 HAM10000 images through `dermray import ham10000`, a held-out
lesion-grouped test split (20 % of lesions; its biopsy-proven images are scored), `dermray pipeline` (partition
with 9 lesion-grouped folds as in the paper, ImageNet-pretrained EfficientNet-Lite0 at 160 px fine-tuned on its
last stages for a fixed training budget (fold 0's model only: 2 CPUs train one model in the time), the learning
rate divided by 16 after 7 epochs, the test split scored with the cross-validation model and its 8 dihedral views
averaged (the training augmentation rotates and flips), evaluation, saliency with the randomisation sanity test).
Reports biopsy-proven melanoma vs nevus and carcinoma (bcc + akiec) vs benign keratosis (bkl) AUC with
lesion-bootstrap 95 % CIs, the 3-class accuracy, and the saliency sanity results. Needs ../shared/data/ham10000;
about 52 minutes on 2 cores (DERMRAY_HAM_TRAIN_MINUTES sets the training budget, default 45). Run with no arguments:

    .venv/bin/python benchmarks/ham10000.py

Results (JSON and the evaluation report in Markdown) go to benchmarks/results/ham10000/. Last line JSON:
auc_melanoma_nevus, auc_melanoma_nevus_ci, auc_carcinoma_bkl, auc_carcinoma_bkl_ci, and the rest.
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

import pandas as pd

REPO = pathlib.Path(__file__).resolve().parents[1]
HAM = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA", REPO.parent / "shared" / "data")) / "ham10000"
RESULTS = REPO / "benchmarks" / "results" / "ham10000"
TRAIN_MINUTES = float(os.environ.get("DERMRAY_HAM_TRAIN_MINUTES", "45"))
TEST_SHARE = 0.2


def split(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Lesion-grouped: a lesion is in the test split when the hash of its id falls in the first 20 %."""
    h = manifest["group_id"].map(lambda g: int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) / 16 ** 8)
    test = h < TEST_SHARE
    return manifest[~test], manifest[test]


def main() -> int:
    from dermray import pipeline
    from dermray.cli import main as cli
    from dermray.config import load_config

    if not (HAM / "labels.csv").exists():
        print(f"HAM10000 not found at {HAM}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        assert cli(["import", "ham10000", "--metadata", str(HAM / "labels.csv"), "--images", str(HAM / "images"),
                    "--output", str(tmp / "in")]) == 0
        manifest = pd.read_parquet(tmp / "in" / "manifest.parquet")
        train, test = split(manifest)
        assert not set(train.group_id) & set(test.group_id)
        train.to_parquet(tmp / "in" / "train.parquet", index=False)
        test.to_parquet(tmp / "in" / "test.parquet", index=False)
        cfg = load_config(str(REPO / "configs" / "ham10000.yaml"), [
            f"output={tmp / 'out'}", "run_id=ham", f"data.manifest={tmp / 'in' / 'train.parquet'}",
            f"data.taxonomy={tmp / 'in' / 'taxonomy.parquet'}", f"data.tasks={tmp / 'in' / 'tasks.yaml'}",
            f"pipeline.test_manifest={tmp / 'in' / 'test.parquet'}", "partition.folds=9", "train.folds=[0]",
            "train.image_size=160", "train.epochs=100", "train.lr_decay_epochs=7", f"train.max_minutes={TRAIN_MINUTES}",
            "train.cpus_per_worker=1", "train.torch_threads=2", "train.data_cpus=0.5", "score.batch_size=64",
            "score.tta=dihedral", "evaluate.subgroups=[]",
            "saliency.methods=[gradient,gradcam]", "saliency.k=4", "saliency.audit_size=6",
            f"saliency.masks={HAM}/masks/{{image_id}}_segmentation.png", "ray.num_cpus=2"])
        s = pipeline.run(cfg)
        print(pipeline.format_summary(s))
        out = tmp / "out"
        m = pd.read_parquet(out / "metrics" / "ham" / "metrics.parquet")
        sanity = pd.read_parquet(out / "saliency" / "ham" / "sanity.parquet")
        index = pd.read_parquet(out / "saliency" / "ham" / "saliency_index.parquet")
        history = pd.read_parquet(out / "train" / "ham" / "fold=0" / "metrics.parquet")
        epochs = int(history["epoch"].max()) + 1
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "metrics" / "ham" / "report.md", RESULTS / "report.md")

    def row(task, metric, subset="all"):
        r = m[(m.task == task) & (m.subset == subset) & (m.metric == metric)].iloc[0]
        return round(float(r.value), 4), [round(float(r.ci_low), 4), round(float(r.ci_high), 4)], int(r.n)

    mel, mel_ci, mel_n = row("melanoma_vs_nevus", "auc")
    car, car_ci, car_n = row("carcinoma_vs_benign_keratosis", "auc")
    acc3, acc3_ci, acc3_n = row("three_class", "accuracy")
    last = sanity.sort_values("level").groupby("method").last()
    result = {
        "auc_melanoma_nevus": mel, "auc_melanoma_nevus_ci": mel_ci, "n_melanoma_nevus": mel_n,
        "auc_carcinoma_bkl": car, "auc_carcinoma_bkl_ci": car_ci, "n_carcinoma_bkl": car_n,
        "accuracy_three_class": acc3, "accuracy_three_class_ci": acc3_ci, "n_three_class": acc3_n,
        "test_images": int(len(test)), "test_biopsy_images": int((test.label_source == "biopsy").sum()),
        "train_images": int(len(train)), "train_minutes": TRAIN_MINUTES, "partition_folds": 9, "tta": "dihedral",
        "epochs": epochs,
        "saliency_sanity_spearman_all_randomised": {k: round(float(v), 3) for k, v in last["spearman"].items()},
        "saliency_sanity_constant_maps_all_randomised": {k: int(v) for k, v in last["constant_maps"].items()},
        "saliency_inside_lesion": {k: round(float(v), 3) for k, v in index.groupby("method")["inside_lesion"].mean().items()},
        "stages": s["stages"], "target_met": mel >= 0.85, "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    (RESULTS / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nHAM10000, biopsy-proven held-out lesions ({result['test_biopsy_images']} images), 2 CPUs:")
    print(f"{'task':<36} {'metric':<9} {'value':>6}  95 % CI         n")
    for name, metric, v, ci, n in (("melanoma vs nevus", "AUC", mel, mel_ci, mel_n),
                                   ("carcinoma (bcc+akiec) vs bkl", "AUC", car, car_ci, car_n),
                                   ("three-class", "accuracy", acc3, acc3_ci, acc3_n)):
        print(f"{name:<36} {metric:<9} {v:>6.3f}  [{ci[0]:.3f}, {ci[1]:.3f}]  {n}")
    print(f"saliency sanity (Spearman, fully randomised): {result['saliency_sanity_spearman_all_randomised']}")
    print(json.dumps({k: result[k] for k in ("auc_melanoma_nevus", "auc_melanoma_nevus_ci", "auc_carcinoma_bkl",
                                             "auc_carcinoma_bkl_ci", "accuracy_three_class", "target_met",
                                             "minutes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
