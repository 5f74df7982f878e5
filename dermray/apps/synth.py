"""Demo data: a self-contained synthetic dermatology dataset, deterministic for a seed, so that the whole pipeline
runs on a fresh machine with no downloads.

- **Taxonomy** shaped like the paper's: root -> benign / malignant / non-neoplastic -> the paper's nine second-level
  classes -> a few dozen leaf diseases, with very uneven image counts (so disease partitioning has work to do).
- **Images**: procedurally drawn lesions whose look depends on the diagnosis through the dermoscopic ABCD cues -
  Asymmetry, Border irregularity, Colour variegation, Diameter - plus skin tone, noise, hair-like strokes and
  rotation. Melanomas are large, asymmetric, ragged and many-coloured; nevi small, round, even and brown;
  carcinomas pink and pearly with a central ulcer; seborrheic keratoses waxy with a cracked surface; inflammatory
  conditions diffuse red patches. Each leaf draws its cues from its class's ranges, so classes overlap: learnable,
  not trivially.
- **Lesions** with 1-3 images each (the same lesion, re-photographed), clinical and dermoscopic modalities, biopsy
  labels for every malignant and some benign lesions, dermatologist labels for the rest.
- **A held-out test split** of biopsy-proven lesions and a **reader study**: two dozen simulated dermatologists'
  decisions on the test images for the binary tasks (each reader with their own sensitivity and specificity).

Pure logic (numpy, PIL) plus file writing at the edge (``write``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

from dermray.core.formatting import strict_json
from dermray.store import storage

# (top-level class, second-level class, cue profile, leaf diseases)
NINE_CLASSES = [
    ("malignant", "malignant melanoma", "melanoma",
     ["superficial spreading melanoma", "nodular melanoma", "lentigo maligna", "acral lentiginous melanoma"]),
    ("malignant", "malignant epidermal tumors", "carcinoma",
     ["basal cell carcinoma", "squamous cell carcinoma", "bowen disease", "actinic keratosis"]),
    ("malignant", "malignant dermal tumors", "dermal_malignant",
     ["dermatofibrosarcoma", "kaposi sarcoma", "merkel cell carcinoma"]),
    ("benign", "benign melanocytic lesions", "nevus",
     ["junctional nevus", "compound nevus", "dermal nevus", "blue nevus", "congenital nevus", "halo nevus"]),
    ("benign", "benign epidermal tumors", "keratosis",
     ["seborrheic keratosis", "lichen planus-like keratosis", "solar lentigo", "epidermal cyst"]),
    ("benign", "benign dermal tumors", "dermal_benign",
     ["dermatofibroma", "hemangioma", "pyogenic granuloma", "lipoma"]),
    ("non-neoplastic", "inflammatory conditions", "inflammatory",
     ["psoriasis", "eczema", "rosacea", "lichen planus"]),
    ("non-neoplastic", "genodermatoses", "genodermatosis",
     ["neurofibromatosis", "ichthyosis", "tuberous sclerosis"]),
    ("non-neoplastic", "cutaneous lymphoma", "lymphoma",
     ["mycosis fungoides", "lymphomatoid papulosis"]),
]

# Cue ranges per profile: radius (share of the image), asymmetry, border raggedness, colours (RGB centres) and
# their number, surface texture, ulcer.
PROFILES: dict[str, dict[str, Any]] = {
    "melanoma": dict(radius=(0.22, 0.36), asym=(0.25, 0.55), ragged=(0.12, 0.3), colours=[(60, 35, 25),
                     (110, 60, 40), (25, 20, 30), (140, 90, 95), (70, 70, 110)], n_colours=(2, 4), texture=0.3),
    "nevus": dict(radius=(0.12, 0.24), asym=(0.0, 0.2), ragged=(0.0, 0.08), colours=[(120, 75, 50), (95, 60, 40)],
                  n_colours=(1, 2), texture=0.1),
    "carcinoma": dict(radius=(0.15, 0.3), asym=(0.1, 0.35), ragged=(0.04, 0.14), colours=[(205, 130, 135),
                      (225, 170, 165), (180, 95, 100)], n_colours=(1, 2), texture=0.2, ulcer=True),
    "keratosis": dict(radius=(0.15, 0.3), asym=(0.05, 0.3), ragged=(0.03, 0.12), colours=[(150, 110, 70),
                      (120, 90, 60), (170, 140, 100)], n_colours=(1, 3), texture=0.8),
    "dermal_malignant": dict(radius=(0.18, 0.3), asym=(0.15, 0.4), ragged=(0.05, 0.18), colours=[(130, 60, 90),
                             (95, 45, 70)], n_colours=(1, 3), texture=0.3),
    "dermal_benign": dict(radius=(0.1, 0.22), asym=(0.0, 0.2), ragged=(0.0, 0.06), colours=[(170, 80, 80),
                          (150, 100, 90)], n_colours=(1, 2), texture=0.15),
    "inflammatory": dict(radius=(0.3, 0.45), asym=(0.2, 0.5), ragged=(0.1, 0.25), colours=[(215, 120, 110),
                         (200, 100, 100)], n_colours=(1, 2), texture=0.5, diffuse=True),
    "genodermatosis": dict(radius=(0.08, 0.16), asym=(0.0, 0.2), ragged=(0.0, 0.08), colours=[(175, 125, 95),
                           (160, 110, 85)], n_colours=(1, 1), texture=0.3, multiple=True),
    "lymphoma": dict(radius=(0.25, 0.4), asym=(0.2, 0.45), ragged=(0.08, 0.2), colours=[(200, 110, 120),
                     (180, 90, 110)], n_colours=(1, 2), texture=0.4, diffuse=True),
}


# Lesions that look like their neighbour: an atypical nevus drawn with melanoma's cues, an amelanotic or
# nevus-like melanoma, ... (the share is SynthSpec.atypical). It is what keeps the tasks from being trivial.
LOOKALIKE = {"melanoma": "nevus", "nevus": "melanoma", "carcinoma": "keratosis", "keratosis": "carcinoma",
             "dermal_malignant": "dermal_benign", "dermal_benign": "dermal_malignant", "inflammatory": "lymphoma",
             "lymphoma": "inflammatory", "genodermatosis": "dermal_benign"}


@dataclass(frozen=True)
class SynthSpec:
    n_lesions: int = 1200  # training/validation lesions
    n_test_lesions: int = 300  # held-out lesions (biopsy-proven images form the test split)
    size: int = 96  # pixels, square
    readers: int = 24
    atypical: float = 0.2  # share of lesions drawn with a look-alike class's cues
    seed: int = 0


def taxonomy_table() -> pd.DataFrame:
    rows = [{"node_id": "root", "parent_id": None, "name": "skin disease"}]
    for top in ("benign", "malignant", "non-neoplastic"):
        rows.append({"node_id": top, "parent_id": "root", "name": top})
    for top, second, _, leaves in NINE_CLASSES:
        sid = f"{top}:{second}"
        rows.append({"node_id": sid, "parent_id": top, "name": second})
        for leaf in leaves:
            rows.append({"node_id": f"{sid}:{leaf}", "parent_id": sid, "name": leaf})
    return pd.DataFrame(rows)


def leaves() -> list[tuple[str, str]]:
    """(leaf node_id, cue profile) in a fixed order."""
    return [(f"{top}:{second}:{leaf}", profile) for top, second, profile, ls in NINE_CLASSES for leaf in ls]


def leaf_weights(rng: np.random.Generator) -> np.ndarray:
    """Very uneven prevalence (Zipf-like), with nevi and keratoses common and melanoma frequent enough to test."""
    names = leaves()
    base = np.array([1.0 / (1 + i) ** 0.9 for i in range(len(names))])
    rng.shuffle(base)
    boost = {"nevus": 4.0, "melanoma": 2.5, "keratosis": 2.0, "carcinoma": 2.0}
    w = base * np.array([boost.get(p, 1.0) for _, p in names])
    return w / w.sum()


def tasks_yaml() -> str:
    spec = {"tasks": {
        "melanoma_vs_nevus": {"positive": "melanoma", "classes": {
            "melanoma": ["malignant:malignant melanoma"], "nevus": ["benign:benign melanocytic lesions"]}},
        "carcinoma_vs_benign_keratosis": {"positive": "carcinoma", "classes": {
            "carcinoma": ["malignant:malignant epidermal tumors"],
            "benign_keratosis": ["benign:benign epidermal tumors"]}},
        "three_class": {"classes": {"benign": ["benign"], "malignant": ["malignant"],
                                    "non_neoplastic": ["non-neoplastic"]}},
        "nine_class": {"classes": {second.replace(" ", "_"): [f"{top}:{second}"]
                                   for top, second, _, _ in NINE_CLASSES}},
    }}
    import yaml

    return yaml.safe_dump(spec, sort_keys=False)


def _blob(rng, size: int, radius: float, asym: float, ragged: float, centre=None) -> list[tuple[float, float]]:
    """A closed lesion outline: an ellipse stretched by ``asym`` with low-frequency (shape) and high-frequency
    (border) noise."""
    n = 180
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (1, 2, 3):  # asymmetry: low harmonics
        r += asym * rng.uniform(-0.5, 0.5) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    for k in range(5, 17):  # border irregularity: high harmonics
        r += ragged * rng.uniform(-0.4, 0.4) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.35, 1.8) * radius * size
    cx, cy = centre or (size / 2 + rng.normal(0, size * 0.04), size / 2 + rng.normal(0, size * 0.04))
    stretch = 1 + asym * rng.uniform(0, 0.6)
    return [(cx + ri * np.cos(ti) * stretch, cy + ri * np.sin(ti)) for ri, ti in zip(r, t)]


def draw_lesion(profile: str, rng: np.random.Generator, size: int, modality: str, cue_jitter: dict | None = None
                ) -> Image.Image:
    """One image of a lesion with the given cue profile."""
    p = PROFILES[profile]
    cues = cue_jitter or {k: rng.uniform(*p[k]) for k in ("radius", "asym", "ragged")}
    skin = np.array([rng.uniform(190, 235), rng.uniform(150, 195), rng.uniform(120, 170)])
    img = np.ones((size, size, 3)) * skin
    img += rng.normal(0, 6, (size, size, 1)) + rng.normal(0, 3, (size, size, 3))
    base = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    colours = p["colours"]
    n_col = int(rng.integers(p["n_colours"][0], p["n_colours"][1] + 1))
    palette = [colours[i] for i in rng.choice(len(colours), size=min(n_col, len(colours)), replace=False)]
    spots = int(rng.integers(3, 7)) if p.get("multiple") else 1
    for _ in range(spots):
        centre = None if spots == 1 else (rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size)
        outline = _blob(rng, size, cues["radius"], cues["asym"], cues["ragged"], centre)
        c = palette[0]
        draw.polygon(outline, fill=(*[int(v + rng.normal(0, 8)) for v in c], 235 if not p.get("diffuse") else 150))
        # Colour variegation: further colours in irregular sub-blobs.
        for extra in palette[1:]:
            sub = _blob(rng, size, cues["radius"] * rng.uniform(0.3, 0.6), cues["asym"] + 0.2, cues["ragged"] + 0.1,
                        (np.mean([q[0] for q in outline]) + rng.normal(0, size * 0.06),
                         np.mean([q[1] for q in outline]) + rng.normal(0, size * 0.06)))
            draw.polygon(sub, fill=(*extra, 210))
    if p.get("ulcer"):
        cx, cy = size / 2 + rng.normal(0, 2), size / 2 + rng.normal(0, 2)
        rr = cues["radius"] * size * rng.uniform(0.2, 0.35)
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=(150, 60, 55, 220))
    blur = 1.8 if p.get("diffuse") else 0.6
    layer = layer.filter(ImageFilter.GaussianBlur(blur))
    out = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    arr = np.asarray(out).astype(np.float32)
    if p["texture"] > 0:  # surface: speckle whose strength is the profile's texture
        arr += rng.normal(0, 14 * p["texture"], arr.shape[:2])[..., None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(0, 6))):  # hair-like strokes
        x0, y0 = rng.uniform(0, size, 2)
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(0.3, 0.9) * size
        x1, y1 = x0 + length * np.cos(ang), y0 + length * np.sin(ang)
        draw.line([(x0, y0), ((x0 + x1) / 2 + rng.normal(0, 3), (y0 + y1) / 2 + rng.normal(0, 3)), (x1, y1)],
                  fill=(40, 30, 25), width=1)
    out = out.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR,
                     fillcolor=tuple(int(v) for v in skin))
    if modality == "dermoscopy":  # zoomed in, with the dark circular field of a dermatoscope
        crop = int(size * 0.12)
        out = out.crop((crop, crop, size - crop, size - crop)).resize((size, size), Image.Resampling.BILINEAR)
        yy, xx = np.mgrid[:size, :size]
        dark = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) > (size * 0.48) ** 2
        arr = np.asarray(out).copy()
        arr[dark] = (arr[dark] * 0.15).astype(np.uint8)
        out = Image.fromarray(arr)
    else:
        arr = np.asarray(out).astype(np.float32) * rng.uniform(0.85, 1.1)  # lighting
        out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return out


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(spec: SynthSpec):
    """Yield (manifest row, JPEG bytes) for every image; the test split is marked ``split=test``."""
    rng = np.random.default_rng(spec.seed)
    names = leaves()
    weights = leaf_weights(rng)
    malignant = {n for n, _ in names if n.startswith("malignant")}
    total = spec.n_lesions + spec.n_test_lesions
    leaf_of = rng.choice(len(names), size=total, p=weights)
    for lesion in range(total):
        node, profile = names[leaf_of[lesion]]
        split = "test" if lesion >= spec.n_lesions else "train"
        lrng = np.random.default_rng([spec.seed, lesion])
        look = LOOKALIKE[profile] if lrng.random() < spec.atypical else profile
        p = PROFILES[look]
        cues = {k: lrng.uniform(*p[k]) for k in ("radius", "asym", "ragged")}
        modality = "dermoscopy" if lrng.random() < 0.5 else "clinical"
        # Every malignant lesion is biopsied; some benign ones are (a test split needs biopsy-proven negatives).
        biopsy = node in malignant or lrng.random() < (0.8 if split == "test" else 0.3)
        n_images = int(lrng.choice([1, 1, 2, 3]))
        for k in range(n_images):
            irng = np.random.default_rng([spec.seed, lesion, k])
            jitter = {c: v * irng.uniform(0.92, 1.08) for c, v in cues.items()}
            img = draw_lesion(look, irng, spec.size, modality, jitter)
            image_id = f"SYN_{lesion:06d}_{k}"
            yield ({"image_id": image_id, "uri": f"images/{image_id}.jpg", "label": node,
                    "group_id": f"LES_{lesion:06d}", "label_source": "biopsy" if biopsy else "clinical",
                    "modality": modality, "split": split, "profile": profile, "source": "dermray synth"},
                   _jpeg(img))


def reader_study(test: pd.DataFrame, n_readers: int, seed: int) -> pd.DataFrame:
    """Simulated dermatologists: for each binary task, each reader calls every biopsy-proven test image of the
    task's classes positive or not, with their own sensitivity (0.65-0.95) and specificity (0.55-0.9)."""
    rng = np.random.default_rng([seed, 7])
    tasks = {"melanoma_vs_nevus": ("malignant:malignant melanoma", "benign:benign melanocytic lesions"),
             "carcinoma_vs_benign_keratosis": ("malignant:malignant epidermal tumors",
                                               "benign:benign epidermal tumors")}
    rows = []
    for r in range(n_readers):
        for task, (pos, neg) in tasks.items():
            sens, spec = rng.uniform(0.65, 0.95), rng.uniform(0.55, 0.9)
            for row in test.itertuples():
                if row.label_source != "biopsy":
                    continue
                if row.label.startswith(pos):
                    decision = int(rng.random() < sens)
                elif row.label.startswith(neg):
                    decision = int(rng.random() > spec)
                else:
                    continue
                rows.append({"reader_id": f"dermatologist_{r + 1:02d}", "image_id": row.image_id, "task": task,
                             "decision": decision})
    return pd.DataFrame(rows)


def write(output: str, spec: SynthSpec) -> dict:
    """Write images/, manifest.parquet (training/validation), test_manifest.parquet (held-out lesions),
    taxonomy.parquet, tasks.yaml, readers.parquet and synth.json under ``output`` (local or s3://)."""
    rows = []
    for row, data in generate(spec):
        storage.write_bytes(storage.join(output, row["uri"]), data)
        rows.append(row)
    df = pd.DataFrame(rows)
    train, test = df[df.split == "train"].drop(columns="split"), df[df.split == "test"].drop(columns="split")
    storage.write_table(pa.Table.from_pandas(train, preserve_index=False), storage.join(output, "manifest.parquet"))
    storage.write_table(pa.Table.from_pandas(test, preserve_index=False), storage.join(output, "test_manifest.parquet"))
    storage.write_table(pa.Table.from_pandas(taxonomy_table(), preserve_index=False),
                        storage.join(output, "taxonomy.parquet"))
    storage.write_text(storage.join(output, "tasks.yaml"), tasks_yaml())
    readers = reader_study(test, spec.readers, spec.seed)
    storage.write_table(pa.Table.from_pandas(readers, preserve_index=False), storage.join(output, "readers.parquet"))
    summary = {"images": len(df), "train_images": len(train), "test_images": len(test),
               "test_biopsy_images": int((test.label_source == "biopsy").sum()), "lesions": int(df.group_id.nunique()),
               "leaves": int(df.label.nunique()), "readers": spec.readers, "reader_decisions": len(readers),
               "spec": spec.__dict__, "output": output}
    storage.write_text(storage.join(output, "synth.json"), strict_json(summary))
    return summary
