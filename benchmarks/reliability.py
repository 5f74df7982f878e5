"""Reliability, measured: faults injected into real processes, a corpus of bad inputs, and memory under load.

1. Faults: runs the fault-injection tests (a training worker SIGKILLed mid-epoch, the scoring driver SIGKILLed and
   re-run, the scoring actor SIGKILLed, the S3 server stopped during a write and restarted) and counts survivals.
2. Bad inputs: generates images (truncated, zero-byte, non-image, PNG with alpha, 16-bit PNG, CMYK and grayscale
   JPEG, EXIF-rotated, decompression bomb, huge dimensions, unicode and space paths), tar shards (../, absolute,
   symlink members), manifests (duplicate ids, null / unknown labels, wrong column types, corrupt Parquet) and
   taxonomies (cycle, two roots, orphan, duplicate ids); each must be scored (valid kinds) or refused with a reason
   (a quarantine row or a one-line error), with the stage's counts adding up.
3. Load: scores 100,000 small generated images (mobilenet_v3_small, 32 px) and reports images/s and the peak RSS
   of the driver and of all of Ray's processes together, sampled every 0.5 s.

Run with no arguments: .venv/bin/python benchmarks/reliability.py   (about 5 minutes on 2 cores; set
DERMRAY_RELIABILITY_IMAGES to change the load size; DERMRAY_BENCH_SMOKE=1: no fault tests, 1,000 images, results
to a temporary folder). Writes benchmarks/results/reliability/results.json (with the machine). Last line JSON:
faults_injected, faults_survived, bad_inputs_tried, bad_inputs_handled, rows_lost, peak_rss_mb (plus the load's
images_per_s).
"""
from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import numpy as np
import pandas as pd
import psutil
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import SMOKE, last_line, size, write_results  # noqa: E402

LOAD_IMAGES = int(os.environ.get("DERMRAY_RELIABILITY_IMAGES", size("100000", "1000")))
FAULT_TESTS = [
    "tests/stage/test_train.py::test_a_killed_worker_resumes_from_its_checkpoint_and_a_rerun_continues",
    "tests/system/test_processes.py::test_a_driver_killed_part_way_and_rerun_scores_each_image_exactly_once",
    "tests/stage/test_score.py::test_a_killed_scoring_actor_is_replaced_and_the_output_is_complete",
    "tests/stage/test_storage_faults.py::test_a_write_during_an_outage_fails_clearly_and_leaves_the_old_table_whole",
]


def faults() -> tuple[int, int, list[str]]:
    """(injected, survived, not survived): a fault survived is its test passed (a skipped test survived nothing)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", *FAULT_TESTS],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    passed = [t for t in FAULT_TESTS if f"PASSED {t}" in out.stdout]
    if len(passed) < len(FAULT_TESTS):
        print(out.stdout[-3000:], file=sys.stderr)
    return len(FAULT_TESTS), len(passed), [t for t in FAULT_TESTS if t not in passed]


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def image_corpus(folder: pathlib.Path) -> list[dict]:
    """(name, file, valid) for every odd image kind."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good = _jpeg(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    bomb = Image.new("1", (20000, 20000))
    cases = {
        "truncated.jpg": (good[: len(good) // 2], False), "zero-byte.jpg": (b"", False),
        "not-an-image.jpg": (b"<html>not an image</html>" * 10, False),
        "png-alpha.png": (_png(rgb.convert("RGBA")), True),
        "sixteen-bit.png": (_png(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16))), True),
        "cmyk.jpg": (_jpeg(rgb.convert("CMYK")), True), "grayscale.jpg": (_jpeg(rgb.convert("L")), True),
        "exif-rotated.jpg": (_jpeg(rgb, exif=exif), True), "bomb.png": (_png(bomb, optimize=True), False),
        "huge-dimensions.png": (_png(Image.new("L", (9000, 9000))), False),
        "ünïcødé name.jpg": (good, True), "with spaces.jpg": (good, True),
    }
    rows = []
    for name, (data, valid) in cases.items():
        (folder / name).write_bytes(data)
        rows.append({"image_id": name.rsplit(".", 1)[0], "uri": str(folder / name), "label": "x", "valid": valid})
    rows.append({"image_id": "missing", "uri": str(folder / "missing.jpg"), "label": "x", "valid": False})
    return rows


def tar_corpus(path: pathlib.Path) -> tuple[int, int]:
    """A shard with one good sample and three unsafe members; returns (unsafe members, good samples)."""
    good = _jpeg(Image.new("RGB", (40, 30), (120, 80, 60)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, kind in (("ok.jpg", good, tarfile.REGTYPE), ("../escape.jpg", good, tarfile.REGTYPE),
                                 ("/abs/olute.jpg", good, tarfile.REGTYPE), ("link.jpg", b"", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return 3, 1


def bad_inputs(tmp: pathlib.Path, fold: pathlib.Path) -> tuple[int, int, int, list[str]]:
    """(tried, handled, rows lost, failures)."""
    from dermray.errors import UserError
    from dermray.runtime.config import load_config
    from dermray.stages import partition, score

    tried = handled = lost = 0
    failures = []
    folder = tmp / "odd images"
    folder.mkdir()
    rows = image_corpus(folder)
    rows.append({**rows[-2], "valid": False})  # a duplicate image_id
    pd.DataFrame(rows).drop(columns="valid").to_parquet(tmp / "odd.parquet")
    s = score.run(load_config(None, [f"score.input={tmp / 'odd.parquet'}", f"score.checkpoints={fold}",
                                     f"output={tmp / 'out'}", "run_id=odd", "score.max_pixels=20000000"]))
    preds = pd.read_parquet(tmp / "out" / "predictions" / "odd" / "predictions")
    q = pd.read_parquet(tmp / "out" / "predictions" / "odd" / "quarantine.parquet")
    lost += len(rows) - (len(preds) + len(q))
    for i, r in enumerate(rows):
        tried += 1
        scored = r["image_id"] in set(preds["image_id"]) and r["valid"]
        refused = ((q["row"] == i) & (q["reason"].str.len() > 0)).any() and not r["valid"]
        if scored or refused:
            handled += 1
        else:
            failures.append(f"image {r['image_id']}")
    assert s["input"] == s["scored"] + s["quarantined"], s
    unsafe, good = tar_corpus(tmp / "shard.tar")
    s = score.run(load_config(None, [f"score.input={tmp / 'shard.tar'}", f"score.checkpoints={fold}",
                                     f"output={tmp / 'out'}", "run_id=tar"]))
    tried += unsafe + good
    handled += min(s["quarantined"], unsafe) + min(s["scored"], good)
    lost += (unsafe + good) - (s["quarantined"] + s["scored"])
    if (s["quarantined"], s["scored"]) != (unsafe, good):
        failures.append(f"tar: {s['quarantined']} quarantined, {s['scored']} scored")
    # Manifests and taxonomies through the partition stage.
    tax = pd.DataFrame({"node_id": ["root", "a", "b"], "parent_id": [None, "root", "root"], "name": ["r", "a", "b"]})
    tax.to_parquet(tmp / "tax.parquet")
    manifests = {
        "duplicate ids": pd.DataFrame({"image_id": ["1", "1", "2"], "uri": ["u", "v", "w"], "label": ["a", "a", "b"]}),
        "null and unknown labels": pd.DataFrame({"image_id": ["1", "2", "3"], "uri": ["u", "v", "w"],
                                                 "label": ["a", None, "zzz"]}),
        "wrong column types": pd.DataFrame({"image_id": [1, 2], "uri": ["u", "v"], "label": ["a", "b"]}),
    }
    for name, df in manifests.items():
        tried += 1
        df.to_parquet(tmp / "m.parquet")
        cfg = load_config(None, [f"data.manifest={tmp / 'm.parquet'}", f"data.taxonomy={tmp / 'tax.parquet'}",
                                 f"output={tmp / 'p'}", "partition.folds=2"])
        try:
            ps = partition.run(cfg)
            ok = ps["quarantined"] > 0 and ps["input_rows"] == ps["assigned"] + ps["quarantined"]
            lost += ps["input_rows"] - ps["assigned"] - ps["quarantined"]
        except UserError as e:
            ok = bool(str(e))
        handled += ok
        if not ok:
            failures.append(f"manifest: {name}")
    (tmp / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    taxonomies = {
        "cycle": [("a", "b", "a"), ("b", "a", "b")], "two roots": [("a", None, "a"), ("b", None, "b")],
        "orphan": [("r", None, "r"), ("a", "nope", "a")], "duplicate ids": [("r", None, "r"), ("r", "r", "x")],
    }
    cases = [("corrupt manifest Parquet", tmp / "corrupt.parquet", tmp / "tax.parquet")]
    for name, nodes in taxonomies.items():
        pd.DataFrame(nodes, columns=["node_id", "parent_id", "name"]).to_parquet(tmp / f"t-{len(cases)}.parquet")
        pd.DataFrame({"image_id": ["1"], "uri": ["u"], "label": [nodes[0][0]]}).to_parquet(tmp / "m1.parquet")
        cases.append((f"taxonomy: {name}", tmp / "m1.parquet", tmp / f"t-{len(cases)}.parquet"))
    for name, manifest, taxonomy in cases:
        tried += 1
        try:
            partition.run(load_config(None, [f"data.manifest={manifest}", f"data.taxonomy={taxonomy}",
                                             f"output={tmp / 'p2'}"]))
            failures.append(name)
        except UserError as e:
            handled += bool(str(e))
    return tried, handled, lost, failures


def load(tmp: pathlib.Path, fold: pathlib.Path, n: int, name: str) -> dict:
    from dermray.runtime.config import load_config
    from dermray.stages import score

    folder = tmp / name
    folder.mkdir()
    rng = np.random.default_rng(1)
    palette = [_jpeg(Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)), quality=80)
               for _ in range(64)]
    ids = [f"img{i:06d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        (folder / f"{image_id}.jpg").write_bytes(palette[i % 64])
    pd.DataFrame({"image_id": ids, "uri": [str(folder / f"{i}.jpg") for i in ids], "label": "x"}).to_parquet(
        tmp / f"{name}.parquet")
    peak = {"driver": 0, "total": 0}
    done = threading.Event()

    def sample():
        me = psutil.Process()
        while not done.is_set():
            try:
                procs = [me] + me.children(recursive=True)
                rss = [p.memory_info().rss for p in procs if p.is_running()]
                peak["driver"] = max(peak["driver"], me.memory_info().rss)
                peak["total"] = max(peak["total"], sum(rss))
            except psutil.Error:
                pass
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    s = score.run(load_config(None, [f"score.input={tmp / f'{name}.parquet'}", f"score.checkpoints={fold}",
                                     f"output={tmp / 'out'}", f"run_id={name}", "score.batch_size=256",
                                     "score.rows_per_file=20000", "ray.num_cpus=2"]))
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    preds = pd.read_parquet(tmp / "out" / "predictions" / name / "predictions", columns=["image_id"])
    return {"images": n, "scored": s["scored"], "rows_lost": n - len(preds) - s["quarantined"],
            "duplicates": int(preds["image_id"].duplicated().sum()), "images_per_s": round(n / wall, 1),
            "peak_rss_driver_mb": round(peak["driver"] / 2**20), "peak_rss_all_mb": round(peak["total"] / 2**20)}


def tiny_model(tmp: pathlib.Path) -> pathlib.Path:
    """An untrained mobilenet_v3_small fold (32 px, 2 classes) with its model card: what scoring needs."""
    import torch

    from dermray.runtime import artifacts
    from dermray.store import models

    fold = tmp / "train" / "m" / "fold=0"
    (fold / "best").mkdir(parents=True)
    torch.save(models.build_model("mobilenet_v3_small", 2, weights="none").state_dict(), fold / "best" / "model.pt")
    classes = [{"class_index": i, "node_id": f"c{i}", "name": f"c{i}", "n_images": 1, "scope": "subtree"}
               for i in range(2)]
    artifacts.write_card(artifacts.ModelCard(
        model_id="reliability/m", architecture="mobilenet_v3_small", input_size=32,
        normalisation={"mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD)},
        training_classes=classes, classes_hash=artifacts.classes_hash(classes),
        weights_sha256=artifacts.weights_sha256(str(fold / "best" / "model.pt"))), str(fold))
    return fold


def main() -> int:
    t0 = time.perf_counter()
    injected, survived, failed = faults() if not SMOKE else (0, 0, ["(smoke mode: fault tests not run)"])
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        fold = tiny_model(tmp)
        tried, handled, lost, bad_failures = bad_inputs(tmp, fold)
        # Bounded memory: the peak at a fifth of the load should be about the peak at the whole load.
        small = load(tmp, fold, LOAD_IMAGES // 5, "load-small")
        ld = load(tmp, fold, LOAD_IMAGES, "load")
    rows_lost = lost + sum(x["rows_lost"] + x["duplicates"] for x in (small, ld))
    print(f"\nReliability ({os.cpu_count()} CPUs), {round((time.perf_counter() - t0) / 60, 1)} minutes")
    print(f"{'faults injected':<28} {injected:>8}   survived {survived}" + (f"  (failed: {failed})" if failed else ""))
    print(f"{'bad inputs tried':<28} {tried:>8}   handled {handled}"
          + (f"  (not: {bad_failures})" if bad_failures else ""))
    print(f"{'rows lost':<28} {rows_lost:>8}")
    print(f"{'load: images scored':<28} {ld['scored']:>8}   {ld['images_per_s']} images/s")
    print(f"{'load: peak RSS driver MB':<28} {ld['peak_rss_driver_mb']:>8}   at {small['images']} images: "
          f"{small['peak_rss_driver_mb']}")
    print(f"{'load: peak RSS all Ray MB':<28} {ld['peak_rss_all_mb']:>8}   at {small['images']} images: "
          f"{small['peak_rss_all_mb']}")
    figures = {"faults_injected": injected, "faults_survived": survived, "bad_inputs_tried": tried,
               "bad_inputs_handled": handled, "rows_lost": rows_lost, "peak_rss_mb": ld["peak_rss_all_mb"],
               "peak_rss_driver_mb": ld["peak_rss_driver_mb"], "load_images": ld["images"],
               "load_images_per_s": ld["images_per_s"], "peak_rss_mb_at_fifth_load": small["peak_rss_all_mb"]}
    write_results("reliability", figures, {"faults_not_survived": failed, "bad_inputs_not_handled": bad_failures,
                                           "load": ld, "load_fifth": small, "fault_tests": FAULT_TESTS}, t0)
    last_line(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
