"""Importers: public dataset metadata + an image folder/prefix -> manifest.parquet, taxonomy.parquet, tasks.yaml.

- ``ham10000``: the HAM10000 metadata CSV (``image_id, lesion_id, dx, dx_type, ...``). ``dx`` codes map onto nodes
  of the ISIC taxonomy shipped in the package (``data/ham10000_dx_map.csv``); ``dx_type == histo`` becomes
  ``label_source = biopsy``; ``lesion_id`` becomes ``group_id``; all images are dermoscopy.
- ``isic``: an ISIC Archive metadata CSV (``isic_id, diagnosis_1..5, diagnosis_confirm_type, lesion_id,
  patient_id, image_type``). The label is the deepest diagnosis level given; ``histopathology`` becomes biopsy.

Image URIs are built from the metadata (``<images>/<image_id>.jpg``), not by listing millions of objects; a local
folder is checked with one listing and rows without an image file are quarantined with a reason.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from importlib import resources

import pandas as pd
import pyarrow as pa

from dermray import schemas, storage
from dermray.errors import UserError
from dermray.taxonomy import Taxonomy

STAGE = "import"


def packaged_file(name: str) -> str:
    return str(resources.files("dermray") / "data" / name)


def isic_taxonomy() -> Taxonomy:
    return Taxonomy.from_table(pd.read_csv(packaged_file("isic_diagnosis_nodes.csv")), "isic_diagnosis_nodes.csv")


def ham10000_dx_map() -> dict[str, str]:
    df = pd.read_csv(packaged_file("ham10000_dx_map.csv"))
    return dict(zip(df["dx"], df["node_id"]))


def _read_csv(uri: str) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise UserError(f"cannot read {storage.redact(uri)} as CSV: {e}") from e


def _require(df: pd.DataFrame, cols: list[str], source: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")


def _image_uri(images: str, name: str) -> str:
    return storage.join(images, name)


@dataclass
class ImportResult:
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    taxonomy: Taxonomy
    tasks_yaml: str


def _present_files(images: str) -> set[str] | None:
    """Base names of files in a local image folder (one listing); None for object storage (not listed)."""
    if storage.is_s3(images):
        return None
    path = storage.local_path(images)
    if not os.path.isdir(path):
        raise UserError(f"image folder {images} does not exist")
    return set(os.listdir(path))


def _finish(rows: pd.DataFrame, reasons: pd.Series, images: str, source: str, tax: Taxonomy, tasks_yaml: str
            ) -> ImportResult:
    present = _present_files(images)
    if present is not None:
        names = rows["uri"].map(lambda u: os.path.basename(u))
        missing = ~names.isin(present) & reasons.isna()
        reasons = reasons.mask(missing, "image file not found in " + images)
    bad = reasons.notna()
    quarantine = pd.DataFrame({
        "stage": STAGE,
        "image_id": rows.loc[bad, "image_id"],
        "row": rows.index[bad].astype("int64"),
        "uri": rows.loc[bad, "uri"],
        "reason": reasons[bad],
    })
    manifest = rows.loc[~bad].reset_index(drop=True)
    dup = manifest["image_id"].duplicated(keep="first")
    if dup.any():
        raise UserError(f"{source}: duplicate image_id(s) {', '.join(manifest.loc[dup, 'image_id'].head(5))}")
    return ImportResult(manifest, quarantine, tax, tasks_yaml)


def import_ham10000(metadata: str, images: str) -> ImportResult:
    source = storage.redact(metadata)
    df = _read_csv(metadata)
    _require(df, ["image_id", "lesion_id", "dx", "dx_type"], source)
    tax = isic_taxonomy()
    dx_map = ham10000_dx_map()
    images = images if storage.is_s3(images) else os.path.abspath(storage.local_path(images))
    rows = pd.DataFrame({
        "image_id": df["image_id"].str.strip(),
        "uri": [_image_uri(images, f"{i}.jpg") for i in df["image_id"].str.strip()],
        "label": df["dx"].str.strip().str.lower().map(dx_map),
        "group_id": df["lesion_id"],
        "label_source": (df["dx_type"].str.strip().str.lower() == "histo").map({True: "biopsy", False: "clinical"}),
        "modality": "dermoscopy",
        "source": "HAM10000",  # where an image comes from: the model card's data sources and licences
    })
    for extra in ("dx", "dx_type", "age", "sex", "localization"):
        if extra in df.columns:
            rows[extra] = df[extra]
    reasons = pd.Series([None] * len(df), index=df.index, dtype=object)
    reasons = reasons.mask(df["image_id"].isna() | (df["image_id"].str.strip() == ""), "image_id is empty")
    reasons = reasons.mask(reasons.isna() & rows["label"].isna(),
                           "dx " + df["dx"].fillna("<empty>").astype(str) + " is not a HAM10000 code ("
                           + ", ".join(dx_map) + ")")
    tasks_yaml = open(packaged_file("ham10000_tasks.yaml"), encoding="utf-8").read()
    return _finish(rows, reasons, images, source, tax, tasks_yaml)


ISIC_BIOPSY = {"histopathology"}


def import_isic(metadata: str, images: str, group: str = "lesion") -> ImportResult:
    source = storage.redact(metadata)
    df = _read_csv(metadata)
    id_col = "isic_id" if "isic_id" in df.columns else "image_id"
    _require(df, [id_col, "diagnosis_1"], source)
    tax = isic_taxonomy()
    levels = [c for c in (f"diagnosis_{k}" for k in range(1, 6)) if c in df.columns]
    paths = df[levels].apply(lambda r: ":".join(v.strip() for v in r if isinstance(v, str) and v.strip()), axis=1)
    known = paths.isin(set(tax.node_ids))
    ids = df[id_col].str.strip()
    images = images if storage.is_s3(images) else os.path.abspath(storage.local_path(images))
    group_cols = {"lesion": ["lesion_id", "patient_id"], "patient": ["patient_id", "lesion_id"]}.get(group)
    if group_cols is None:
        raise UserError(f"--group must be lesion or patient, got {group!r}")
    group_id = pd.Series([None] * len(df), index=df.index, dtype=object)
    for c in reversed(group_cols):
        if c in df.columns:
            group_id = df[c].where(df[c].notna() & (df[c].str.strip() != ""), group_id)
    confirm = df.get("diagnosis_confirm_type", pd.Series([None] * len(df), index=df.index))
    image_type = df.get("image_type", pd.Series([None] * len(df), index=df.index))
    rows = pd.DataFrame({
        "image_id": ids,
        "uri": [_image_uri(images, f"{i}.jpg") for i in ids],
        "label": paths.where(known),
        "group_id": group_id,
        "label_source": confirm.fillna("").str.strip().str.lower().isin(ISIC_BIOPSY).map(
            {True: "biopsy", False: "clinical"}),
        "modality": image_type.fillna("").str.lower().str.startswith("dermoscopic").map(
            {True: "dermoscopy", False: "clinical"}),
        "source": "ISIC Archive",
    })
    # fitzpatrick_skin_type: skin tone, the subgroup dermatology AI is judged on (evaluate.subgroups)
    for extra in ("diagnosis_confirm_type", "image_type", "age_approx", "sex", "anatom_site_general",
                  "fitzpatrick_skin_type"):
        if extra in df.columns:
            rows[extra] = df[extra]
    reasons = pd.Series([None] * len(df), index=df.index, dtype=object)
    reasons = reasons.mask(ids.isna() | (ids == ""), f"{id_col} is empty")
    reasons = reasons.mask(reasons.isna() & (paths == ""), "no diagnosis given")
    reasons = reasons.mask(reasons.isna() & ~known, "diagnosis " + paths.map(repr) + " is not in the ISIC taxonomy")
    tasks_yaml = open(packaged_file("ham10000_tasks.yaml"), encoding="utf-8").read()
    return _finish(rows, reasons, images, source, tax, tasks_yaml)


def write_import(result: ImportResult, output: str) -> dict:
    """Write manifest.parquet, taxonomy.parquet, tasks.yaml and quarantine.parquet under ``output``."""
    manifest = pa.Table.from_pandas(result.manifest, preserve_index=False)
    present = schemas.check_columns(manifest.schema, schemas.MANIFEST, "import")
    arrow = schemas.MANIFEST.arrow(present)
    extras = [f for f in manifest.schema if f.name not in arrow.names]
    manifest = manifest.cast(pa.schema(list(arrow) + [pa.field(f.name, pa.string()) for f in extras]))
    paths = {name: storage.join(output, f"{name}.parquet") for name in ("manifest", "taxonomy", "quarantine")}
    paths["tasks"] = storage.join(output, "tasks.yaml")
    # Row groups of 256k rows let the partition stage read a big manifest in parallel.
    buf = io.BytesIO()
    import pyarrow.parquet as pq

    pq.write_table(manifest, buf, row_group_size=256_000, compression="zstd")
    storage.write_bytes(paths["manifest"], buf.getvalue())
    storage.write_table(result.taxonomy.to_table(), paths["taxonomy"])
    storage.write_text(paths["tasks"], result.tasks_yaml)
    q = pa.Table.from_pandas(result.quarantine, preserve_index=False, schema=schemas.QUARANTINE.arrow())
    storage.write_table(q, paths["quarantine"])
    return {"rows_in": len(result.manifest) + len(result.quarantine), "manifest_rows": len(result.manifest),
            "quarantined": len(result.quarantine), "outputs": paths}
