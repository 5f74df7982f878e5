"""Scoring at scale: the driver's memory through planning and resumption at 1M and 10M manifest rows, and 1M images
scored end to end.

1. Planning + resume with 90 % already scored. A manifest of N rows (image ids ``IMG_<9 digits>``, URIs over a pool
   of 64 small real JPEGs: HAM10000 images shrunk to 48x36, or drawn lesions when HAM10000 is absent), and a run
   folder as an earlier incremental run of the same model left it after scoring the manifest's first 90 %: part
   files ``predictions/part-b0001-<chunk>-<part>.parquet`` of ``score.rows_per_file`` rows (image_id, model_id,
   probs, top_class) and ``_state/spec.json`` holding that run's lineage (this model and config; its input, the
   shorter manifest, fingerprinted otherwise). In a child process (its peak RSS, VmHWM, is the driver's own):
   ``ray.init`` (start-up timed apart), then ``dermray.stages.score.plan`` - the stage's own planning: the manifest
   fingerprinted and its repeated ids found in Ray tasks, the run's lineage reconciled (incremental: another input
   keeps the output), the images this model already scored left out in tasks, the rest cut into parts - and it
   stops there: the remaining 10 % (1M images at 10M rows) are not decoded. Checked: already_done is 90 % and the
   work left is 10 %. Two row-group layouts are planned, since the manifest's fingerprint is hashed in blocks
   of 4,096 rows (dermray.store.lineage.BLOCK_ROWS) and the rows of a block that a chunk boundary cuts travel to
   the driver:
   ``aligned`` (pyarrow's default row groups of 1,048,576 rows, a multiple of the block) and ``unaligned`` (row
   groups of 100,003 rows, a multiple of nothing; DuckDB's default 122,880 is 30 blocks). The headline figures
   are the larger of the two.
2. 1M images scored end to end (``DERMRAY_SCORE_SCALE_IMAGES`` sets how many): a fresh run of ``score.run``
   (mobilenet_v3_small with random weights at 32 px, 2 classes, a model card written through dermray.runtime.artifacts;
   batch 256, parts of 20,000), Ray started before it (apart); images_per_s = images / the stage's seconds; the
   driver's peak RSS; rows_lost = input rows - predictions - quarantined + repeated predictions (target 0).

Targets: driver_peak_rss_mb_10m at most 1.2x driver_peak_rss_mb_1m, and under 1.5 GiB; rows_lost 0.

Run with no arguments (``DERMRAY_BENCH_SMOKE=1``: 1,000x smaller, results to a temporary folder):

    .venv/bin/python benchmarks/score_scale.py      # planning ~5 minutes; the 1M scored images ~20-40 minutes

Writes benchmarks/results/score_scale/results.json. Last line JSON: driver_peak_rss_mb_1m, driver_peak_rss_mb_10m,
rss_ratio_10m_1m, images_per_s_1m, driver_peak_rss_mb_scored_1m, rows_lost, plan_s_1m, plan_s_10m, ray_startup_s,
and per layout (driver_peak_rss_mb_<size>_<layout>, plan_s_<size>_<layout>).
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SMOKE, last_line, peak_rss_mb, run_child, size, write_results  # noqa: E402

HAM = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA",
                                  pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")) / "ham10000"
PLAN_SIZES = size({"1m": 1_000_000, "10m": 10_000_000}, {"1m": 1_000, "10m": 10_000})
LAYOUTS = size({"aligned": 1_048_576, "unaligned": 100_003}, {"aligned": 1_024, "unaligned": 123})  # rows per group
SCORED = int(os.environ.get("DERMRAY_SCORE_SCALE_IMAGES", size("1000000", "1000")))
ROWS_PER_FILE = size(10_000, 100)  # the default score.rows_per_file, for the pre-made parts
DONE_SHARE = 0.9
POOL = 64
MODEL_SIZE = 32


# ---- inputs -------------------------------------------------------------------------------------------------------
def jpeg_pool(folder: pathlib.Path) -> list[str]:
    """64 small real JPEGs: HAM10000 images shrunk to 48x36, or drawn lesions when HAM10000 is absent."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((HAM / "images").glob("*.jpg"))[:POOL] if (HAM / "images").exists() else []
    paths = []
    for i in range(POOL):
        if i < len(sources):
            img = Image.open(sources[i]).convert("RGB").resize((48, 36))
        else:
            from dermray.apps import synth

            img = synth.draw_lesion(sorted(synth.PROFILES)[i % len(synth.PROFILES)], np.random.default_rng(i), 48,
                                    "dermoscopy").convert("RGB")
        p = folder / f"pool-{i:02d}.jpg"
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        p.write_bytes(buf.getvalue())
        paths.append(str(p))
    return paths


def ids(start: int, stop: int) -> pa.Array:
    return pa.array([f"IMG_{i:09d}" for i in range(start, stop)], pa.string())


def manifest(path: pathlib.Path, rows: int, pool: list[str], row_group: int) -> None:
    """image_id, uri (over the pool), label: written in slices of row groups."""
    pool_arr = np.array(pool, dtype=object)
    labels = np.array(["c0", "c1"], dtype=object)
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        step = max(row_group, (500_000 // row_group) * row_group)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            idx = np.arange(start, stop)
            w.write_table(pa.table({"image_id": ids(start, stop), "uri": pa.array(pool_arr[idx % POOL], pa.string()),
                                    "label": pa.array(labels[idx % 2], pa.string())}, schema=schema),
                          row_group_size=row_group)


def tiny_model(tmp: pathlib.Path) -> pathlib.Path:
    """An untrained mobilenet_v3_small fold (32 px, 2 classes) with its model card: what scoring needs."""
    import torch

    from dermray.runtime import artifacts
    from dermray.store import models

    fold = tmp / "train" / "tiny" / "fold=0"
    (fold / "best").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.build_model("mobilenet_v3_small", 2, weights="none").state_dict(), fold / "best" / "model.pt")
    classes = [{"class_index": i, "node_id": f"c{i}", "name": f"c{i}", "n_images": 1, "scope": "subtree"}
               for i in range(2)]
    artifacts.write_card(artifacts.ModelCard(
        model_id="score_scale/tiny", architecture="mobilenet_v3_small", input_size=MODEL_SIZE,
        normalisation={"mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD)},
        training_classes=classes, classes_hash=artifacts.classes_hash(classes),
        weights_sha256=artifacts.weights_sha256(str(fold / "best" / "model.pt"))), str(fold))
    return fold


def score_config(man: pathlib.Path, fold: pathlib.Path, out: pathlib.Path, run_id: str, incremental: bool,
                 rows_per_file: int, batch: int = 32):
    from dermray.runtime.config import load_config

    return load_config(None, [f"score.input={man}", f"score.checkpoints={fold}", f"output={out}", f"run_id={run_id}",
                              f"score.incremental={'true' if incremental else 'false'}",
                              f"score.rows_per_file={rows_per_file}", f"score.batch_size={batch}", "ray.num_cpus=2"])


def earlier_run(cfg, rows: int) -> int:
    """The run folder an earlier incremental run left after scoring the manifest's first 90 %: its parts and its
    lineage (this model and config, its own shorter input). Returns the rows it scored."""
    from dermray.runtime import artifacts, layout
    from dermray.stages.score.stage import score_lineage
    from dermray.store import lineage, storage

    ens = artifacts.load_ensemble(cfg.score.checkpoints)
    rdir = layout.predictions_dir(cfg.output, cfg.run_id)
    done = int(rows * DONE_SHARE)
    rng = np.random.default_rng(0)
    per_chunk = 100_000  # the planning chunk: parts are named per chunk as plan_manifest names them
    for c, chunk_start in enumerate(range(0, done, per_chunk)):
        for j, start in enumerate(range(chunk_start, min(done, chunk_start + per_chunk), ROWS_PER_FILE)):
            stop = min(done, chunk_start + per_chunk, start + ROWS_PER_FILE)
            n = stop - start
            p = rng.random(n, dtype=np.float32)
            probs = np.stack([p, 1 - p], axis=1).astype(np.float32)
            storage.write_table(pa.table({
                "image_id": ids(start, stop), "model_id": pa.array([ens.model_id] * n, pa.string()),
                "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), 2).cast(pa.list_(pa.float32())),
                "top_class": pa.array(probs.argmax(1).astype(np.int32))}),
                storage.join(rdir, "predictions", f"part-b0001-{c:05d}-{j:03d}.parquet"))
    before = lineage.Fingerprint(uri=storage.redact(cfg.score.input), method="columns",
                                 content="0" * 64, rows=done)  # the earlier, shorter manifest
    spec = score_lineage(ens, before, None, cfg)
    storage.write_text(storage.join(rdir, "_state", "spec.json"), json.dumps(spec.to_dict(), indent=2))
    return done


# ---- children -----------------------------------------------------------------------------------------------------
def _ray_init() -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    return time.perf_counter() - t0


def child_plan(man: str, fold: str, out: str, run_id: str) -> dict:
    """Planning + resumption only: the stage's plan(), as it calls it; nothing is decoded."""
    import ray

    from dermray.runtime import artifacts, layout
    from dermray.stages.score.plan import run_state
    from dermray.stages.score.stage import check_input, plan

    cfg = score_config(pathlib.Path(man), pathlib.Path(fold), pathlib.Path(out), run_id, True, ROWS_PER_FILE)
    startup = _ray_init()
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    ens = artifacts.load_ensemble(cfg.score.checkpoints, cfg.score.model_id)
    kind = check_input(cfg.score)
    rdir = layout.predictions_dir(cfg.output, cfg.run_id)
    work, now = plan(cfg, kind, rdir, ens, None)
    seconds = time.perf_counter() - t0
    todo = sum(t.num_rows for t in ray.get(work.refs)) if work.refs else 0
    parts_kept = len(run_state(rdir)[0])
    ray.shutdown()
    return {"seconds": seconds, "startup_s": startup, "input_rows": work.input_rows,
            "already_done": work.already_done, "todo": todo, "new_parts": work.parts, "parts_kept": parts_kept,
            "quarantined": work.quarantine.num_rows, "rss_after_ray_init_mb": rss_before}


def child_score(man: str, fold: str, out: str, run_id: str) -> dict:
    """1M images through score.run (Ray started first, its start-up apart)."""
    import pandas as pd

    from dermray.stages import score

    cfg = score_config(pathlib.Path(man), pathlib.Path(fold), pathlib.Path(out), run_id, False, 20_000, 256)
    startup = _ray_init()
    t0 = time.perf_counter()
    s = score.run(cfg)
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    preds = pd.read_parquet(pathlib.Path(out) / "predictions" / run_id / "predictions", columns=["image_id"])
    n = pq.ParquetFile(man).metadata.num_rows
    repeated = int(preds["image_id"].duplicated().sum())
    import ray

    ray.shutdown()
    return {"seconds": seconds, "startup_s": startup, "images": n, "scored": s["scored"],
            "quarantined": s["quarantined"], "rows_lost": n - len(preds) - s["quarantined"] + repeated,
            "repeated": repeated, "images_per_s": n / seconds, "steady_images_per_s": s.get("steady_images_per_s"),
            "files_written": s["files_written"], "peak_rss_mb_before_reading_predictions": rss}


CHILDREN = {"plan": child_plan, "score": child_score}


def child(kind: str, *args: str) -> None:
    result = CHILDREN[kind](*args)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measure(kind: str, *args) -> dict:
    r = run_child(__file__, kind, *args)
    print(f"  {kind:<6} {r['seconds']:8.2f} s   driver peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    return r


def main() -> None:
    started = time.perf_counter()
    plans, figures = {}, {}
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        pool = jpeg_pool(tmp / "pool")
        fold = tiny_model(tmp)
        for label, rows in PLAN_SIZES.items():
            for layout_name, row_group in LAYOUTS.items():
                man = tmp / f"manifest-{label}-{layout_name}.parquet"
                t0 = time.perf_counter()
                manifest(man, rows, pool, row_group)
                run_id = f"plan-{label}-{layout_name}"
                done = earlier_run(score_config(man, fold, tmp / "out", run_id, True, ROWS_PER_FILE), rows)
                print(f"{rows:,} rows ({layout_name}: row groups of {row_group:,}), {done:,} scored before: made in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
                r = measure("plan", man, fold, tmp / "out", run_id)
                if r["already_done"] != done or r["todo"] != rows - done or r["parts_kept"] == 0:
                    raise SystemExit(f"resumption did not keep the earlier run's output: {r}")
                plans[f"{label}_{layout_name}"] = {"rows": rows, "row_group": row_group, **r}
                man.unlink()
        # 1M images scored end to end.
        man = tmp / "manifest-scored.parquet"
        manifest(man, SCORED, pool, LAYOUTS["aligned"])
        print(f"scoring {SCORED:,} images end to end", flush=True)
        scored = measure("score", man, fold, tmp / "out", "scored")
    for label in PLAN_SIZES:
        for layout_name in LAYOUTS:
            p = plans[f"{label}_{layout_name}"]
            figures[f"driver_peak_rss_mb_{label}_{layout_name}"] = round(p["peak_rss_mb"], 1)
            figures[f"plan_s_{label}_{layout_name}"] = round(p["seconds"], 2)
        figures[f"driver_peak_rss_mb_{label}"] = max(figures[f"driver_peak_rss_mb_{label}_{x}"] for x in LAYOUTS)
        figures[f"plan_s_{label}"] = max(figures[f"plan_s_{label}_{x}"] for x in LAYOUTS)
    small, big = list(PLAN_SIZES)
    headline = {
        "driver_peak_rss_mb_1m": figures[f"driver_peak_rss_mb_{small}"],
        "driver_peak_rss_mb_10m": figures[f"driver_peak_rss_mb_{big}"],
        "rss_ratio_10m_1m": round(figures[f"driver_peak_rss_mb_{big}"] / figures[f"driver_peak_rss_mb_{small}"], 3),
        "images_per_s_1m": round(scored["images_per_s"], 1),
        "driver_peak_rss_mb_scored_1m": round(scored["peak_rss_mb_before_reading_predictions"], 1),
        "rows_lost": scored["rows_lost"],
        "scored_images": scored["images"],
        "ray_startup_s": round(scored["startup_s"], 2),
    }
    figures = headline | figures
    print()
    print(f"{'manifest rows':>14} {'layout':<10} {'row group':>10} {'plan s':>7} {'driver peak RSS MB':>19} "
          f"{'(after ray.init)':>17} {'already done':>13} {'left':>10}")
    for p in plans.values():
        layout_name = next(k for k, v in LAYOUTS.items() if v == p["row_group"])
        print(f"{p['rows']:>14,} {layout_name:<10} {p['row_group']:>10,} {p['seconds']:>7.2f} "
              f"{p['peak_rss_mb']:>19.0f} "
              f"{p['rss_after_ray_init_mb']:>17.0f} {p['already_done']:>13,} {p['todo']:>10,}")
    print(f"scored end to end: {scored['images']:,} images at {MODEL_SIZE} px in {scored['seconds']:.0f} s = "
          f"{scored['images_per_s']:.0f} images/s (steady {scored['steady_images_per_s']}), driver peak RSS "
          f"{scored['peak_rss_mb_before_reading_predictions']:.0f} MB, rows lost {scored['rows_lost']}; "
          f"Ray start-up {scored['startup_s']:.1f} s apart")
    print(f"targets: 10M rows' driver RSS <= 1.2x 1M's (now {headline['rss_ratio_10m_1m']}) and < 1536 MB; rows lost 0"
          + ("  [SMOKE: 1000x smaller, not a measurement]" if SMOKE else ""))
    write_results("score_scale", figures, {"plans": plans, "scored": scored, "pool_images": POOL,
                                           "model": f"mobilenet_v3_small {MODEL_SIZE} px"}, started)
    last_line(figures)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
