"""Partition stage at scale: dermray (Ray, map-side partial aggregation) vs a single-process pandas/pyarrow
baseline doing the same work (read, validate, count per node, the same partitioning algorithm, duplicate check,
grouped stratified folds, write labels), on a generated manifest over the real ISIC taxonomy.

Each measurement runs in its own process so that peak RSS is the driver's own. Ray start-up is reported apart
from the stage time (a job on a running cluster does not pay it). Run with no arguments:

    .venv/bin/python benchmarks/partition.py

The last line is one JSON object: ratio (dermray time / baseline time, at 5M rows), rows_per_s,
driver_peak_rss_mb_1m, driver_peak_rss_mb_5m.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SIZES = (1_000_000, 5_000_000)


def generate(path: str, rows: int, seed: int = 0) -> None:
    """A manifest over the real ISIC taxonomy: Zipf-skewed labels on all nodes, lesions of 1-3 images."""
    from dermray.importers import isic_taxonomy

    tax = isic_taxonomy()
    rng = np.random.default_rng(seed)
    nodes = np.array(tax.node_ids[1:], dtype=object)
    weights = 1.0 / np.arange(1, len(nodes) + 1) ** 1.1
    weights = rng.permutation(weights / weights.sum())
    writer = None
    chunk = 500_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        idx = np.arange(start, start + n)
        lesion = (idx * 0.6).astype(np.int64)  # consecutive images share a lesion (about 1.7 images per lesion)
        # A lesion's images share its diagnosis; 1 % of images are labelled differently (another class, or a
        # finer or coarser node), so some groups span classes.
        labels = nodes[_lesion_label(lesion, weights, seed)]
        odd = rng.random(n) < 0.01
        labels[odd] = nodes[rng.choice(len(nodes), int(odd.sum()), p=weights)]
        ids = pa.array([f"IMG_{i:09d}" for i in idx])
        t = pa.table({
            "image_id": ids,
            "uri": pa.array([f"s3://archive/images/IMG_{i:09d}.jpg" for i in idx]),
            "label": pa.array(labels, pa.string()),
            "group_id": pa.array([f"LES_{x:09d}" for x in lesion]),
            "label_source": pa.array(np.where(rng.random(n) < 0.4, "biopsy", "clinical")),
            "modality": pa.array(np.where(rng.random(n) < 0.5, "dermoscopy", "clinical")),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, t.schema, compression="zstd")
        writer.write_table(t, row_group_size=250_000)
    writer.close()
    tax_path = os.path.join(os.path.dirname(path), "taxonomy.parquet")
    pq.write_table(tax.to_table(), tax_path)


def _lesion_label(lesion: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
    """A Zipf-distributed node index per lesion id, the same wherever the lesion's images fall."""
    from dermray.partitioning import hash_strings

    u = (hash_strings(lesion.astype(str), seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.minimum(np.searchsorted(np.cumsum(weights), u), len(weights) - 1)


def run_dermray(manifest: str, out: str) -> dict:
    import ray

    from dermray import partition
    from dermray.config import load_config

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    startup = time.perf_counter() - t0
    cfg = load_config(None, [f"data.manifest={manifest}",
                             f"data.taxonomy={os.path.join(os.path.dirname(manifest), 'taxonomy.parquet')}",
                             f"output={out}", "partition.max_class_size=1000", "partition.folds=9"])
    t0 = time.perf_counter()
    summary = partition.run(cfg)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"seconds": seconds, "startup_s": startup, "assigned": summary["assigned"],
            "quarantined": summary["quarantined"], "classes": summary["training_classes"]}


def run_baseline(manifest: str, out: str) -> dict:
    """The plain way: one process, pandas and pyarrow, every row in memory."""
    import pandas as pd

    from dermray.partitioning import (HASH_BUCKETS, fold_table, hash_bucket, hash_strings, node_to_class,
                                      partition_classes)
    from dermray.definitions import load_taxonomy

    t0 = time.perf_counter()
    tax = load_taxonomy(os.path.join(os.path.dirname(manifest), "taxonomy.parquet"))
    df = pd.read_parquet(manifest, columns=["image_id", "uri", "label", "group_id", "label_source", "modality"])
    node_index = pd.Series(np.arange(len(tax)), index=tax.node_ids)
    code = df["label"].map(node_index)
    ok = (df["image_id"].notna() & df["uri"].notna() & code.notna()
          & df["label_source"].isin(["biopsy", "clinical"]) & df["modality"].isin(["clinical", "dermoscopy"]))
    ok &= ~(df["image_id"].duplicated(keep="first") & ok)
    valid = df[ok]
    codes = code[ok].astype(np.int64).to_numpy()
    counts = np.bincount(codes, minlength=len(tax))
    classes = partition_classes(tax, counts, 1000)
    lookup = node_to_class(tax, classes)
    cls = lookup[codes]
    g = hash_strings(valid["group_id"].to_numpy(), 0)
    b = hash_bucket(g)
    classes_per_group = pd.DataFrame({"g": g.view(np.int64), "c": cls}).drop_duplicates()["g"].value_counts()
    mixed = np.isin(g.view(np.int64), classes_per_group.index[classes_per_group > 1].to_numpy())
    stratum = np.where(mixed, len(classes), cls)
    hist = np.zeros((len(classes) + 1, HASH_BUCKETS), np.int64)
    np.add.at(hist, (stratum, b), 1)
    folds = fold_table(hist, 9)[stratum, b]
    pq.write_table(pa.table({"image_id": pa.array(valid["image_id"].to_numpy()),
                             "class_index": pa.array(cls, pa.int32()), "fold": pa.array(folds.astype(np.int32))}),
                   os.path.join(out, "labels.parquet"), compression="zstd")
    return {"seconds": time.perf_counter() - t0, "assigned": int(ok.sum()), "classes": len(classes)}


def child(kind: str, manifest: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    result = (run_dermray if kind == "dermray" else run_baseline)(manifest, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(kind: str, manifest: str, out: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, manifest, out], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in SIZES:
            manifest = os.path.join(tmp, f"m{rows}", "manifest.parquet")
            os.makedirs(os.path.dirname(manifest))
            t0 = time.perf_counter()
            generate(manifest, rows)
            print(f"generated {rows:,} rows in {time.perf_counter() - t0:.1f} s", flush=True)
            d = measure("dermray", manifest, os.path.join(tmp, f"d{rows}"))
            b = measure("baseline", manifest, os.path.join(tmp, f"b{rows}"))
            if d["assigned"] != b["assigned"] or d["classes"] != b["classes"]:
                raise SystemExit(f"dermray and baseline disagree: {d} vs {b}")
            results[rows] = (d, b)
    print()
    print(f"{'rows':>10} {'dermray s':>10} {'ray start s':>11} {'baseline s':>11} {'ratio':>6} "
          f"{'dermray rows/s':>15} {'driver RSS MB':>14} {'baseline RSS MB':>16}")
    for rows, (d, b) in results.items():
        print(f"{rows:>10,} {d['seconds']:>10.2f} {d['startup_s']:>11.2f} {b['seconds']:>11.2f} "
              f"{d['seconds'] / b['seconds']:>6.2f} {rows / d['seconds']:>15,.0f} {d['peak_rss_mb']:>14.0f} "
              f"{b['peak_rss_mb']:>16.0f}")
    big_d, big_b = results[SIZES[-1]]
    print(f"machine: {os.cpu_count()} CPUs; target ratio <= 1.5, driver RSS < 1536 MB and flat from 1M to 5M rows")
    print(json.dumps({
        "ratio": round(big_d["seconds"] / big_b["seconds"], 3),
        "rows_per_s": round(SIZES[-1] / big_d["seconds"]),
        "driver_peak_rss_mb_1m": round(results[SIZES[0]][0]["peak_rss_mb"], 1),
        "driver_peak_rss_mb_5m": round(big_d["peak_rss_mb"], 1),
        "baseline_peak_rss_mb_5m": round(big_b["peak_rss_mb"], 1),
        "ray_startup_s": round(big_d["startup_s"], 2),
    }))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
