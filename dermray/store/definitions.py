"""Reading the definitions a run is made of - the disease taxonomy and the evaluation tasks - from storage. The
parsing and checking is pure (``dermray/core/taxonomy.py``, ``dermray/core/evaluation_tasks.py``); this is the I/O
around it."""
from __future__ import annotations

from dermray.core.evaluation_tasks import Task, parse_tasks
from dermray.core.taxonomy import Taxonomy
from dermray.store import lineage, storage


def load_taxonomy(uri: str) -> Taxonomy:
    """Read a taxonomy table (Parquet, or CSV by extension) in either form (node rows or ISIC paths)."""
    return Taxonomy.from_table(storage.read_table_any(uri), source=storage.redact(uri))


def load_tasks(uri: str, taxonomy: Taxonomy) -> list[Task]:
    """Read and check a tasks YAML against ``taxonomy``."""
    return parse_tasks(storage.read_text(uri), taxonomy, uri)


def fingerprints(tasks_uri: str | None, taxonomy_uri: str | None) -> dict[str, lineage.Fingerprint]:
    """The lineage inputs of a stage that reads the tasks and the taxonomy (file contents; empty when either is not
    configured, as a stage then writes nothing of the tasks)."""
    if not (tasks_uri and taxonomy_uri):
        return {}
    return {"tasks": lineage.file_fingerprint(tasks_uri), "taxonomy": lineage.file_fingerprint(taxonomy_uri)}
