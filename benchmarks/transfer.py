"""Transfer learning vs learning from scratch on HAM10000, through dermray's own import, partition, train and
evaluate code: efficientnet_lite0 with its ImageNet weights (last blocks fine-tuned) vs the same network from
random initialisation (all layers trained), the same lesion-grouped split (fold 0 of 5 held out as the test set),
the same training-time budget (15 minutes each unless DERMRAY_TRANSFER_MINUTES says otherwise). Reported: AUC of
melanoma vs nevus on the biopsy-proven images of the held-out split, with a lesion-bootstrap 95 % CI. Model
selection does not look at the test split (the last epoch is scored). Needs ../shared/data/ham10000. Run:

    .venv/bin/python benchmarks/transfer.py      # ~35 minutes on 2 cores (two 15-minute budgets)

DERMRAY_BENCH_SMOKE=1: 300 biopsy-proven melanoma and nevus images, 64 px, a few seconds of training each, results to
a temporary folder. Writes benchmarks/results/transfer/results.json (with the machine). Last line JSON:
auc_pretrained, auc_scratch, their CIs, ci_disjoint, minutes (of training, each), n_test.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

import pandas as pd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SMOKE, last_line, size, write_results  # noqa: E402

HAM = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA",
                                  pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")) / "ham10000"
MINUTES = float(os.environ.get("DERMRAY_TRANSFER_MINUTES", size("15", "0.1")))
IMAGE_SIZE = size(160, 64)
SMOKE_IMAGES = 150  # per diagnosis (mel, nv), biopsy-proven, in smoke mode
RUNS = {
    "pretrained": ["train.weights=imagenet", "train.freeze=5", "train.lr=0.001"],
    "scratch": ["train.weights=none", "train.freeze=none", "train.lr=0.001"],
}


def main() -> None:
    import ray

    from dermray.cli import main as cli
    from dermray.runtime.config import load_config
    from dermray.stages import evaluate, train

    if not (HAM / "labels.csv").exists():
        sys.exit(f"HAM10000 not found at {HAM}")
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        metadata = HAM / "labels.csv"
        if SMOKE:
            labels = pd.read_csv(metadata)
            labels = labels[labels.dx_type == "histo"]
            pd.concat([labels[labels.dx == dx].head(SMOKE_IMAGES) for dx in ("mel", "nv")]).to_csv(
                tmp / "labels.csv", index=False)
            metadata = tmp / "labels.csv"
        assert cli(["import", "ham10000", "--metadata", str(metadata), "--images", str(HAM / "images"),
                    "--output", str(tmp / "in")]) == 0
        assert cli(["partition", "--manifest", str(tmp / "in" / "manifest.parquet"), "--taxonomy",
                    str(tmp / "in" / "taxonomy.parquet"), "--tasks", str(tmp / "in" / "tasks.yaml"),
                    "--max-class-size", size("1000", "50"), "--folds", "5", "--seed", "0", "--output", str(tmp / "out"),
                    "--run-id", "split"]) == 0
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        base = [f"data.manifest={tmp / 'in' / 'manifest.parquet'}", f"data.taxonomy={tmp / 'in' / 'taxonomy.parquet'}",
                f"data.tasks={tmp / 'in' / 'tasks.yaml'}", f"output={tmp / 'out'}", "train.arch=efficientnet_lite0",
                f"train.image_size={IMAGE_SIZE}", "train.folds=[0]", f"train.epochs={size(100, 1)}",
                "train.batch_size=32", "train.optimizer=adamw", f"train.max_minutes={MINUTES}",
                "train.checkpoint_metric=train_loss", "train.cpus_per_worker=1", "train.torch_threads=2",
                f"train.partition={tmp / 'out' / 'partition' / 'split'}"]
        for name, settings in RUNS.items():
            t0 = time.perf_counter()
            s = train.run(load_config(None, base + settings + [f"run_id={name}"]))
            fold = tmp / "out" / "train" / name / "fold=0"
            preds = pd.read_parquet(fold / "val_predictions.parquet")
            preds["model_id"] = name
            preds.to_parquet(tmp / f"{name}.parquet")
            evaluate.run(load_config(None, [f"evaluate.predictions={tmp / f'{name}.parquet'}",
                                                 f"data.tasks={tmp / 'in' / 'tasks.yaml'}",
                                                 f"data.taxonomy={tmp / 'in' / 'taxonomy.parquet'}",
                                                 f"evaluate.partition={tmp / 'out' / 'partition' / 'split'}",
                                                 f"output={tmp / 'out'}", f"run_id={name}"]))
            m = pd.read_parquet(tmp / "out" / "metrics" / name / "metrics.parquet")
            row = m[(m.task == "melanoma_vs_nevus") & (m.subset == "biopsy") & (m.metric == "auc")].iloc[0]
            results[name] = {"auc": row.value, "ci": (row.ci_low, row.ci_high), "n": int(row.n),
                             "epochs": s["per_fold"][0]["epochs"], "seconds": time.perf_counter() - t0}
            print(f"{name}: AUC {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] on {row.n} biopsy-proven "
                  f"melanoma/nevus images, {results[name]['epochs']} epochs", flush=True)
        ray.shutdown()
    p, s = results["pretrained"], results["scratch"]
    print()
    print(f"{'model':<12} {'AUC':>6} {'95% CI':>16} {'n':>6} {'epochs':>7} {'wall s':>8}")
    for name, r in results.items():
        print(f"{name:<12} {r['auc']:>6.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] {r['n']:>6} {r['epochs']:>7} "
              f"{r['seconds']:>8.0f}")
    print(f"efficientnet_lite0 at {IMAGE_SIZE} px, {MINUTES:g} training minutes each, fold 0 of 5 (lesion-grouped) "
          f"held out; machine: {os.cpu_count()} CPUs; target: pretrained >= 0.82, CIs disjoint"
          + ("  [SMOKE: a few hundred images, seconds of training: not a measurement]" if SMOKE else ""))
    figures = {"auc_pretrained": round(p["auc"], 4), "auc_pretrained_ci": [round(x, 4) for x in p["ci"]],
               "auc_scratch": round(s["auc"], 4), "auc_scratch_ci": [round(x, 4) for x in s["ci"]],
               "ci_disjoint": bool(p["ci"][0] > s["ci"][1] or s["ci"][0] > p["ci"][1]),
               "minutes": MINUTES, "n_test": p["n"], "epochs_pretrained": p["epochs"], "epochs_scratch": s["epochs"],
               "image_size": IMAGE_SIZE}
    write_results("transfer", figures, {k: {**v, "ci": list(v["ci"])} for k, v in results.items()}, started)
    last_line(figures)


if __name__ == "__main__":
    main()
