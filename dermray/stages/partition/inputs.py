"""What a partition run reads, checked before Ray starts: the manifest's schema and row groups, the taxonomy, the
evaluation tasks, and their fingerprints."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from dermray.core.evaluation_tasks import Task
from dermray.core.taxonomy import Taxonomy
from dermray.errors import UserError
from dermray.runtime.config import RunConfig
from dermray.stages.partition.chunks import manifest_columns
from dermray.store import lineage, schemas, storage
from dermray.store.definitions import load_tasks, load_taxonomy


@dataclass
class Inputs:
    """What the stage reads before Ray starts: the manifest's metadata, the taxonomy, the tasks, their
    fingerprints (the manifest's is computed while pass 1 reads it)."""
    manifest: str
    pf: pq.ParquetFile
    columns: list[str]
    tax: Taxonomy
    tasks: list
    fingerprints: dict


def read_inputs(cfg: RunConfig) -> Inputs:
    if not cfg.data.manifest:
        raise UserError("no manifest given: set data.manifest (or --manifest)")
    if not cfg.data.taxonomy:
        raise UserError("no taxonomy given: set data.taxonomy (or --taxonomy)")
    tax = load_taxonomy(cfg.data.taxonomy)
    tasks: list[Task] = load_tasks(cfg.data.tasks, tax) if cfg.data.tasks else []
    pf = storage.parquet_file(cfg.data.manifest)
    schemas.check_columns(pf.schema_arrow, schemas.MANIFEST, storage.redact(cfg.data.manifest))
    fps = {"taxonomy": lineage.file_fingerprint(cfg.data.taxonomy)}
    if cfg.data.tasks:
        fps["tasks"] = lineage.file_fingerprint(cfg.data.tasks)
    return Inputs(cfg.data.manifest, pf, manifest_columns(pf.schema_arrow), tax, tasks, fps)
