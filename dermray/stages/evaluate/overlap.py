"""Test images that are copies of training images (the partition's near-duplicate method and thresholds): found,
listed, and every metric computed again without them."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dermray.errors import UserError
from dermray.runtime import layout, progress
from dermray.runtime.config import EvaluateConfig
from dermray.stages.evaluate.inputs import EvalInputs
from dermray.store import storage


@dataclass(frozen=True)
class Overlap:
    """Test images found to be near-duplicates of training images, and the pairs that say so (train_overlap rows);
    ``not_checked`` says why nothing was looked for (None when it was)."""
    images: frozenset
    pairs: list
    unreadable: int = 0
    not_checked: str | None = None

    def summary(self) -> dict:
        return {"checked": self.not_checked is None, "test_images": len(self.images), "pairs": len(self.pairs),
                "unreadable_test_images": self.unreadable, "not_checked": self.not_checked}


def overlap_thresholds(partition: str) -> tuple[int, float]:
    """The Hamming bound and the pixel similarity the partition grouped near-duplicates with (its recorded
    config), so that the test set is checked the way the folds were."""
    from dermray.runtime.config import PartitionConfig

    defaults = PartitionConfig()
    hamming, similarity = defaults.near_duplicate_hamming, defaults.near_duplicate_similarity
    summary_uri = layout.partition_outputs(partition)["summary"]
    if storage.exists(summary_uri):
        recorded = json.loads(storage.read_text(summary_uri)).get("lineage", {}).get("config", {})
        hamming = int(recorded.get("near_duplicate_hamming", hamming))
        similarity = float(recorded.get("near_duplicate_similarity", similarity))
    return hamming, similarity


def train_overlap(df: pd.DataFrame, inp: EvalInputs, ecfg: EvaluateConfig) -> Overlap:
    """The test images (``df``'s ``uri``) that are copies of the partition's training images: equal bytes, or a
    view hash within the partition's Hamming bound of the other's whole-image hash, confirmed by aligned pixel
    correlation at its similarity (neardup: the method the folds were grouped with)."""

    if not ecfg.train_overlap:
        return Overlap(frozenset(), [], not_checked="evaluate.train_overlap is off")
    if inp.train_hashes is None or inp.train_hashes.empty:
        return Overlap(frozenset(), [], not_checked=(
            f"{storage.redact(inp.partition)} holds no image hashes (a partition run with near_duplicates off, or "
            "by an older dermray)"))
    if "uri" not in df.columns or df["uri"].isna().all():
        return Overlap(frozenset(), [], not_checked="the predictions have no uri column to read the test images by")
    # A silence on the console says how far it is (issue 29: 45 s of "evaluate: running" in the demo).
    where = [f"describing {len(df):,} test images"]
    with progress.working(lambda: [f"evaluate: looking for copies of training images: {where[0]}"]):
        return _find(df, inp, inp.train_hashes, where)


def _find(df: pd.DataFrame, inp: EvalInputs, train: pd.DataFrame, where: list[str]) -> Overlap:
    """train_overlap's search, saying in ``where[0]`` how far it is."""
    from concurrent.futures import ThreadPoolExecutor

    from dermray.core import neardup
    from dermray.core.transforms import ImageDecodeError

    hamming, similarity = overlap_thresholds(inp.partition)

    def describe(uri):
        if not isinstance(uri, str) or not uri:
            return None
        try:
            return neardup.describe(storage.read_bytes(uri))
        except (UserError, ImageDecodeError):
            return None

    ids, uris = df["image_id"].to_numpy(), df["uri"].to_numpy()
    with ThreadPoolExecutor(8) as pool:  # reads (S3 or disk) and decodes overlap; PIL releases the GIL
        described = list(pool.map(describe, uris))
    ok = np.array([d is not None for d in described], bool)
    test_sha = np.array([d[0] for d in described if d is not None], dtype=object)
    test_hashes = (np.stack([d[1] for d in described if d is not None]) if ok.any() else
                   np.zeros((0, neardup.N_HASHES), np.uint64))
    test_ids, test_uris = ids[ok], uris[ok]
    # Seven views per image (neardup.HASH_BOXES), or three from a partition made before the corner views.
    views = len(train["phash"].iloc[0]) if len(train) else neardup.N_HASHES
    train_hashes = np.array(train["phash"].tolist(), dtype=np.uint64).reshape(-1, views)
    pairs: dict[tuple[int, int], tuple[int, float, bool]] = {}
    by_sha = pd.Series(np.arange(len(train)), index=train["sha256"].to_numpy())
    for j, sha in enumerate(test_sha):
        if sha in by_sha.index:
            pairs[(int(np.atleast_1d(by_sha[sha])[0]), j)] = (0, 1.0, True)
    cand = [(int(i), int(j), int(d)) for i, j, d in neardup.cross_candidates(train_hashes, test_hashes, hamming)
            if (int(i), int(j)) not in pairs]
    # NaN (an image gone since the partition) is below the threshold: not a pair
    def compared(n: int) -> None:
        where[0] = f"{n:,} of {len(cand):,} candidate pairs compared"

    # One call: each image read and prepared once for all its pairs.
    sims = neardup.similarities(train["uri"].to_numpy()[[i for i, _, _ in cand]], test_uris[[j for _, j, _ in cand]],
                                storage.read_bytes, compared=compared)
    for (i, j, d), sim in zip(cand, sims):
        if sim >= similarity:
            pairs[(i, j)] = (d, float(sim), False)
    rows = [{"test_image": str(test_ids[j]), "train_image": str(train["image_id"].iloc[i]), "hamming": h,
             "similarity": sim, "exact": exact}
            for (i, j), (h, sim, exact) in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return Overlap(frozenset(r["test_image"] for r in rows), rows, int((~ok).sum()))
