"""Near-duplicate detection on all 10,015 HAM10000 images: the false merges it would make (HAM10000's lesion ids
are curated, so a pair it accepts across two lesions is a false merge, or a true duplicate the curators missed -
both are reported), and its recall on planted copies (re-encoded, resized, cropped by a few percent per side,
centred or not, under new ids). This is what chooses partition.near_duplicate_hamming and
partition.near_duplicate_similarity, and it projects the cost to 5M images.

    .venv/bin/python benchmarks/near_duplicates.py      # ~3 minutes on 2 cores; last line: one JSON object

Writes benchmarks/results/near_duplicates/results.json (with the machine). DERMRAY_BENCH_SMOKE=1: the first 500
images and 25 planted originals, results to a temporary folder.
"""
from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np
import pandas as pd
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HAM = pathlib.Path(os.environ.get("DERMRAY_SHARED_DATA", REPO.parent / "shared" / "data")) / "ham10000"
sys.path.insert(0, str(REPO / "benchmarks"))
from common import SMOKE, last_line, size, write_results  # noqa: E402

PLANTED = size(250, 25)
IMAGES = size(None, 500)  # HAM10000 images used (None: all)
SIMILARITY_SWEEP = (0.95, 0.97, 0.98, 0.985, 0.99)


def planted_copies(data: bytes, rng) -> dict[str, bytes]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size

    def jpeg(im, q=90):
        b = io.BytesIO()
        im.save(b, "JPEG", quality=q)
        return b.getvalue()

    left, t, r, b = (rng.uniform(0.02, 0.06, 4) * [w, h, w, h]).astype(int)
    # Issue 28, finding 7: edits combined - a crop of 2-3 pixels per side, resized to 80-95 %, re-encoded at JPEG
    # quality 60-90 - and a crop of 0-5 % per side, each side on its own (off-centre).
    px = rng.integers(2, 4, 4)
    crop = img.crop((px[0], px[1], w - px[2], h - px[3]))
    s = rng.uniform(0.80, 0.95)
    combined = jpeg(crop.resize((int(crop.width * s), int(crop.height * s))), int(rng.integers(60, 91)))
    f = (rng.uniform(0, 0.05, 4) * [w, h, w, h]).astype(int)
    return {"reencoded_q50": jpeg(img, 50), "resized_70pct": jpeg(img.resize((int(w * 0.7), int(h * 0.7)))),
            "cropped_4pct_centred": jpeg(img.crop((int(0.04 * w), int(0.04 * h), w - int(0.04 * w),
                                                   h - int(0.04 * h)))),
            "cropped_2_6pct_offcentre": jpeg(img.crop((left, t, w - r, h - b))),
            "combined_crop_resize_jpeg": combined,
            "cropped_0_5pct_offcentre": jpeg(img.crop((f[0], f[1], w - f[2], h - f[3])))}


_IMAGES: list[bytes] = []  # every image's bytes, inherited by the forked workers


def _similarities(pairs: np.ndarray) -> np.ndarray:
    """What the partition's verify tasks compute, the same way (neardup.similarities: each image prepared once
    for all its pairs in the batch), on image indices."""
    from dermray.core import neardup

    return neardup.similarities(pairs[:, 0], pairs[:, 1], lambda i: _IMAGES[i])


def parallel_similarity(images: list[bytes], pairs: np.ndarray, workers: int = 2) -> np.ndarray:
    """The similarity of each candidate pair (rows of image indices, sorted by the first as the partition has
    them), in batches of 256 as the partition's tasks take them, over ``workers`` processes."""
    _IMAGES[:] = images
    batches = [pairs[i:i + 256] for i in range(0, len(pairs), 256)]
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        parts = list(pool.map(_similarities, batches))
    return np.concatenate(parts) if parts else np.zeros(0)


def main() -> int:
    from dermray.core import neardup

    if not (HAM / "labels.csv").exists():
        print(f"HAM10000 not found at {HAM}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    labels = pd.read_csv(HAM / "labels.csv")
    if IMAGES:
        labels = labels.head(IMAGES)
    data = [(HAM / "images" / f"{i}.jpg").read_bytes() for i in labels["image_id"]]
    rng = np.random.default_rng(0)
    picked = rng.choice(len(data), PLANTED, replace=False)
    planted, kinds, origin = [], [], []
    for i in picked:
        for kind, copy in planted_copies(data[i], rng).items():
            planted.append(copy)
            kinds.append(kind)
            origin.append(int(i))
    every = data + planted
    n_ham = len(data)
    t0 = time.perf_counter()
    described = [neardup.describe(b) for b in every]
    t_describe = time.perf_counter() - t0
    hashes = np.array([h for _, h in described])
    sha = np.array([s for s, _ in described])
    t0 = time.perf_counter()
    from dermray.runtime.config import PartitionConfig

    pairs, skipped = neardup.candidates(hashes, PartitionConfig().near_duplicate_hamming)
    t_candidates = time.perf_counter() - t0
    t0 = time.perf_counter()
    sims = parallel_similarity(every, pairs[:, :2])
    t_verify = time.perf_counter() - t0
    lesion = np.r_[labels["lesion_id"].to_numpy(), np.array([f"planted-{k}" for k in range(len(planted))])]
    dx = np.r_[labels["dx"].to_numpy(), labels["dx"].to_numpy()[origin]]
    a, b, ham = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    both_ham = (a < n_ham) & (b < n_ham)
    cross = both_ham & (lesion[a] != lesion[b])
    _, counts = np.unique(sha[:n_ham], return_counts=True)
    exact_ham = int((counts > 1).sum())
    sweep = []
    for thr in SIMILARITY_SWEEP:
        ok = sims >= thr
        recall = {}
        for kind in sorted(set(kinds)):
            idx = [n_ham + k for k, kk in enumerate(kinds) if kk == kind]
            found = 0
            for k in idx:
                o = origin[k - n_ham]
                hit = ((a == o) & (b == k)) | ((a == k) & (b == o))
                found += bool((hit & ok).any())
            recall[kind] = found / len(idx)
        sweep.append({"similarity": thr, "cross_lesion_pairs": int((ok & cross).sum()),
                      "cross_lesion_other_diagnosis": int((ok & cross & (dx[a] != dx[b])).sum()),
                      "same_lesion_pairs": int((ok & both_ham & ~cross).sum()), "recall": recall})
    from dermray.runtime.config import PartitionConfig

    default = PartitionConfig()
    chosen = next(s for s in sweep if s["similarity"] == default.near_duplicate_similarity)
    # Hamming alone (what the issue measured): the pairs a pHash threshold of 8 would merge across lesions.
    pairs_h8 = int(((ham <= 8) & cross).sum())
    per_image_ms = 1000 * t_describe / len(every)
    verify_ms = 1000 * t_verify * 2 / max(len(pairs), 1)  # per pair on one core
    density = len(pairs) / (len(every) ** 2 / 2)
    projection = {"images": 5_000_000, "describe_core_hours": round(5e6 * per_image_ms / 3.6e6, 2),
                  "candidate_pairs_if_density_holds": int(density * 5e6 ** 2 / 2),
                  "verify_core_hours_if_density_holds": round(density * 5e6 ** 2 / 2 * verify_ms / 3.6e6, 1)}
    results = {"images": len(every), "ham_images": n_ham, "planted": len(planted),
               "describe_ms_per_image": round(per_image_ms, 3), "candidates_s": round(t_candidates, 2),
               "candidate_pairs": int(len(pairs)), "skipped_buckets": skipped,
               "verify_ms_per_pair": round(verify_ms, 3), "exact_duplicate_sets_ham": exact_ham,
               "cross_lesion_pairs_phash_le8": pairs_h8, "sweep": sweep, "projection_5m": projection,
               "chosen": {"hamming": default.near_duplicate_hamming,
                          "similarity": default.near_duplicate_similarity}}
    print(f"near duplicates: {len(every):,} images ({n_ham:,} HAM10000 + {len(planted)} planted copies)")
    print(f"  describe {per_image_ms:.2f} ms/image, {len(pairs):,} LSH candidate pairs in {t_candidates:.2f} s, "
          f"verify {verify_ms:.2f} ms/pair/core")
    print(f"  a pHash threshold of 8 alone would pair {pairs_h8:,} images of different HAM10000 lesions")
    print(f"  {'similarity':>10} {'cross-lesion':>13} {'other dx':>9} {'same lesion':>12}  recall per planted kind")
    for s in sweep:
        rec = ", ".join(f"{k} {v:.2f}" for k, v in s["recall"].items())
        print(f"  {s['similarity']:>10} {s['cross_lesion_pairs']:>13} {s['cross_lesion_other_diagnosis']:>9} "
              f"{s['same_lesion_pairs']:>12}  {rec}")
    print(f"  5M images: describe {projection['describe_core_hours']} core-hours; verification "
          f"{projection['verify_core_hours_if_density_holds']} core-hours if the candidate density holds")
    figures = {"near_duplicate_pairs": chosen["cross_lesion_pairs"],
               "false_merges_other_diagnosis": chosen["cross_lesion_other_diagnosis"],
               "recall_min": min(chosen["recall"].values()), "recall": chosen["recall"],
               "candidate_pairs": int(len(pairs)), "describe_ms_per_image": round(per_image_ms, 3),
               "verify_ms_per_pair": round(verify_ms, 3)}
    if SMOKE:
        print("  [SMOKE: 500 images, not a measurement]")
    write_results("near_duplicates", results | figures, started=started)
    last_line(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
