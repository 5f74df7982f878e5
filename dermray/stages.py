"""The stages, listed once. Every stage module has the same interface:

- ``STAGE``: its name;
- ``run(cfg: RunConfig) -> dict``: do the work, write the outputs under ``layout.stage_dir(output, STAGE, run_id)``
  and a summary (with its ``lineage``), return the summary;
- ``lineage_now(cfg, recorded) -> Lineage``: the lineage ``run`` would record now, computed from the inputs
  without doing the work (``recorded`` lets it trust an input whose storage identity is unchanged);
- ``counts(summary) -> {"in", "out", "quarantined", "seconds"}``;
- ``format_summary(summary) -> str``: the lines a person reads.

The pipeline, the CLI, ``dermray lineage`` and the stage contract suite (tests/stage/test_stage_contract.py) go through
this list: a stage added here gets all of them.
"""
from __future__ import annotations

import importlib
from types import ModuleType

STAGES = ("partition", "train", "score", "evaluate", "saliency")


def module(stage: str) -> ModuleType:
    if stage not in STAGES:
        raise KeyError(stage)
    return importlib.import_module(f"dermray.{stage}")
