"""The disease taxonomy: a single rooted tree of nodes. Pure logic: no Ray, no I/O beyond taking a table.

Two input forms (docs/tables.md):
- ``node_id, parent_id, name`` rows; exactly one root (``parent_id`` null);
- a ``path`` (or ``full_path``) column of ``:``-joined names, the ISIC Archive form. Each path is a node whose
  ``node_id`` is the path itself; missing intermediate paths are created; the top-level names hang under a created
  root node ``root`` (the path form has no single root of its own).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from dermray.errors import TaxonomyError

ROOT_ID = "root"
PATH_SEPARATOR = ":"


def _show(ids: Iterable[object], limit: int = 8) -> str:
    ids = list(ids)
    text = ", ".join(repr(i) for i in ids[:limit])
    return text + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


@dataclass
class Taxonomy:
    """A validated tree. Nodes are indexed 0..n-1 in a stable order (depth-first, children sorted by node_id)."""

    node_ids: list[str]
    parent: np.ndarray  # int32 index of each node's parent; -1 for the root
    names: list[str]
    children: list[list[int]] = field(repr=False)
    index: dict[str, int] = field(repr=False)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, node_ids: Sequence, parent_ids: Sequence, names: Sequence, source: str = "taxonomy"
                  ) -> "Taxonomy":
        n = len(node_ids)
        bad_ids = [i for i, v in enumerate(node_ids) if v is None or str(v).strip() == ""]
        if bad_ids:
            raise TaxonomyError(f"{source}: empty node_id at row(s) {_show(bad_ids)}")
        seen: dict[str, int] = {}
        dupes = []
        for i, v in enumerate(node_ids):
            if v in seen:
                dupes.append(v)
            seen[v] = i
        if dupes:
            raise TaxonomyError(f"{source}: duplicate node_id(s) {_show(sorted(set(dupes)))}")
        empty_names = [node_ids[i] for i in range(n) if names[i] is None or str(names[i]).strip() == ""]
        if empty_names:
            raise TaxonomyError(f"{source}: empty name for node(s) {_show(empty_names)}")
        parents = [None if (p is None or (isinstance(p, float) and np.isnan(p)) or p == "") else p
                   for p in parent_ids]
        unknown = [node_ids[i] for i, p in enumerate(parents) if p is not None and p not in seen]
        if unknown:
            raise TaxonomyError(f"{source}: node(s) {_show(unknown)} name a parent_id that is not in the taxonomy "
                                f"(orphans): {_show(sorted({p for p in parents if p is not None and p not in seen}))}")
        self_loops = [node_ids[i] for i, p in enumerate(parents) if p == node_ids[i]]
        if self_loops:
            raise TaxonomyError(f"{source}: node(s) {_show(self_loops)} are their own parent (a cycle)")
        roots = [node_ids[i] for i, p in enumerate(parents) if p is None]
        par = np.array([-1 if p is None else seen[p] for p in parents], dtype=np.int64)
        # Nodes not reachable from a root sit on a cycle (or hang below one).
        kids: list[list[int]] = [[] for _ in range(n)]
        for i, p in enumerate(par):
            if p >= 0:
                kids[p].append(i)
        reached = np.zeros(n, dtype=bool)
        stack = [i for i in range(n) if par[i] < 0]
        while stack:
            i = stack.pop()
            reached[i] = True
            stack.extend(kids[i])
        if not reached.all():
            on_cycle = cls._cycle_members(par, reached, node_ids)
            raise TaxonomyError(f"{source}: the taxonomy has a cycle through node(s) {_show(on_cycle)}")
        if len(roots) == 0:
            raise TaxonomyError(f"{source}: the taxonomy has no root (a node with an empty parent_id)")
        if len(roots) > 1:
            raise TaxonomyError(f"{source}: the taxonomy has {len(roots)} roots ({_show(roots)}); "
                                "give them one common parent so that it is a single tree")
        return cls._ordered([str(x) for x in node_ids], par, [str(x) for x in names])

    @staticmethod
    def _cycle_members(par: np.ndarray, reached: np.ndarray, node_ids) -> list[str]:
        start = int(np.flatnonzero(~reached)[0])
        seen_at: dict[int, int] = {}
        path: list[int] = []
        i = start
        while i not in seen_at:
            seen_at[i] = len(path)
            path.append(i)
            i = int(par[i])
        return [node_ids[j] for j in path[seen_at[i]:]]

    @classmethod
    def _ordered(cls, node_ids: list[str], par: np.ndarray, names: list[str]) -> "Taxonomy":
        n = len(node_ids)
        kids: list[list[int]] = [[] for _ in range(n)]
        for i, p in enumerate(par):
            if p >= 0:
                kids[p].append(i)
        root = int(np.flatnonzero(par < 0)[0])
        order = []
        stack = [root]
        while stack:
            i = stack.pop()
            order.append(i)
            stack.extend(sorted(kids[i], key=lambda k: node_ids[k], reverse=True))
        new_of_old = np.empty(n, dtype=np.int64)
        new_of_old[order] = np.arange(n)
        ids = [node_ids[i] for i in order]
        new_par = np.array([-1 if par[i] < 0 else new_of_old[par[i]] for i in order], dtype=np.int32)
        children: list[list[int]] = [[] for _ in range(n)]
        for i, p in enumerate(new_par):
            if p >= 0:
                children[p].append(i)
        return cls(ids, new_par, [names[i] for i in order], children, {v: i for i, v in enumerate(ids)})

    @classmethod
    def from_paths(cls, paths: Sequence, source: str = "taxonomy") -> "Taxonomy":
        bad = [i for i, p in enumerate(paths) if p is None or str(p).strip() == ""]
        if bad:
            raise TaxonomyError(f"{source}: empty path at row(s) {_show(bad)}")
        node_ids: list[str] = [ROOT_ID]
        parents: list[str | None] = [None]
        names: list[str] = [ROOT_ID]
        known = {ROOT_ID}
        dupes = []
        given = set()
        for raw in paths:
            parts = [p.strip() for p in str(raw).split(PATH_SEPARATOR)]
            if any(p == "" for p in parts):
                raise TaxonomyError(f"{source}: path {raw!r} has an empty name")
            full = PATH_SEPARATOR.join(parts)
            if full in given:
                dupes.append(full)
            given.add(full)
            for depth in range(1, len(parts) + 1):
                nid = PATH_SEPARATOR.join(parts[:depth])
                if nid in known:
                    continue
                if nid == ROOT_ID:
                    raise TaxonomyError(f"{source}: a path may not be named {ROOT_ID!r} (reserved for the root)")
                known.add(nid)
                node_ids.append(nid)
                parents.append(PATH_SEPARATOR.join(parts[:depth - 1]) if depth > 1 else ROOT_ID)
                names.append(parts[depth - 1])
        if dupes:
            raise TaxonomyError(f"{source}: duplicate path(s) {_show(sorted(set(dupes)))}")
        return cls.from_rows(node_ids, parents, names, source)

    @classmethod
    def from_table(cls, table, source: str = "taxonomy") -> "Taxonomy":
        """From an Arrow table or pandas DataFrame in either form."""
        if isinstance(table, pa.Table):
            cols = {c: table.column(c).to_pylist() for c in table.column_names}
        else:
            cols = {c: [None if (isinstance(v, float) and np.isnan(v)) else v for v in table[c].tolist()]
                    for c in table.columns}
        if {"node_id", "parent_id", "name"} <= set(cols):
            return cls.from_rows(cols["node_id"], cols["parent_id"], cols["name"], source)
        for path_col in ("path", "full_path"):
            if path_col in cols:
                return cls.from_paths(cols[path_col], source)
        raise TaxonomyError(f"{source}: a taxonomy needs columns node_id, parent_id, name, or a single path column "
                            f"(has: {', '.join(cols)})")

    def to_table(self) -> pa.Table:
        return pa.table({
            "node_id": pa.array(self.node_ids, pa.string()),
            "parent_id": pa.array([None if p < 0 else self.node_ids[p] for p in self.parent], pa.string()),
            "name": pa.array(self.names, pa.string()),
        })

    # ---- queries ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.node_ids)

    @property
    def root(self) -> int:
        return 0

    def is_leaf(self, i: int) -> bool:
        return not self.children[i]

    def ancestors(self, i: int, include_self: bool = False) -> list[int]:
        out = [i] if include_self else []
        p = int(self.parent[i])
        while p >= 0:
            out.append(p)
            p = int(self.parent[p])
        return out

    def descendants(self, i: int, include_self: bool = True) -> list[int]:
        out, stack = [], [i]
        while stack:
            j = stack.pop()
            out.append(j)
            stack.extend(self.children[j])
        return out if include_self else out[1:]

    def is_ancestor(self, a: int, b: int, proper: bool = False) -> bool:
        """Whether node ``a`` is ``b`` or lies above it (strictly above when ``proper``)."""
        if a == b:
            return not proper
        return a in self.ancestors(b)

    def subtree_sizes(self, own_counts: np.ndarray) -> np.ndarray:
        """Sum of ``own_counts`` (per node, shape [n]) over each node's subtree."""
        total = np.asarray(own_counts, dtype=np.int64).copy()
        # Depth-first preorder puts every child after its parent: accumulate in reverse.
        for i in range(len(self) - 1, 0, -1):
            total[self.parent[i]] += total[i]
        return total

    def resolve(self, ref: str, source: str = "tasks") -> int:
        """A node by node_id, or by name when the name is unique."""
        if ref in self.index:
            return self.index[ref]
        hits = [i for i, name in enumerate(self.names) if name == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise TaxonomyError(f"{source}: node name {ref!r} is ambiguous; use one of the node_ids "
                                f"{_show([self.node_ids[i] for i in hits])}")
        raise TaxonomyError(f"{source}: unknown taxonomy node {ref!r}")
