"""The subsets every metric is computed on: all images, the biopsy-proven, each modality, each value (or bin) of
the configured subgroup columns; and the lesion each image belongs to (the bootstrap's resampling unit)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dermray.core.ids import lesion_keys
from dermray.errors import UserError


def lesions(df: pd.DataFrame) -> np.ndarray:
    """Each prediction's lesion key, [n] (the lesion bootstrap's and the clustered DeLong's clusters): the shared
    rule of ``ids.lesion_keys`` - a null, empty or blank group_id is the image alone."""
    groups = df["group_id"] if "group_id" in df.columns else None
    return lesion_keys(df["image_id"].astype(str), groups).to_numpy(zero_copy_only=False)


def subsets(df: pd.DataFrame, subgroup_specs: list[str]) -> list[tuple[str, np.ndarray]]:
    """(name, boolean mask) for: all, biopsy-proven, each modality, each value of each subgroup column."""
    out = [("all", np.ones(len(df), dtype=bool))]
    if "label_source" in df.columns:
        out.append(("biopsy", (df["label_source"] == "biopsy").to_numpy()))
    for column in ("modality", "source"):  # several sources in one set: each its own subset
        if column in df.columns and df[column].nunique() > (0 if column == "modality" else 1):
            for value in sorted(df[column].dropna().astype(str).unique()):
                out.append((f"{column}={value}", (df[column].astype(str) == value).to_numpy()))
    for spec in subgroup_specs:
        column, _, edges = spec.partition(":")
        if column not in df.columns:
            raise UserError(f"evaluate.subgroups: column {column!r} is not in the predictions "
                            f"(has: {', '.join(df.columns)})")
        values = df[column]
        if edges:
            try:
                cuts = [float(e) for e in edges.split("/")]
            except ValueError:
                raise UserError(f"evaluate.subgroups: {spec!r}: bin edges must be numbers separated by '/'") from None
            numeric = pd.to_numeric(values, errors="coerce")
            binned = pd.cut(numeric, cuts, right=False)
            for interval in binned.cat.categories:
                name = f"{column}=[{interval.left:g},{interval.right:g})"
                out.append((name, (binned == interval).to_numpy()))
        else:
            for value in sorted(values.dropna().astype(str).unique()):
                out.append((f"{column}={value}", (values.astype(str) == value).to_numpy()))
    return out
