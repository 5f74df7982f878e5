"""Importers: dataset metadata + an image folder/prefix -> manifest.parquet, taxonomy.parquet, tasks.yaml.

- ``ham10000``: the HAM10000 metadata CSV (``image_id, lesion_id, dx, dx_type, ...``). ``dx`` codes map onto nodes
  of the ISIC taxonomy shipped in the package (``data/ham10000_dx_map.csv``); ``dx_type == histo`` becomes
  ``label_source = biopsy``; ``lesion_id`` becomes ``group_id``; all images are dermoscopy.
- ``isic``: an ISIC Archive metadata CSV (``isic_id, diagnosis_1..5, diagnosis_confirm_type, lesion_id,
  patient_id, image_type``). The label is the deepest diagnosis level given; ``histopathology`` becomes biopsy.
- ``folder``: what a hospital hands over: a folder or prefix of images, a labels CSV in the hospital's own label
  names and a mapping file from those names onto taxonomy nodes (``import_folder``).

Images are found with one listing of the folder or prefix (subfolders included; ~1,000 keys per S3 LIST request):
an image is any file with an ``archive.IMAGE_SUFFIXES`` extension (any case), its image_id the file name without
the extension. Rows without an image file, files sharing an image_id and labels that do not map are quarantined
with a reason; nothing is dropped silently (rows in = manifest rows + quarantined).

Why one module over 400 lines: one importer per source (HAM10000, ISIC, a hospital folder) over shared
readers of labels and mappings; each rule sits beside its quarantine reason.
"""
from __future__ import annotations

import io
import os
import posixpath
import re
from dataclasses import dataclass, field
from importlib import resources

import pandas as pd
import pyarrow as pa
import yaml

from dermray.core.evaluation_tasks import parse_tasks
from dermray.core.taxonomy import Taxonomy
from dermray.errors import UserError
from dermray.store import schemas, storage
from dermray.store.archive import IMAGE_SUFFIXES

STAGE = "import"


def packaged_file(name: str) -> str:
    return str(resources.files("dermray") / "data" / name)


def packaged_text(name: str) -> str:
    with open(packaged_file(name), encoding="utf-8") as f:
        return f.read()


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


def _name(uri: str) -> str:
    """A file's name for messages (no folder, no credentials)."""
    return posixpath.basename(storage.redact(str(uri)).rstrip("/")) or storage.redact(str(uri))


@dataclass
class ImportResult:
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    taxonomy: Taxonomy
    tasks_yaml: str
    notes: dict = field(default_factory=dict)  # importer-specific counts, added to write_import's summary


def _quarantine(image_id, row, uri, reason) -> pd.DataFrame:
    """Quarantine rows (schemas.QUARANTINE) from aligned sequences; ``row`` / ``uri`` may be None for all rows."""
    n = len(reason)

    def col(v):
        return pd.Series([v] * n if v is None else list(v), dtype=object)

    return pd.DataFrame({"stage": pd.Series([STAGE] * n, dtype=object), "image_id": col(image_id),
                         "row": pd.array(col(row).where(col(row).notna(), None), dtype="Int64"),
                         "uri": col(uri), "reason": col(reason)})


# ---- finding the image files -------------------------------------------------------------------------------------
def _image_root(images: str) -> str:
    return str(images).rstrip("/") if storage.is_s3(images) else os.path.abspath(storage.local_path(images))


def _list_images(images: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The image files under a folder or S3 prefix, subfolders included, from one listing: ``(files, extra)``.

    ``files``: ``image_id`` (file name without extension), ``uri`` (absolute), ``name`` (path below ``images``),
    one row per image_id (the first file in sorted order), sorted by uri; ``extra``: the other files whose image_id
    is taken, with ``first`` (the name of the file that has it). Hidden files and folders (names starting with '.')
    are skipped. Raises UserError when the folder does not exist or holds no image file."""
    root = _image_root(images)
    if not storage.is_s3(images) and not os.path.isdir(root):
        raise UserError(f"image folder {images} does not exist")
    uris = pd.Series(list(storage.list_files(root, IMAGE_SUFFIXES)), dtype=object)
    name = uris.str.slice(len(root) + 1)
    name = name.where(uris.str.startswith(root + "/"), uris)
    visible = ~name.str.contains(r"(?:^|/)\.", regex=True)
    uris, name = uris[visible].reset_index(drop=True), name[visible].reset_index(drop=True)
    if uris.empty:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {storage.redact(images)}")
    stem = name.str.rsplit("/", n=1).str[-1].str.replace(r"\.[^.]*$", "", regex=True)
    listed = pd.DataFrame({"image_id": stem, "uri": uris, "name": name})
    later = listed["image_id"].duplicated(keep="first")
    files = listed[~later].reset_index(drop=True)
    extra = listed[later].reset_index(drop=True)
    extra["first"] = extra["image_id"].map(files.set_index("image_id")["name"])
    return files, extra


def _locate(ids: pd.Series, images: str) -> tuple[pd.Series, pd.Series]:
    """Each id's image file (any IMAGE_SUFFIXES extension, anywhere under ``images``): ``(uri, reason)``, aligned
    with ``ids``; uri None and a reason when there is no file, or more than one (which one the row describes is
    not known)."""
    files, extra = _list_images(images)
    uri = ids.map(files.set_index("image_id")["uri"]).astype(object)
    uri = uri.where(uri.notna(), None)
    reason = pd.Series(None, index=ids.index, dtype=object)
    reason = reason.mask(uri.isna(), f"image file not found in {storage.redact(images)}")
    if len(extra):
        both = pd.concat([files.loc[files["image_id"].isin(extra["image_id"]), ["image_id", "name"]],
                          extra[["image_id", "name"]]])
        names = both.groupby("image_id")["name"].agg(", ".join)
        several = ids.map(names)
        reason = reason.mask(several.notna(), "more than one image file for this id: " + several.fillna(""))
        uri = uri.mask(several.notna(), None)
    return uri, reason


def _finish(rows: pd.DataFrame, reasons: pd.Series, images: str, source: str, tax: Taxonomy, tasks_yaml: str
            ) -> ImportResult:
    """Metadata rows -> manifest + quarantine: each row's image file found (``_locate``), rows with a reason (given,
    or no/several image files) quarantined."""
    uri, missing = _locate(rows["image_id"], images)
    rows.insert(1, "uri", uri)
    reasons = reasons.where(reasons.notna(), missing)
    bad = reasons.notna()
    quarantine = _quarantine(rows.loc[bad, "image_id"], rows.index[bad], rows.loc[bad, "uri"], reasons[bad])
    manifest = rows.loc[~bad].reset_index(drop=True)
    dup = manifest["image_id"].duplicated(keep="first")
    if dup.any():
        raise UserError(f"{source}: duplicate image_id(s) {', '.join(manifest.loc[dup, 'image_id'].head(5))}")
    return ImportResult(manifest, quarantine, tax, tasks_yaml)


# ---- public datasets ---------------------------------------------------------------------------------------------
def import_ham10000(metadata: str, images: str) -> ImportResult:
    source = storage.redact(metadata)
    df = _read_csv(metadata)
    _require(df, ["image_id", "lesion_id", "dx", "dx_type"], source)
    tax = isic_taxonomy()
    dx_map = ham10000_dx_map()
    rows = pd.DataFrame({
        "image_id": df["image_id"].str.strip(),
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
    tasks_yaml = packaged_text("ham10000_tasks.yaml")
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
    tasks_yaml = packaged_text("ham10000_tasks.yaml")
    return _finish(rows, reasons, images, source, tax, tasks_yaml)


# ---- a hospital's folder: images + labels CSV in its own label names + a mapping onto the taxonomy ----------------
# The labels columns looked for (case-insensitive, first present wins) when the command does not name them.
ID_COLUMNS = ("image_id", "isic_id", "filename", "file_name", "file", "image")
LABEL_COLUMNS = ("label", "diagnosis", "dx")
GROUP_COLUMNS = ("group_id", "lesion_id", "patient_id")
LABEL_SOURCE_COLUMNS = ("label_source", "diagnosis_confirm_type", "dx_type")
MODALITY_COLUMNS = ("modality", "image_type")
MANIFEST_NAMES = frozenset({"image_id", "uri", "label", "group_id", "label_source", "modality", "source"})
BIOPSY = r"^(?:biops|histo|patholog)"  # biopsy, histopathology, histo (HAM10000's dx_type), pathology
DERMOSCOPY = r"^derm(?:at)?oscop"  # dermoscopy, dermoscopic, dermatoscopic
CLINICAL = r"^(?:clinic|macro|photo|tbp|overview|close)"  # clinical, "clinical: close-up", macroscopic, TBP tiles
IMAGE_EXTENSION = "(?:" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")$"


def label_key(labels: pd.Series) -> pd.Series:
    """Labels as compared with the mapping: trimmed, inner whitespace collapsed, case-folded (NaN stays NaN)."""
    return labels.astype(object).str.strip().str.replace(r"\s+", " ", regex=True).str.casefold()


def _column(df: pd.DataFrame, wanted: str | None, candidates: tuple[str, ...], what: str, source: str,
            flag: str | None = None) -> str | None:
    """The column holding ``what``: ``wanted`` when named (UserError when absent), else the first of
    ``candidates`` present (case-insensitive); None when none is and ``flag`` is None (the column is optional)."""
    lower = {c.lower(): c for c in df.columns}
    if wanted is not None:
        if wanted in df.columns or wanted.lower() in lower:
            return wanted if wanted in df.columns else lower[wanted.lower()]
        raise UserError(f"{source}: no column {wanted!r} for the {what} (has: {', '.join(df.columns)})")
    found = next((lower[c] for c in candidates if c in lower), None)
    if found is None and flag is not None:
        raise UserError(f"{source}: no {what} column (looked for {', '.join(candidates)}; has: "
                        f"{', '.join(df.columns)}); name it with {flag}")
    return found


def _mapping_pairs(uri: str, name: str) -> pd.DataFrame:
    """(label, node) rows as written in a mapping CSV or YAML file."""
    if str(uri).lower().endswith((".yaml", ".yml")):
        try:
            spec = yaml.safe_load(storage.read_text(uri))
        except yaml.YAMLError as e:
            raise UserError(f"{name}: not valid YAML: {str(e).splitlines()[0]}") from e
        if isinstance(spec, dict) and set(spec) == {"mapping"}:
            spec = spec["mapping"]
        if not isinstance(spec, dict) or not spec:
            raise UserError(f"{name}: expected a mapping of hospital label -> taxonomy node")
        bad = [k for k, v in spec.items() if not (v is None or isinstance(v, str))]
        if bad:
            raise UserError(f"{name}: label {bad[0]!r} must map to one taxonomy node (node_id or name), "
                            f"got {spec[bad[0]]!r}")
        return pd.DataFrame({"label": [str(k) for k in spec], "node": list(spec.values())}, dtype=object)
    df = _read_csv(uri)
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    lcol = _column(df, None, ("label", "source_label", "hospital_label"), "label", name)
    ncol = _column(df, None, ("node", "node_id"), "node", name)
    if lcol is None or ncol is None:
        raise UserError(f"{name}: a label mapping needs columns label and node (has: {', '.join(df.columns)})")
    return pd.DataFrame({"label": df[lcol], "node": df[ncol]}, dtype=object)


def read_mapping(uri: str, tax: Taxonomy, tax_name: str = "taxonomy") -> pd.DataFrame:
    """A label mapping file -> one row per hospital label: ``key`` (``label_key``), ``label`` (as written),
    ``node`` (a taxonomy node_id, or None) and ``problem`` (None when the label maps; else why its images are
    quarantined: the node is not in the taxonomy, is a name several nodes share, or is empty = label excluded).

    CSV: columns ``label`` and ``node`` (or ``node_id``); YAML: ``label: node`` pairs, at the top level or under
    ``mapping:``. A node is a node_id or a node name that is unique in the taxonomy. The same label twice with
    different nodes is a UserError."""
    name = _name(uri)
    pairs = _mapping_pairs(uri, name)
    pairs["label"] = pairs["label"].str.strip()
    pairs["node"] = pairs["node"].str.strip()
    pairs = pairs[pairs["label"].notna() & (pairs["label"] != "")].copy()
    pairs["node"] = pairs["node"].where(pairs["node"].notna() & (pairs["node"] != ""), None)
    pairs["key"] = label_key(pairs["label"])
    nodes_per_key = pairs.groupby("key")["node"].nunique(dropna=False)
    if (nodes_per_key > 1).any():
        twice = pairs[pairs["key"] == nodes_per_key[nodes_per_key > 1].index[0]]
        raise UserError(f"{name}: label {twice['label'].iloc[0]!r} is mapped to different nodes: "
                        f"{', '.join(repr(n) for n in twice['node'].drop_duplicates())}")
    pairs = pairs.drop_duplicates("key").reset_index(drop=True)
    by_name: dict[str, list[str]] = {}
    for nid, n in zip(tax.node_ids, tax.names):
        by_name.setdefault(n, []).append(nid)
    node: list[str | None] = []
    problem: list[str | None] = []
    for label, ref in zip(pairs["label"], pairs["node"]):  # one per mapping row: a few hundred at most
        hits = [ref] if ref in tax.index else by_name.get(ref, [])
        node.append(hits[0] if len(hits) == 1 else None)
        if ref is None:
            problem.append(f"label {label!r} is excluded by {name} (mapped to no node)")
        elif not hits:
            problem.append(f"label {label!r} is mapped to {ref!r} in {name}, which is not a node of the taxonomy "
                           f"{tax_name}")
        elif len(hits) > 1:
            problem.append(f"label {label!r} is mapped to {ref!r} in {name}, a name {len(hits)} nodes of the "
                           f"taxonomy share (use a node_id: {', '.join(hits[:3])})")
        else:
            problem.append(None)
    return pairs.assign(node=pd.Series(node, dtype=object), problem=pd.Series(problem, dtype=object))[
        ["key", "label", "node", "problem"]]


def _definitions(taxonomy: str | None, tasks: str | None) -> tuple[Taxonomy, str, str]:
    """(taxonomy, its name for messages, tasks YAML text checked against it); the packaged ISIC taxonomy and
    HAM10000 tasks by default."""
    from dermray.store.definitions import load_taxonomy

    tax, tax_name = (load_taxonomy(taxonomy), _name(taxonomy)) if taxonomy else (
        isic_taxonomy(), "isic_diagnosis_nodes.csv")
    text = storage.read_text(tasks) if tasks else packaged_text("ham10000_tasks.yaml")
    try:
        parse_tasks(text, tax, storage.redact(tasks) if tasks else "ham10000_tasks.yaml")
    except UserError as e:
        if tasks:
            raise
        raise UserError(f"the packaged HAM10000 tasks do not fit the taxonomy {tax_name}; give --tasks "
                        f"({str(e).splitlines()[0]})") from e
    return tax, tax_name, text


def _read_labels(uri: str, id_column: str | None, label_column: str | None, group_column: str | None
                 ) -> tuple[pd.DataFrame, dict]:
    """The labels CSV, every value as text and column names trimmed, and which column holds what: ``id``,
    ``label`` (required), ``group``, ``label_source``, ``modality`` (None when absent)."""
    name = _name(uri)
    df = _read_csv(uri)
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    if df.columns.duplicated().any():
        raise UserError(f"{name}: duplicate column name(s) {', '.join(df.columns[df.columns.duplicated()])}")
    cols = {"id": _column(df, id_column, ID_COLUMNS, "image id", name, "--id-column"),
            "label": _column(df, label_column, LABEL_COLUMNS, "label", name, "--label-column"),
            "group": _column(df, group_column, GROUP_COLUMNS, "group", name),
            "label_source": _column(df, None, LABEL_SOURCE_COLUMNS, "label source", name),
            "modality": _column(df, None, MODALITY_COLUMNS, "modality", name)}
    if cols["id"] == cols["label"]:
        raise UserError(f"{name}: column {cols['id']!r} cannot be both the image id and the label")
    return df, cols


def _image_ids(ids: pd.Series) -> pd.Series:
    """Labels' image ids as file stems: trimmed, any folder and image extension dropped (``a/ISIC_1.JPG`` ->
    ``ISIC_1``); None where empty."""
    s = ids.astype(object).str.strip().str.replace(r"^.*[/\\]", "", regex=True)
    s = s.str.replace(IMAGE_EXTENSION, "", regex=True, case=False)
    return s.where(s.notna() & (s != ""), None)


def _unused_rows(lab: pd.DataFrame, ids: pd.Series, have: pd.Series, id_col: str, labels_name: str,
                 images: str) -> pd.Series:
    """Why each labels row labels no image file (None for the rows that do): empty id, no such file, or a later
    row for an image an earlier row labels."""
    first_row = pd.Series(lab.index, index=lab.index).groupby(ids).transform("min")
    why = pd.Series(None, index=lab.index, dtype=object)
    why = why.mask(ids.isna(), f"{id_col} is empty")
    why = why.mask(why.isna() & ~have, f"image file not found in {storage.redact(images)}")
    later = ids.duplicated(keep="first") & ids.notna()
    return why.mask(why.isna() & later, f"another row of {labels_name} (row "
                    + first_row.astype("Int64").astype(str) + ") labels this image_id")


def _conflicts(lab: pd.DataFrame, ids: pd.Series, used: pd.Series, label_col: str, labels_name: str,
               maps: pd.DataFrame) -> pd.Series:
    """image_id -> reason, for images whose labels rows disagree on the label (two labels the mapping sends to one
    node agree)."""
    keys = label_key(lab[label_col]).fillna("")
    targets = keys.map(maps["node"]).fillna("label: " + keys)
    n = targets[used].groupby(ids[used]).nunique()
    bad = used & ids.isin(n.index[n > 1])
    if not bad.any():
        return pd.Series(dtype=object)
    rows = pd.DataFrame({"id": ids[bad], "row": lab.index[bad].astype(str), "label": lab.loc[bad, label_col]})
    by_id = rows.groupby("id")
    return ("rows " + by_id["row"].agg(", ".join) + f" of {labels_name} give different labels: "
            + by_id["label"].agg(lambda v: ", ".join(repr(x) for x in v.drop_duplicates())))


def _normalised(values: pd.Series | None, default: str | None, rules: dict[str, str], index: pd.Index
                ) -> tuple[pd.Series, pd.Series]:
    """A labels column normalised by ``rules`` (regex on the lower-cased value -> manifest value; the first that
    matches wins): (values, unrecognised mask). Empty values and an absent column give ``default``."""
    if values is None:
        return pd.Series([default] * len(index), index=index, dtype=object), pd.Series(False, index=index)
    low = values.fillna("").str.strip().str.lower()
    out = pd.Series(None, index=index, dtype=object)
    for pattern, value in rules.items():
        out = out.mask(out.isna() & low.str.contains(pattern, regex=True), value)
    empty = low == ""
    out = out.mask(empty, default)
    return out, out.isna() & ~empty


def import_folder(images: str, labels: str, mapping: str, *, taxonomy: str | None = None, tasks: str | None = None,
                  source: str | None = None, modality: str | None = None, label_source: str | None = None,
                  id_column: str | None = None, label_column: str | None = None, group_column: str | None = None
                  ) -> ImportResult:
    """A hospital's images (a folder or S3 prefix, subfolders included; image_id = file name without extension)
    labelled by a CSV in its own label names, mapped onto taxonomy nodes by ``mapping`` (``read_mapping``).

    ``taxonomy``: Parquet/CSV (default: the packaged ISIC taxonomy); ``tasks``: YAML (default: the packaged
    HAM10000 tasks, which need the ISIC taxonomy); ``source``: where the images come from (default: the folder's
    name); ``modality`` / ``label_source``: for rows whose labels give none. Labels columns are found by their
    usual names (``ID_COLUMNS``, ``LABEL_COLUMNS``, ...) unless named; the others are carried into the manifest
    (as ``<name>_raw`` when the name is a manifest column). Rows in = image files found + labels rows that label no
    image file = manifest rows + quarantined."""
    # long: one pass over the hospital's files and labels, each rule a few lines with its quarantine reason
    tax, tax_name, tasks_yaml = _definitions(taxonomy, tasks)
    maps = read_mapping(mapping, tax, tax_name).set_index("key")
    lab, cols = _read_labels(labels, id_column, label_column, group_column)
    labels_name, mapping_name = _name(labels), _name(mapping)
    files, extra = _list_images(images)

    ids = _image_ids(lab[cols["id"]])
    have = ids.isin(files["image_id"])
    unused = _unused_rows(lab, ids, have, cols["id"], labels_name, images)
    conflicts = _conflicts(lab, ids, have & ids.notna(), cols["label"], labels_name, maps)
    first = unused.isna()
    # The labels row of each image file, aligned with ``files``.
    m = lab.loc[first].set_axis(ids[first].to_numpy(), axis=0).reindex(files["image_id"]).reset_index(drop=True)
    row = pd.Series(lab.index[first], index=ids[first].to_numpy()).reindex(files["image_id"]).reset_index(drop=True)

    raw = m[cols["label"]].str.strip()
    key = label_key(raw)
    mod_in = m[cols["modality"]] if cols["modality"] else None
    mod, bad_mod = _normalised(mod_in, modality, {DERMOSCOPY: "dermoscopy", CLINICAL: "clinical"}, m.index)
    src, _ = _normalised(m[cols["label_source"]] if cols["label_source"] else None,
                         label_source or ("clinical" if cols["label_source"] else None),
                         {BIOPSY: "biopsy", r".": "clinical"}, m.index)

    why = pd.Series(None, index=m.index, dtype=object)
    why = why.mask(row.isna(), f"no row in {labels_name}")
    why = why.mask(why.isna() & (raw.isna() | (raw == "")), f"no label in column {cols['label']!r} of {labels_name}")
    why = why.mask(why.isna() & files["image_id"].isin(conflicts.index), files["image_id"].map(conflicts))
    unmapped = why.isna() & ~key.isin(maps.index)
    why = why.mask(unmapped, "label " + raw.map(repr) + f" is not in the mapping {mapping_name}")
    why = why.mask(why.isna(), key.map(maps["problem"]))
    if mod_in is not None:
        why = why.mask(why.isna() & bad_mod,
                       "modality " + mod_in.map(repr) + f" in {labels_name} is neither clinical nor dermoscopy")

    manifest = _folder_manifest(files, m, cols, {"label": key.map(maps["node"]), "label_source": src,
                                                 "modality": mod, "source": source or _name(images)})
    ok = why.isna()
    quarantine = pd.concat([
        _quarantine(files.loc[~ok, "image_id"], row[~ok], files.loc[~ok, "uri"], why[~ok]),
        _quarantine(extra["image_id"], None, extra["uri"], extra["name"] + " and " + extra["first"]
                    + " have the same image_id (file name without extension); " + extra["first"] + " is used"),
        _quarantine(ids[unused.notna()], lab.index[unused.notna()], None, unused[unused.notna()]),
    ], ignore_index=True)
    notes = {"images_found": len(files) + len(extra), "labels_rows": len(lab),
             "labels_rows_unused": int(unused.notna().sum()),
             "unmapped_labels": {str(k): int(v) for k, v in raw[unmapped].value_counts().items()}}
    return ImportResult(manifest[ok].reset_index(drop=True), quarantine, tax, tasks_yaml, notes)


def _folder_manifest(files: pd.DataFrame, m: pd.DataFrame, cols: dict, derived: dict) -> pd.DataFrame:
    """The manifest columns of every image file (``m``: its labels row; ``derived``: the label's taxonomy node,
    label_source, modality and source as mapped), then the labels' other columns."""
    group = m[cols["group"]].str.strip() if cols["group"] else pd.Series(None, index=m.index, dtype=object)
    manifest = pd.DataFrame({
        "image_id": files["image_id"], "uri": files["uri"], "label": derived["label"],
        "group_id": group.where(group.notna() & (group != ""), None), "label_source": derived["label_source"],
        "modality": derived["modality"], "source": derived["source"],  # source: the model card's data sources
    })
    for c in m.columns:
        if c != cols["id"] and not (c == cols["group"] == "group_id"):
            out = f"{c}_raw" if c in MANIFEST_NAMES else c
            if out not in manifest.columns:
                manifest[out] = m[c]
    return manifest


def write_import(result: ImportResult, output: str) -> dict:
    """Write manifest.parquet, taxonomy.parquet, tasks.yaml and quarantine.parquet under ``output``; the summary
    (rows in = manifest rows + quarantined, the commonest quarantine reasons, the importer's notes)."""
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
    reasons = result.quarantine["reason"].value_counts().head(20)
    return {"rows_in": len(result.manifest) + len(result.quarantine), "manifest_rows": len(result.manifest),
            "quarantined": len(result.quarantine),
            "quarantine_reasons": {str(k): int(v) for k, v in reasons.items()}, **result.notes, "outputs": paths}
