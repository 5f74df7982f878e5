"""Evaluation tasks (docs/tables.md): named tasks, each a list of classes, each class a list of taxonomy nodes.

YAML form::

    tasks:
      melanoma_vs_nevus:            # a binary task: two classes; the score is P(pos) / (P(pos) + P(neg))
        positive: melanoma          # optional; defaults to the first class listed
        classes:
          melanoma: ["Malignant:Malignant melanocytic proliferations (Melanoma)"]
          nevus: ["Benign:Benign melanocytic proliferations:Nevus"]
      three_class:
        classes:
          benign: [Benign]
          malignant: [Malignant]
          indeterminate: [Indeterminate]

A node may be given by node_id or by its name when that name is unique. A class covers its nodes and everything
below them. Pure logic: no Ray, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from dermray.core.taxonomy import Taxonomy
from dermray.errors import TaxonomyError, UserError


@dataclass(frozen=True)
class TaskClass:
    name: str
    nodes: tuple[int, ...]  # taxonomy node indices


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[TaskClass, ...]
    positive: str | None = None  # binary tasks only

    @property
    def is_binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]


def parse_tasks(spec: dict | str, taxonomy: Taxonomy, source: str = "tasks") -> list[Task]:
    """Parse and check a tasks spec (dict or YAML text) against a taxonomy."""
    if isinstance(spec, str):
        try:
            spec = yaml.safe_load(spec) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), dict) or not spec["tasks"]:
        raise UserError(f"{source}: expected a top-level 'tasks:' mapping of task name -> {{classes: ...}}")
    tasks = []
    for tname, tspec in spec["tasks"].items():
        where = f"{source}: task {tname!r}"
        if not isinstance(tspec, dict) or not isinstance(tspec.get("classes"), dict):
            raise UserError(f"{where}: expected a 'classes:' mapping of class name -> list of taxonomy nodes")
        unknown_keys = set(tspec) - {"classes", "positive", "description"}
        if unknown_keys:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown_keys))}")
        classes = []
        for cname, refs in tspec["classes"].items():
            if isinstance(refs, str):
                refs = [refs]
            if not isinstance(refs, list) or not refs:
                raise UserError(f"{where}, class {cname!r}: expected a non-empty list of taxonomy nodes")
            try:
                nodes = tuple(taxonomy.resolve(str(r), f"{where}, class {cname!r}") for r in refs)
            except TaxonomyError:
                raise
            classes.append(TaskClass(str(cname), nodes))
        if len(classes) < 2:
            raise UserError(f"{where}: needs at least two classes")
        _check_disjoint(tname, classes, taxonomy, source)
        positive = tspec.get("positive")
        if len(classes) == 2:
            positive = str(positive) if positive is not None else classes[0].name
            if positive not in [c.name for c in classes]:
                raise UserError(f"{where}: positive class {positive!r} is not one of its classes")
        elif positive is not None:
            raise UserError(f"{where}: 'positive' applies to binary (two-class) tasks only")
        tasks.append(Task(str(tname), tuple(classes), positive))
    return tasks


def _check_disjoint(tname: str, classes: list[TaskClass], tax: Taxonomy, source: str) -> None:
    for i, a in enumerate(classes):
        for b in classes[i:]:
            for na in a.nodes:
                for nb in b.nodes:
                    if a is b and na == nb:
                        continue
                    if tax.is_ancestor(na, nb) or tax.is_ancestor(nb, na):
                        if a is b:
                            continue  # nested nodes within one class are redundant, not wrong
                        raise UserError(
                            f"{source}: task {tname!r}: classes {a.name!r} and {b.name!r} overlap "
                            f"({tax.node_ids[na]!r} and {tax.node_ids[nb]!r} are the same node or one lies below "
                            f"the other)")
