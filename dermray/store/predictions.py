"""The predictions table as the stages after scoring read it: validated against its schema, one model's rows,
the probabilities as a matrix, and the content fingerprint of the columns the caller declared (its lineage).

A caller names the columns it reads and gets only those: a column it did not declare is not there to read, so the
fingerprint cannot leave out a column its numbers depend on (issue 27: evaluate's subgroup columns escaped it)."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

from dermray.core.inference import probs_matrix
from dermray.errors import UserError
from dermray.store import lineage, schemas, storage

# The prediction columns every reader of the predictions uses (image, model, probabilities, truth, lesion, subsets).
USED_COLUMNS = ("image_id", "model_id", "probs", "probs_raw", "label", "label_source", "modality", "group_id")


def declared_columns(extra_columns: tuple[str, ...] = ()) -> list[str]:
    return list(dict.fromkeys(USED_COLUMNS + tuple(extra_columns)))


def load_predictions(uri: str, model_id: str | None, extra_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """The predictions of one model (``model_id``, or the only one): a frame of the columns of ``USED_COLUMNS`` +
    ``extra_columns`` that the table has (no other), with ``probs`` as ``df.attrs["probs"]`` (float64 [n, C]) and the
    content fingerprint of exactly those columns as ``df.attrs["fingerprint"]``."""
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
    declared = declared_columns(extra_columns)
    used = [c for c in declared if c in table.column_names]
    # Over every declared column, absent ones included: a column that appears (or goes) changes the fingerprint.
    fingerprint = lineage.columns_fingerprint(uri, table, declared, identity=storage.identity(uri))
    probs = probs_matrix(table.column("probs"))
    raw = probs_matrix(table.column("probs_raw")) if "probs_raw" in table.column_names else None
    df = table.select([c for c in used if c not in ("probs", "probs_raw")]).to_pandas()
    dup = df["image_id"].duplicated()
    if dup.any():
        raise UserError(f"{source}: image_id {df.loc[dup, 'image_id'].iloc[0]!r} is predicted more than once "
                        f"for one model")
    df.attrs["probs"] = probs
    df.attrs["probs_raw"] = raw  # before the model card's calibration (None when the table has no such column)
    df.attrs["fingerprint"] = fingerprint
    return df
