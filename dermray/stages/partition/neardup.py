"""Near-duplicate images (``dermray/core/neardup.py``), found before the folds are cut: perceptual hashes per
chunk, candidate pairs verified by aligned pixel correlation, the pairs joined into one group."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa

from dermray.errors import UserError
from dermray.runtime import progress
from dermray.stages.partition.chunks import group_keys, validate_chunk
from dermray.stages.partition.inputs import Inputs
from dermray.stages.partition.passes import read_chunk
from dermray.store import schemas, storage


def describe_chunk(uri, row_groups, offset, columns, node_ids, max_pixels):
    """Ray task: the valid rows of a chunk with their image's sha256 and perceptual hashes (unreadable images are
    left out: training quarantines them)."""
    from dermray.core import neardup
    from dermray.core.transforms import ImageDecodeError

    table = read_chunk(uri, row_groups, columns)
    _, label_idx = validate_chunk(table, node_ids)
    ok = np.flatnonzero(label_idx >= 0)
    base = storage.parent(uri)
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    uris = table.column("uri").to_numpy(zero_copy_only=False)
    groups = group_keys(table).to_numpy(zero_copy_only=False)
    rows, shas, hashes, unreadable = [], [], [], 0
    for i in ok:
        try:
            sha, h = neardup.describe(storage.read_bytes(storage.resolve(uris[i], base)), max_pixels)
        except (UserError, ImageDecodeError):
            unreadable += 1
            continue
        rows.append(i)
        shas.append(sha)
        hashes.append(h)
    rows = np.array(rows, np.int64)
    return {"image_id": ids[rows], "uri": np.array([storage.resolve(u, base) for u in uris[rows]], dtype=object),
            "group": groups[rows], "sha": np.array(shas, dtype=object),
            "hashes": np.array(hashes, np.uint64).reshape(-1, neardup.N_HASHES), "unreadable": unreadable}


def verify_pairs(uris_a, uris_b, max_pixels):
    """Ray task: the aligned pixel similarity of each candidate pair (NaN where an image cannot be read)."""
    from dermray.core import neardup

    return neardup.similarities(uris_a, uris_b, storage.read_bytes, max_pixels)


def gather(ray, refs: list, what: str, size) -> list:
    """``ray.get(refs)`` in their order; a silence on the console says how far it is (``size(result)``: the units
    of one result; ``what``: "images described"; issue 29: 52 s without a line)."""
    results: list = [None] * len(refs)
    where = {ref: i for i, ref in enumerate(refs)}
    pending, done = list(refs), [0]

    def how_far() -> list:
        return [f"partition: near-duplicate search: {done[0]:,} {what}, {len(pending)} of {len(refs)} tasks left"]

    with progress.working(how_far):
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[where[ref]] = ray.get(ref)
                done[0] += size(results[where[ref]])
    return results


def near_duplicates(ray, inp: Inputs, chunks, node_ids_ref, pcfg) -> tuple[pa.Table, pa.Table, dict, pa.Table]:
    """(remap: image_id -> merged group, the accepted pairs, counts, every image's hashes): images whose bytes are
    equal, or whose perceptual hashes are close and whose pixels align (neardup.similarity >=
    partition.near_duplicate_similarity), join one group, so that the folds never split them."""
    from dermray.core import neardup

    t0 = time.perf_counter()
    max_pixels = 50_000_000
    described = gather(ray, [ray.remote(describe_chunk).remote(inp.manifest, rg, off, inp.columns, node_ids_ref,
                                                               max_pixels) for rg, off, _ in chunks],
                       "images described", lambda d: len(d["image_id"]))
    cat = {k: np.concatenate([d[k] for d in described]) for k in ("image_id", "uri", "group", "sha")}
    hashes = (np.concatenate([d["hashes"] for d in described]) if described else
              np.zeros((0, neardup.N_HASHES), np.uint64))
    meter_n = len(hashes)
    cand, skipped = neardup.candidates(hashes, pcfg.near_duplicate_hamming)
    # Exact copies: the same bytes.
    order = np.argsort(cat["sha"], kind="stable")
    same = np.flatnonzero(cat["sha"][order][1:] == cat["sha"][order][:-1])
    exact = np.stack([order[same], order[same + 1]], axis=1) if len(same) else np.zeros((0, 2), np.int64)
    exact = np.sort(exact, axis=1)
    batches = [cand[i:i + 256] for i in range(0, len(cand), 256)]
    sims = np.concatenate(gather(ray, [ray.remote(verify_pairs).remote(cat["uri"][b[:, 0]], cat["uri"][b[:, 1]],
                                                                       max_pixels) for b in batches],
                                 "candidate pairs compared", len)) if batches else np.zeros(0)
    keep = sims >= pcfg.near_duplicate_similarity
    pairs = {(int(a), int(b)): (int(d), float(s), False) for (a, b, d), s in zip(cand[keep], sims[keep])}
    for a, b in exact:
        pairs[(int(a), int(b))] = (0, 1.0, True)
    ordered = sorted(pairs)
    merged_groups, merged = neardup.merge_groups(cat["group"], ordered, pcfg.near_duplicate_max_groups)
    changed = merged_groups != cat["group"]
    remap = pa.table({"image_id": pa.array(cat["image_id"][changed].tolist(), pa.string()),
                      "group": pa.array(merged_groups[changed].tolist(), pa.string())})
    rows = [{"image_a": cat["image_id"][a], "image_b": cat["image_id"][b], "group_a": str(cat["group"][a]),
             "group_b": str(cat["group"][b]), "hamming": pairs[(a, b)][0], "similarity": pairs[(a, b)][1],
             "exact": pairs[(a, b)][2], "crossed_groups": bool(cat["group"][a] != cat["group"][b]), "merged": m}
            for (a, b), m in zip(ordered, merged)]
    table = pa.Table.from_pylist(rows, schema=schemas.NEAR_DUPLICATES.arrow())
    components = pd.Series(merged_groups).groupby(merged_groups).size() if len(merged_groups) else pd.Series([])
    counts = {"described": meter_n, "unreadable": int(sum(d["unreadable"] for d in described)),
              "candidates": int(len(cand)), "skipped_buckets": skipped, "pairs": len(rows),
              "exact": int(len(exact)), "crossed_groups": int(sum(r["crossed_groups"] for r in rows)),
              "images_regrouped": int(changed.sum()), "refused_merges": int(sum(not m for m in merged)),
              "largest_component_images": int(components.max()) if len(components) else 0,
              "seconds": round(time.perf_counter() - t0, 2)}
    described_table = pa.table({
        "image_id": pa.array(cat["image_id"].tolist(), pa.string()), "uri": pa.array(cat["uri"].tolist(), pa.string()),
        "sha256": pa.array(cat["sha"].tolist(), pa.string()),
        "phash": pa.array([h.tolist() for h in hashes], pa.list_(pa.uint64()))}, schema=schemas.IMAGE_HASHES.arrow())
    return remap, table, counts, described_table
