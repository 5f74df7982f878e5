"""The tables between stages (docs/tables.md): one definition each, and validation that names file, column and row."""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from dermray.errors import SchemaError


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    required: bool = True
    nullable: bool = False
    allowed: tuple[str, ...] | None = None  # allowed string values, when the column is an enumeration
    doc: str = ""


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: tuple[Column, ...]
    extra_columns_allowed: bool = False
    doc: str = ""
    _by_name: dict = field(default_factory=dict, compare=False, repr=False)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def required_names(self) -> list[str]:
        return [c.name for c in self.columns if c.required]

    def arrow(self, present: list[str] | None = None) -> pa.Schema:
        """The Arrow schema of this table (optional columns only when listed in ``present``)."""
        cols = [c for c in self.columns if c.required or (present is not None and c.name in present)]
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable or not c.required) for c in cols])


def _s(name, **kw):
    return Column(name, pa.string(), **kw)


TAXONOMY = TableSchema(
    "taxonomy",
    (_s("node_id"), _s("parent_id", nullable=True, doc="null for the root"), _s("name")),
    doc="One row per disease node. Also accepted on read: a single `path` column of ':'-joined names.",
)

LABEL_SOURCES = ("biopsy", "clinical")
MODALITIES = ("clinical", "dermoscopy")

MANIFEST = TableSchema(
    "manifest",
    (
        _s("image_id", doc="unique"),
        _s("uri", doc="absolute, or relative to the manifest"),
        _s("label", doc="a taxonomy node_id (leaf or internal)"),
        _s("group_id", required=False, nullable=True, doc="lesion or patient; defaults to image_id"),
        _s("label_source", required=False, nullable=True, allowed=LABEL_SOURCES),
        _s("modality", required=False, nullable=True, allowed=MODALITIES),
    ),
    extra_columns_allowed=True,
)

TRAINING_CLASSES = TableSchema(
    "training_classes",
    (
        Column("class_index", pa.int32()),
        _s("node_id"),
        _s("name"),
        Column("n_images", pa.int64()),
        _s("scope", allowed=("subtree", "node"),
           doc="subtree: images at or below node_id; node: only images labelled exactly node_id"),
    ),
)

LABELS = TableSchema(
    "labels",
    (_s("image_id"), Column("class_index", pa.int32()), Column("fold", pa.int32())),
)

TASK_MEMBERSHIP = TableSchema(
    "task_membership",
    (_s("task"), _s("task_class"), Column("class_index", pa.int32()), _s("node_id")),
    doc="Training class -> task class: the paper's inference algorithm sums these training classes' probabilities.",
)

QUARANTINE = TableSchema(
    "quarantine",
    (
        _s("stage"),
        _s("image_id", nullable=True),
        Column("row", pa.int64(), nullable=True, doc="0-based row number in the input table"),
        _s("uri", nullable=True),
        _s("reason"),
    ),
)

PREDICTIONS = TableSchema(
    "predictions",
    (
        _s("image_id"),
        _s("model_id"),
        Column("probs", pa.list_(pa.float32()), doc="over training classes, in class_index order"),
        _s("label", required=False, nullable=True),
        _s("label_source", required=False, nullable=True),
        _s("modality", required=False, nullable=True),
        _s("group_id", required=False, nullable=True),
    ),
    extra_columns_allowed=True,
)

METRICS = TableSchema(
    "metrics",
    (
        _s("run_id"), _s("task"), _s("subset"), _s("metric"),
        Column("value", pa.float64(), nullable=True),
        Column("ci_low", pa.float64(), nullable=True),
        Column("ci_high", pa.float64(), nullable=True),
        Column("n", pa.int64()),
        _s("note", required=False, nullable=True, doc="why a value is undefined (null when it is defined)"),
    ),
)

ROC = TableSchema(
    "roc",
    (_s("run_id"), _s("task"), _s("subset"), Column("threshold", pa.float64()),
     Column("fpr", pa.float64()), Column("tpr", pa.float64())),
)

READERS = TableSchema(
    "readers",
    (_s("reader_id"), _s("image_id"), _s("task"),
     Column("decision", pa.int8(), required=False, nullable=True),
     Column("score", pa.float64(), required=False, nullable=True)),
    doc="Dermatologists' answers: decision 1 = called positive (the task's positive class).",
)

READER_POINTS = TableSchema(
    "reader_points",
    (_s("run_id"), _s("task"), _s("subset"), _s("reader_id"), Column("n", pa.int64()),
     Column("sensitivity", pa.float64(), nullable=True), Column("specificity", pa.float64(), nullable=True),
     Column("model_sensitivity_at_specificity", pa.float64(), nullable=True),
     Column("below_model_curve", pa.bool_(), nullable=True)),
    doc="Each reader's operating point on a task and subset, against the model's ROC curve.",
)

CONFUSION = TableSchema(
    "confusion",
    (_s("run_id"), _s("task"), _s("subset"), _s("true_class"), _s("predicted_class"), Column("n", pa.int64())),
    doc="Multi-class confusion counts; predicted_class 'undecided' for argmax ties.",
)

CALIBRATION = TableSchema(
    "calibration",
    (_s("run_id"), _s("task"), _s("subset"), Column("bin_low", pa.float64()), Column("bin_high", pa.float64()),
     Column("n", pa.int64()), Column("mean_predicted", pa.float64(), nullable=True),
     Column("observed", pa.float64(), nullable=True)),
)

FOLD_COUNTS = TableSchema(
    "fold_counts",
    (Column("class_index", pa.int32()), Column("fold", pa.int32()), Column("n_images", pa.int64())),
    doc="Images per training class and fold (the partition's stratification, for a reviewer).",
)

NEAR_DUPLICATES = TableSchema(
    "near_duplicates",
    (_s("image_a"), _s("image_b"), _s("group_a"), _s("group_b"), Column("hamming", pa.int64()),
     Column("similarity", pa.float64()), Column("exact", pa.bool_()), Column("crossed_groups", pa.bool_()),
     Column("merged", pa.bool_())),
    doc="Image pairs the partition found to be one picture (equal bytes, or close perceptual hashes confirmed by "
        "aligned pixel correlation); merged = their groups were joined (False: the component cap refused it).",
)

IMAGE_HASHES = TableSchema(
    "image_hashes",
    (_s("image_id"), _s("uri"), _s("sha256"), Column("phash", pa.list_(pa.uint64()))),
    doc="Per training image the partition could read: the sha256 of its bytes and the 64-bit perceptual hashes of "
        "seven views (whole, central 92 % and 85 %, 95 % in each corner; neardup.HASH_BOXES; three in a partition "
        "made before the corner views): evaluate looks for test images that "
        "are near-duplicates of these.",
)

TRAIN_OVERLAP = TableSchema(
    "train_overlap",
    (_s("test_image"), _s("train_image"), Column("hamming", pa.int64()), Column("similarity", pa.float64()),
     Column("exact", pa.bool_())),
    doc="Test images that are near-duplicates of training images (the partition's method: equal bytes, or close "
        "perceptual hashes confirmed by aligned pixel correlation): evaluate reports every metric without them too.",
)

TRAINING_METRICS = TableSchema(
    "training_metrics",
    (Column("epoch", pa.int64()), _s("split", allowed=("train", "select")), _s("metric"),
     Column("value", pa.float64(), nullable=True)),
    doc="Per fold and epoch (numbered from 1): loss, top-1, task accuracies, data-wait and compute seconds, images/s.",
)

LOCKING_PREDICTIONS = TableSchema(
    "locking_predictions",
    (_s("image_id"), Column("class_index", pa.int32()), _s("group"), _s("label"),
     Column("probs", pa.list_(pa.float32()), doc="the ensemble's mean softmax over its fold models and the "
                                                  "score.tta views, in class_index order")),
    doc="What the temperature and the operating points are fitted on: the train run's model - the mean of its "
        "fold models, as scoring makes it - on the training images no fold model trained on (the inner selection "
        "lesions; with one fold, its held-out images too).",
)

TRAIN_SUMMARY = TableSchema(
    "train_summary",
    (_s("metric"), Column("mean", pa.float64(), nullable=True), Column("sd", pa.float64(), nullable=True),
     Column("folds", pa.int64())),
    doc="Mean and sd over the cross-validation folds of each validation metric.",
)

SALIENCY_INDEX = TableSchema(
    "saliency_index",
    (_s("image_id"), _s("task"), _s("method"), _s("target"), Column("score", pa.float64(), nullable=True),
     _s("png_uri"), _s("npy_uri"), Column("inside_lesion", pa.float64(), nullable=True),
     Column("blank_map", pa.bool_()), _s("label", nullable=True), _s("true_class", nullable=True), _s("reason")),
)

SANITY = TableSchema(
    "sanity",
    (_s("method"), Column("level", pa.int64()), _s("randomised"), Column("spearman", pa.float64(), nullable=True),
     Column("ssim", pa.float64(), nullable=True), Column("n_images", pa.int64()), Column("constant_maps", pa.int64()),
     Column("flagged", pa.bool_())),
    doc="The model-parameter randomisation test: per method and level, similarity to the trained model's maps.",
)

ALL = {s.name: s for s in (TAXONOMY, MANIFEST, TRAINING_CLASSES, LABELS, TASK_MEMBERSHIP, QUARANTINE,
                           PREDICTIONS, METRICS, ROC, READERS, READER_POINTS, CONFUSION, CALIBRATION, FOLD_COUNTS,
                           NEAR_DUPLICATES, IMAGE_HASHES, TRAIN_OVERLAP, TRAINING_METRICS, TRAIN_SUMMARY,
                           LOCKING_PREDICTIONS, SALIENCY_INDEX, SANITY)}


def _type_ok(actual: pa.DataType, expected: pa.DataType) -> bool:
    if pa.types.is_dictionary(actual):
        actual = actual.value_type
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual) or pa.types.is_null(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _type_ok(
            actual.value_type, expected.value_type)
    return actual.equals(expected)


def check_columns(schema: pa.Schema, table: TableSchema, source: str) -> list[str]:
    """Check column presence and types; returns the optional columns present. Raises SchemaError naming file and
    column."""
    names = schema.names
    missing = [c for c in table.required_names if c not in names]
    if missing:
        raise SchemaError(f"{source}: {table.name} table is missing required column(s) {', '.join(missing)} "
                          f"(has: {', '.join(names) or 'none'})")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SchemaError(f"{source}: duplicate column name(s) {', '.join(dupes)}")
    present = []
    for col in table.columns:
        if col.name not in names:
            continue
        actual = schema.field(col.name).type
        if not _type_ok(actual, col.type):
            raise SchemaError(f"{source}: column {col.name!r} of the {table.name} table has type {actual}, "
                              f"expected {col.type}")
        if not col.required:
            present.append(col.name)
    if not table.extra_columns_allowed:
        extra = [n for n in names if n not in {c.name for c in table.columns}]
        if extra:
            raise SchemaError(f"{source}: unexpected column(s) {', '.join(extra)} in the {table.name} table")
    return present


def check_table(table: pa.Table, schema: TableSchema, source: str, limit: int = 5) -> None:
    """Columns and types (``check_columns``), then values: raise SchemaError naming up to ``limit`` rows whose values
    break the schema (nulls in non-nullable columns, values outside an enumeration). For tables that are refused
    whole rather than quarantined row by row (readers, labels, every output table in the contract tests)."""
    check_columns(table.schema, schema, source)
    for col in schema.columns:
        if col.name not in table.column_names:
            continue
        arr = table.column(col.name)
        bad = pc.is_null(arr)
        if col.nullable:
            bad = pc.and_(bad, False)
        if col.allowed is not None:
            bad = pc.or_(bad, pc.invert(pc.fill_null(pc.is_in(arr, pa.array(col.allowed)), True)))
        rows = pc.indices_nonzero(pc.fill_null(bad, False)).to_pylist()[:limit]
        if rows:
            what = "null" if col.allowed is None else f"not one of {', '.join(col.allowed)}"
            raise SchemaError(f"{source}: column {col.name!r} is {what} at row(s) {', '.join(map(str, rows))}")
