"""Near-duplicate images: the same picture under two ids (re-encoded, resized, slightly cropped), which public
skin-lesion collections are known to hold and which leak between folds when their ids are in different lesions.
Pure logic (numpy, scipy, PIL on bytes): the partition stage runs it in Ray tasks.

Steps:
1. ``describe``: per image, the sha256 of its bytes (exact copies) and a 64-bit DCT perceptual hash of seven views
   (HASH_BOXES) - the whole image, its central 92 % and 85 %, and 95 % windows in its four corners - so that a copy
   cropped by a few percent per side, centred or not, matches one of the original's views (issue 28, finding 7:
   with the centred views alone 4 % of copies cropped off-centre by 0-5 % per side were no candidates).
2. ``candidates``: pairs whose view hash and whole-image hash lie within ``max_hamming`` bits, found by LSH banding
   (``BANDS`` bands of ``BAND_BITS`` bit positions drawn once; a pair is a candidate when it agrees exactly on a
   band), never by comparing all pairs. Buckets larger than ``MAX_BUCKET`` (uniform images all hashing alike) are
   skipped and counted.
3. ``similarity``: the candidate pairs verified on the pixels: normalised cross-correlation of 32x32 grey views,
   the whole of one image against the other's views at scales 1, 0.92 and 0.85 and shifts of 4 % (both ways),
   the best alignment kept; a pair that comes within FINE_GATE (0.85) is then aligned finely, each side of the window
   cropped on its own (0-7 %: a 2 % grid searched at 16x16, then, within GRID_GATE, 1 % around its best at 32x32),
   so that an off-centre crop or a crop of a few pixels that was also resized and re-encoded is found (issue 28,
   finding 7). A 64-bit pHash alone pairs
   thousands of different HAM10000 lesions (dermoscopy images look alike at 8x8 frequencies); the aligned
   correlation separates them (see benchmarks/near_duplicates.py).
4. ``merge_groups``: accepted pairs and exact copies join their groups (union-find), refusing a merge that would
   make a component larger than ``max_groups`` groups (chaining through look-alikes), and reporting it.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

BANDS, BAND_BITS = 24, 16
MAX_BUCKET = 200
VIEW_SCALES = (1.0, 0.92, 0.85)
_BAND_BITS = np.random.default_rng(0x5EEDD0).random((BANDS, 64)).argsort(axis=1)[:, :BAND_BITS]


def _grey(data: bytes, max_pixels: int):
    from dermray.core.transforms import decode_image

    return decode_image(data, max_pixels).convert("L")


def _phash(grey, box=None) -> np.uint64:
    from PIL import Image
    from scipy.fft import dctn

    a = np.asarray(grey.resize((32, 32), Image.Resampling.BOX, box=box), np.float32)
    d = dctn(a, norm="ortho")[:8, :8].ravel()[1:]  # the lowest frequencies but the mean (DC)
    bits = np.r_[d > np.median(d), False]
    return np.packbits(bits).view(">u8")[0].astype(np.uint64)


# The hashed views (left, top, right, bottom as fractions): the whole image first (the one every view is compared
# with), the central 92 % and 85 % (VIEW_SCALES), then 95 % windows in the four corners. A table of hashes with the
# first three alone (a partition from before the corners) is compared on those (``cross_candidates``).
HASH_BOXES = ((0.0, 0.0, 1.0, 1.0), (0.04, 0.04, 0.96, 0.96), (0.075, 0.075, 0.925, 0.925),
              (0.0, 0.0, 0.95, 0.95), (0.05, 0.0, 1.0, 0.95), (0.0, 0.05, 0.95, 1.0), (0.05, 0.05, 1.0, 1.0))
N_HASHES = len(HASH_BOXES)


def describe(data: bytes, max_pixels: int = 50_000_000) -> tuple[str, np.ndarray]:
    """(sha256 hex of the bytes, uint64 [N_HASHES] perceptual hashes of the views HASH_BOXES)."""
    grey = _grey(data, max_pixels)
    w, h = grey.size
    hashes = [_phash(grey, (box[0] * w, box[1] * h, box[2] * w, box[3] * h)) for box in HASH_BOXES]
    return hashlib.sha256(data).hexdigest(), np.array(hashes, dtype=np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


def _band_keys(h: np.ndarray, band: int) -> np.ndarray:
    bits = (h[:, None] >> _BAND_BITS[band].astype(np.uint64)[None, :]) & np.uint64(1)
    return (bits << np.arange(BAND_BITS, dtype=np.uint64)[None, :]).sum(axis=1)


def candidates(hashes: np.ndarray, max_hamming: int) -> tuple[np.ndarray, int]:
    """(int64 [m, 3] candidate pairs (i < j, Hamming distance of the closest view to the other's whole image), the
    number of oversized buckets skipped) for ``hashes`` uint64 [n, 3] (whole image first). Vectorised: per band
    and view, the entries are sorted by band key, and every (view of a, whole of b) pair sharing a key in a bucket
    of at most MAX_BUCKET entries is a candidate."""
    n = len(hashes)
    whole = hashes[:, 0]
    found_a, found_b, found_d, skipped = [], [], [], 0
    for band in range(BANDS):
        kw = _band_keys(whole, band)
        for v in range(hashes.shape[1]):
            kv = _band_keys(hashes[:, v], band)
            keys = np.r_[kw, kv]
            idx = np.r_[np.arange(n), np.arange(n)]
            side = np.r_[np.zeros(n, np.int64), np.ones(n, np.int64)]
            order = np.lexsort((side, keys))
            keys, idx, side = keys[order], idx[order], side[order]
            start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            size = np.diff(np.r_[start, len(keys)])
            bucket = np.repeat(np.arange(len(start)), size)
            n_whole = np.bincount(bucket, weights=(side == 0), minlength=len(start)).astype(np.int64)
            big = size > MAX_BUCKET
            skipped += int(big.sum())
            # Each view entry pairs with every whole-image entry of its bucket (they come first: sorted by side).
            views = np.flatnonzero((side == 1) & ~big[bucket] & (n_whole[bucket] > 0))
            reps = n_whole[bucket[views]]
            a = np.repeat(idx[views], reps)
            first = np.repeat(start[bucket[views]], reps)
            offset = np.arange(len(a)) - np.repeat(np.cumsum(reps) - reps, reps)
            b = idx[first + offset]
            d = popcount(hashes[a, v] ^ whole[b])
            keep = (a != b) & (d <= max_hamming)
            found_a.append(np.minimum(a, b)[keep])
            found_b.append(np.maximum(a, b)[keep])
            found_d.append(d[keep])
    a, b, d = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (found_a, found_b, found_d))
    if len(a) == 0:
        return np.zeros((0, 3), np.int64), skipped
    order = np.lexsort((d, b, a))
    a, b, d = a[order], b[order], d[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]  # the closest distance of each pair
    return np.stack([a[first], b[first], d[first]], axis=1), skipped


def cross_candidates(hashes_a: np.ndarray, hashes_b: np.ndarray, max_hamming: int) -> np.ndarray:
    """int64 [m, 3] candidate pairs (index into a, index into b, Hamming distance) between two sets of hashes
    (uint64 [n, 3] each), found as ``candidates`` finds them in one set: pairs within a set are left out."""
    views = min(hashes_a.shape[1], hashes_b.shape[1])  # an older table: its views alone
    pairs, _ = candidates(np.concatenate([hashes_a[:, :views], hashes_b[:, :views]]), max_hamming)
    n = len(hashes_a)
    cross = pairs[(pairs[:, 0] < n) & (pairs[:, 1] >= n)]
    return np.stack([cross[:, 0], cross[:, 1] - n, cross[:, 2]], axis=1) if len(cross) else np.zeros((0, 3), np.int64)


N_VIEW = 32
_SHIFT = 0.04


def _views(grey) -> np.ndarray:
    """Normalised 32x32 grey views [k, 1024]: the whole image, then crops at 0.92 and 0.85 of its size, centred
    and shifted by 4 % in each direction."""
    from PIL import Image

    w, h = grey.size
    out = []
    for s in VIEW_SCALES:
        offsets = [(0.0, 0.0)] if s == 1.0 else [(dx, dy) for dx in (-_SHIFT, 0, _SHIFT) for dy in (-_SHIFT, 0, _SHIFT)]
        for dx, dy in offsets:
            cx, cy = w / 2 + dx * w, h / 2 + dy * h
            box = (cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2)
            if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
                continue
            a = np.asarray(grey.resize((N_VIEW, N_VIEW), Image.Resampling.BOX, box=box), np.float32).ravel()
            out.append((a - a.mean()) / (a.std() + 1e-6))
    return np.array(out)


def similarity(a: bytes, b: bytes, max_pixels: int = 50_000_000) -> float:
    """The best normalised cross-correlation (-1..1) of one image's whole view against the other's views, both
    ways: 1 for a copy, a re-encoding or a resize; about 1 for a crop of a few percent per side. A pair that
    comes close on the coarse views (FINE_GATE) is aligned finely (``_fine``): each side of a window cropped
    on its own, so that an off-centre crop, or a crop of a few pixels then resized and re-encoded, is found."""
    return _similarity(_Prepared(_grey(a, max_pixels)), _Prepared(_grey(b, max_pixels)))


# The coarse similarity from which a pair is aligned finely (a HAM10000 copy cropped 0 / 4 % left / right and
# 3 / 1 % top / bottom scored 0.897 there, 0.996 aligned)
FINE_GATE = 0.85
FINE_SIDES = (0.0, 0.02, 0.04, 0.06)  # the crops per side searched first (fractions of the side) ...
FINE_STEP = 0.01  # ... then around the best, each side this much either way
N_SMALL = 96  # the long side of the grey image the fine alignment reads
# The grid of crops (FINE_SIDES on each side: 256 windows) is searched at 16x16, each image's windows made once and
# kept for all its pairs; a pair is refined at 32x32 around the grid's best window only where that comes within
# GRID_GATE. On HAM10000 with the benchmark's 1,500 planted copies (benchmarks/near_duplicates.py) every copy's
# 16x16 grid score was >= 0.989, and 5.7 % of a sample of 4,000 of HAM10000's own candidate pairs reached 0.95:
# most look-alikes stop at the grid, and no pair's verdict at 0.985 changed (issue 29: 3x less verify time).
N_GRID = 16
GRID_GATE = 0.95


def _small(grey) -> np.ndarray:
    from PIL import Image

    w, h = grey.size
    scale = N_SMALL / max(w, h)
    size = (max(N_VIEW, round(w * scale)), max(N_VIEW, round(h * scale)))
    return np.asarray(grey.resize(size, Image.Resampling.BOX), np.float32)


def _area(n_src: int, lo: np.ndarray, hi: np.ndarray, n_out: int = N_VIEW) -> np.ndarray:
    """float32 [k, n_out, n_src]: a box resize of each window [lo, hi) (fractions of the side) to n_out cells,
    as a matrix (source cells weighted by their overlap with each output cell)."""
    edges = (lo[:, None] + (hi - lo)[:, None] * np.arange(n_out + 1)[None, :] / n_out) * n_src
    cells = np.arange(n_src + 1, dtype=np.float64)
    a, b = edges[:, :-1, None], edges[:, 1:, None]
    overlap = np.clip(np.minimum(b, cells[None, None, 1:]) - np.maximum(a, cells[None, None, :-1]), 0, None)
    return (overlap / (b - a)).astype(np.float32)


def _windows(g: np.ndarray, left, right, top, bottom, n_out: int) -> np.ndarray:
    """float32 [len(top), len(left), n_out * n_out]: the normalised views of ``g`` cropped by each pairing of a
    (left, right) crop with a (top, bottom) crop (fractions of the side), resized to n_out x n_out."""
    ax = _area(g.shape[1], np.asarray(left), 1 - np.asarray(right), n_out)  # [kx, n_out, W]
    ay = _area(g.shape[0], np.asarray(top), 1 - np.asarray(bottom), n_out)  # [ky, n_out, H]
    t = np.matmul(g[None], ax.transpose(0, 2, 1))  # [kx, H, n_out]
    v = np.matmul(ay[:, None], t[None]).reshape(len(ay), len(ax), -1)  # [ky, kx, n_out * n_out]
    v = v - v.mean(axis=2, keepdims=True)
    v /= v.std(axis=2, keepdims=True) + 1e-6
    return v


def _sides_grid() -> tuple[np.ndarray, np.ndarray]:
    """(left, right) crops of every pairing of FINE_SIDES, float [16] each; the same for (top, bottom)."""
    lo, hi = np.meshgrid(np.array(FINE_SIDES), np.array(FINE_SIDES), indexing="ij")
    return lo.ravel(), hi.ravel()


def _refine(g: np.ndarray, whole: np.ndarray, crops: tuple) -> float:
    """The best correlation of ``whole`` (a normalised 32x32 view) against the windows of ``g`` whose sides lie
    within FINE_STEP of ``crops`` (left, right, top, bottom): 3 values per side, 81 windows."""
    step = np.array([-FINE_STEP, 0.0, FINE_STEP])
    left, right, top, bottom = (np.clip(c + step, 0.0, 0.1) for c in crops)
    lx, rx = np.meshgrid(left, right, indexing="ij")
    ly, ry = np.meshgrid(top, bottom, indexing="ij")
    v = _windows(g, lx.ravel(), rx.ravel(), ly.ravel(), ry.ravel(), N_VIEW)
    return float((v @ whole).max() / (N_VIEW * N_VIEW))


def similarities(uris_a, uris_b, read, max_pixels: int = 50_000_000, compared=None) -> np.ndarray:
    """float [n]: ``similarity`` of each pair of images (``read``: uri -> bytes); NaN where one cannot be read or
    decoded (a NaN is below every threshold). Each image is read and prepared once for all its pairs here
    (candidates come sorted by their first image: most of a batch's pairs share one)."""
    from dermray.core.transforms import ImageDecodeError
    from dermray.errors import UserError

    prepared: dict = {}

    def get(uri):
        if uri not in prepared:
            try:
                prepared[uri] = _Prepared(_grey(read(uri), max_pixels))
            except (UserError, ImageDecodeError):
                prepared[uri] = None
        return prepared[uri]

    out = []
    for a, b in zip(uris_a, uris_b):
        pa_, pb = get(a), get(b)
        out.append(float("nan") if pa_ is None or pb is None else _similarity(pa_, pb))
        if compared is not None and len(out) % 256 == 0:
            compared(len(out))  # how far it is, for a caller that says so (every 256 pairs)
    return np.array(out, dtype=float)


class _Prepared:
    """One image as ``similarity`` reads it: its coarse views, and (made when first needed) its small grey array
    and the 16x16 views of its grid of crops."""

    def __init__(self, grey):
        self.grey, self.views = grey, _views(grey)
        self._small: np.ndarray | None = None
        self._grid: np.ndarray | None = None

    @property
    def small(self) -> np.ndarray:
        if self._small is None:
            self._small = _small(self.grey)
        return self._small

    @property
    def grid(self) -> np.ndarray:
        """float32 [256, N_GRID * N_GRID]: the normalised views of the crops FINE_SIDES x FINE_SIDES per axis (rows:
        top-bottom pairing major, left-right minor); row 0 is the whole image."""
        if self._grid is None:
            x_lo, x_hi = _sides_grid()
            self._grid = _windows(self.small, x_lo, x_hi, x_lo, x_hi, N_GRID).reshape(len(x_lo) ** 2, -1)
        return self._grid


def _fine(g: "_Prepared", whole: "_Prepared") -> float:
    """The best correlation of ``whole``'s whole image against windows of ``g`` cropped on each side by up to
    ~7 %: the grid FINE_SIDES at 16x16, then, where it comes within GRID_GATE, FINE_STEP around its best at 32x32
    (each side around its own best: 81 windows, not every pairing of the sides' values)."""
    scores = g.grid @ whole.grid[0] / (N_GRID * N_GRID)
    best = int(np.argmax(scores))
    if scores[best] < GRID_GATE:
        return float(scores[best])
    x_lo, x_hi = _sides_grid()
    iy, ix = divmod(best, len(x_lo))
    return _refine(g.small, whole.views[0], (x_lo[ix], x_hi[ix], x_lo[iy], x_hi[iy]))


def _similarity(a: "_Prepared", b: "_Prepared") -> float:
    coarse = float(max((b.views @ a.views[0]).max(), (a.views @ b.views[0]).max()) / (N_VIEW * N_VIEW))
    if coarse < FINE_GATE:
        return coarse
    return max(coarse, _fine(b, a), _fine(a, b))


def merge_groups(groups: np.ndarray, pairs: list[tuple[int, int]], max_groups: int) -> tuple[np.ndarray, list[bool]]:
    """(the merged group label of each image, whether each pair was merged) for images with ``groups`` labels and
    accepted ``pairs`` of image indices, by union-find over groups; a union that would make a component of more
    than ``max_groups`` groups is refused (False)."""
    labels, inverse = np.unique(groups, return_inverse=True)
    parent = np.arange(len(labels))
    size = np.ones(len(labels), np.int64)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    merged = []
    for a, b in pairs:
        ra, rb = find(inverse[a]), find(inverse[b])
        if ra == rb:
            merged.append(True)
            continue
        if size[ra] + size[rb] > max_groups:
            merged.append(False)
            continue
        if size[ra] < size[rb]:
            ra, rb = rb, ra
        parent[rb] = ra
        size[ra] += size[rb]
        merged.append(True)
    roots = np.array([find(i) for i in range(len(labels))])
    # A merged component is named by its smallest group label, so that the result does not depend on pair order.
    names: dict[Any, Any] = {}  # union-find root -> the smallest group label in its component
    for i, r in enumerate(roots):
        names[r] = min(names.get(r, labels[i]), labels[i])
    return np.array([names[roots[k]] for k in inverse], dtype=object), merged
