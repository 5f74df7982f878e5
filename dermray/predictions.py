"""The predictions table as the stages after scoring read it: validated against its schema, one model's rows,
the probabilities as a matrix, and the content fingerprint of the columns that were used (its lineage)."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

from dermray import lineage, schemas, storage
from dermray.errors import UserError
from dermray.inference import probs_matrix

# The prediction columns the evaluation reads (the rest of the table is not an input of its numbers).
USED_COLUMNS = ("image_id", "model_id", "probs", "probs_raw", "label", "label_source", "modality", "group_id")


def load_predictions(uri: str, model_id: str | None, extra_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """The predictions of one model (``model_id``, or the only one), with ``probs`` as ``df.attrs["probs"]``
    (float64 [n, C]) and the table's content fingerprint as ``df.attrs["fingerprint"]``."""
    table = storage.read_table(uri)
    source = storage.redact(uri)
    schemas.check_columns(table.schema, schemas.PREDICTIONS, source)
    if "label" not in table.column_names:
        raise UserError(f"{source}: predictions need the manifest's 'label' column to be evaluated")
    models = pd.unique(table.column("model_id").to_numpy(zero_copy_only=False))
    if model_id is None and len(models) > 1:
        raise UserError(f"{source}: predictions of {len(models)} models ({', '.join(map(str, models[:5]))}); "
                        "choose one with evaluate.model_id")
    if model_id is not None:
        table = table.filter(pa.compute.equal(table.column("model_id"), model_id))
        if table.num_rows == 0:
            raise UserError(f"{source}: no predictions of model_id {model_id!r} (has: {', '.join(map(str, models))})")
    used = [c for c in USED_COLUMNS + tuple(extra_columns) if c in table.column_names]
    fingerprint = lineage.columns_fingerprint(uri, table, used, identity=storage.identity(uri))
    probs = probs_matrix(table.column("probs"))
    raw = probs_matrix(table.column("probs_raw")) if "probs_raw" in table.column_names else None
    df = table.drop_columns([c for c in ("probs", "probs_raw") if c in table.column_names]).to_pandas()
    dup = df["image_id"].duplicated()
    if dup.any():
        raise UserError(f"{source}: image_id {df.loc[dup, 'image_id'].iloc[0]!r} is predicted more than once "
                        f"for one model")
    df.attrs["probs"] = probs
    df.attrs["probs_raw"] = raw  # before the model card's calibration (None when the table has no such column)
    df.attrs["fingerprint"] = fingerprint
    return df
