import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dermray.core.taxonomy import ROOT_ID, Taxonomy
from dermray.errors import TaxonomyError
from dermray.store.definitions import load_taxonomy


def tree(rows):
    return Taxonomy.from_rows([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], "t.parquet")


SMALL = [("r", None, "Root"), ("a", "r", "A"), ("b", "r", "B"), ("a1", "a", "A1"), ("a2", "a", "A2")]


def test_rows_form_orders_depth_first_and_answers_queries():
    t = tree(SMALL)
    assert t.node_ids == ["r", "a", "a1", "a2", "b"]
    a = t.index["a"]
    assert sorted(t.node_ids[i] for i in t.descendants(a)) == ["a", "a1", "a2"]
    assert [t.node_ids[i] for i in t.ancestors(t.index["a2"])] == ["a", "r"]
    assert t.is_ancestor(a, t.index["a1"]) and not t.is_ancestor(t.index["a1"], a)
    assert t.is_ancestor(a, a) and not t.is_ancestor(a, a, proper=True)
    assert t.subtree_sizes(np.array([1, 2, 3, 4, 5])).tolist() == [15, 9, 3, 4, 5]


@pytest.mark.parametrize("rows, fragment", [
    (SMALL + [("a", "r", "dup")], "duplicate node_id(s) 'a'"),
    (SMALL + [("x", "nope", "X")], "'x'"),
    (SMALL + [("x", "y", "X"), ("y", "x", "Y")], "cycle"),
    (SMALL + [("x", "x", "X")], "own parent"),
    (SMALL + [("r2", None, "Other root")], "2 roots"),
    (SMALL + [("x", "a", "  ")], "empty name for node(s) 'x'"),
    (SMALL + [("", "a", "X")], "empty node_id"),
])
def test_bad_taxonomies_are_refused_with_the_ids(rows, fragment):
    with pytest.raises(TaxonomyError) as e:
        tree(rows)
    assert fragment in str(e.value)
    assert "t.parquet" in str(e.value)


def test_cycle_message_names_the_cycle_members():
    with pytest.raises(TaxonomyError, match=r"cycle through node\(s\) '(x|y)', '(x|y)'"):
        tree(SMALL + [("x", "y", "X"), ("y", "x", "Y"), ("z", "x", "Z")])


def test_orphan_message_names_the_missing_parent():
    with pytest.raises(TaxonomyError, match="orphans.*'nope'"):
        tree(SMALL + [("x", "nope", "X")])


def test_path_form_creates_intermediates_and_a_root():
    t = Taxonomy.from_paths(["Benign:Nevus:Blue nevus", "Malignant", "Benign"])
    assert t.node_ids[0] == ROOT_ID
    assert set(t.node_ids) == {ROOT_ID, "Benign", "Benign:Nevus", "Benign:Nevus:Blue nevus", "Malignant"}
    assert t.names[t.index["Benign:Nevus"]] == "Nevus"
    assert t.node_ids[t.parent[t.index["Benign"]]] == ROOT_ID


def test_path_form_rejects_duplicates_and_empty_parts():
    with pytest.raises(TaxonomyError, match="duplicate path"):
        Taxonomy.from_paths(["A:B", "A:B"])
    with pytest.raises(TaxonomyError, match="empty name"):
        Taxonomy.from_paths(["A::B"])


def test_from_table_accepts_both_forms_and_round_trips():
    t = tree(SMALL)
    again = Taxonomy.from_table(t.to_table())
    assert again.node_ids == t.node_ids and again.names == t.names
    p = Taxonomy.from_table(pa.table({"path": ["X:Y", "X:Z"]}))
    assert "X:Y" in p.index
    with pytest.raises(TaxonomyError, match="needs columns"):
        Taxonomy.from_table(pa.table({"foo": ["x"]}))


def test_resolve_by_id_or_unique_name():
    t = Taxonomy.from_paths(["A:Nevus", "B:Nevus", "A:Mel"])
    assert t.resolve("A:Nevus") == t.index["A:Nevus"]
    assert t.resolve("Mel") == t.index["A:Mel"]
    with pytest.raises(TaxonomyError, match="ambiguous"):
        t.resolve("Nevus")
    with pytest.raises(TaxonomyError, match="unknown taxonomy node 'Q'"):
        t.resolve("Q")


def test_real_isic_taxonomy_loads(isic_taxonomy_csv, tmp_path):
    t = load_taxonomy(str(isic_taxonomy_csv))
    df = pd.read_csv(isic_taxonomy_csv)
    assert len(t) == len(df) + 1  # plus the created root
    leaves = [i for i in range(len(t)) if t.is_leaf(i)]
    assert len(leaves) == int(df["is_leaf"].sum())
    assert {t.names[c] for c in t.children[t.root]} == {"Benign", "Malignant", "Indeterminate"}
    # Parquet in the rows form round-trips.
    out = tmp_path / "taxonomy.parquet"
    import pyarrow.parquet as pq

    pq.write_table(t.to_table(), out)
    assert load_taxonomy(str(out)).node_ids == t.node_ids
