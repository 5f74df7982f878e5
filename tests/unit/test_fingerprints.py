"""Lineage: outputs carry what produced them and are never silently reused. Each of the issue's findings is a test
that failed on the code before (which decided "already done" from names and paths)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dermray.store import lineage


# ---- fingerprints (pure) -------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.integers(-5, 5))), min_size=1, max_size=300),
       st.lists(st.integers(1, 200), min_size=1, max_size=6))
def test_a_table_fingerprint_ignores_how_the_table_is_cut(rows, cuts):
    """Chunks hashed apart (in any order, as tasks would) give the fingerprint of the whole table; so do Parquet
    files written with other row groups."""
    old = lineage.BLOCK_ROWS
    lineage.BLOCK_ROWS = 16  # small blocks so that chunk boundaries cut through them
    try:
        table = pa.table({"a": [r[0] for r in rows], "b": pa.array([r[1] for r in rows], pa.int64())})
        whole = lineage.table_fingerprint(table)
        partials, start = [], 0
        for c in cuts + [len(rows)]:
            if start >= len(rows):
                break
            h = lineage.TableHasher(["a", "b"])
            h.add(table.slice(start, c), start)
            partials.append(h.partial())
            start += c
        assert lineage.TableHasher.merge(partials[::-1])[0] == whole
    finally:
        lineage.BLOCK_ROWS = old


@pytest.mark.parametrize("row_group", [122_880, 250_000, 100_003])
def test_what_a_chunk_sends_to_the_driver_does_not_grow_with_its_row_groups(row_group):
    """A chunk's partial carries whole-block digests plus the rows of the (at most two) blocks its boundaries cut.
    Those rows travel to the driver with every fingerprinted column, so they must stay a few thousand whatever the
    writer's row groups (DuckDB writes 122,880; with 65,536-row blocks about half of each chunk travelled)."""
    table = pa.table({"image_id": pa.array([f"ISIC_{i:08d}" for i in range(3 * row_group)])})
    sent = 0
    for k in range(3):
        h = lineage.TableHasher(["image_id"])
        h.add(table.slice(k * row_group, row_group), k * row_group)
        sent += sum(t.num_rows for parts in h.partial()[3].values() for _, t in parts)
    assert sent <= 3 * 2 * 4096, f"{sent} of {table.num_rows} rows would travel to the driver"


def test_a_fingerprint_changes_with_any_value_and_not_with_row_groups(tmp_path):
    t = pa.table({"image_id": [f"i{k}" for k in range(1000)], "label": ["a", "b"] * 500})
    pq.write_table(t, tmp_path / "one.parquet", row_group_size=1000)
    pq.write_table(t, tmp_path / "many.parquet", row_group_size=7)
    read = [pq.read_table(tmp_path / n) for n in ("one.parquet", "many.parquet")]
    assert lineage.table_fingerprint(read[0]) == lineage.table_fingerprint(read[1]) == lineage.table_fingerprint(t)
    changed = t.set_column(1, "label", pa.array(["a", "b"] * 499 + ["a", "a"]))
    assert lineage.table_fingerprint(changed) != lineage.table_fingerprint(t)
    # The columns a stage uses, only: another column does not change the fingerprint of those.
    wider = t.append_column("note", pa.array(["x"] * 1000))
    assert lineage.table_fingerprint(wider, ["image_id", "label"]) == lineage.table_fingerprint(t)


def test_unsigned_64_bit_values_past_the_signed_range_are_fingerprinted():
    """A uint64 column (the partition's image hashes) with values of 2**63 and more: the fingerprint cast every
    integer to int64 and failed ("Integer value ... not in range"); now each value keeps its own bits."""
    big = np.array([2**64 - 1, 2**63, 5], dtype=np.uint64)
    t = pa.table({"h": pa.array(big), "l": pa.array([big.tolist()] * 3, pa.list_(pa.uint64()))})
    other = pa.table({"h": pa.array(big - np.uint64(1)), "l": pa.array([big.tolist()] * 3, pa.list_(pa.uint64()))})
    assert lineage.table_fingerprint(t) == lineage.table_fingerprint(t.slice(0))
    assert lineage.table_fingerprint(t) != lineage.table_fingerprint(other)


def test_changes_are_named():
    fp = lambda c: lineage.Fingerprint(method="columns", content=c)  # noqa: E731
    a = lineage.Lineage.of("train", {"labels": fp("a1b2c3d4e5")}, {"lr": 0.001, "freeze": "6"})
    b = lineage.Lineage.of("train", {"labels": fp("c3d4e5f6a7")}, {"lr": 0.003, "freeze": "6"})
    assert a.changes_from(a) == []
    assert b.changes_from(a) == ["labels changed (a1b2c3d4 -> c3d4e5f6)", "lr 0.001 -> 0.003"]


def test_a_record_of_an_older_dermray_is_compared_setting_by_setting():
    """Lineages recorded before every declared value was in them (format 1: a stage's hand-picked keys, unsectioned)
    are compared by the settings they recorded - "lr" is "train.lr" now - so an upgrade does not by itself retrain
    a fold or refuse an incremental scoring run; a setting they recorded that differs is still a change."""
    fp = lineage.Fingerprint(method="columns", content="a1b2c3d4e5")
    older = lineage.Lineage(**{**lineage.Lineage.of("train", {"labels": fp}, {"lr": 0.001, "fold": "0",
                                                                              "transforms": {"preprocess": {
                                                                                  "power": 6.0}}}).to_dict(),
                               "format": 1})
    now = lineage.Lineage.of("train", {"labels": fp}, {"train": {"lr": 0.001, "max_pixels": 5}, "fold": "0",
                                                       "transforms": {"color_constancy_power": 6.0}})
    assert now.format == lineage.FORMAT > older.format and now.id != older.id
    assert now.changes_from(older) == []
    changed = lineage.Lineage.of("train", {"labels": fp}, {"train": {"lr": 0.003}, "fold": "0"})
    assert changed.changes_from(older) == ["train.lr 0.001 -> 0.003"]
    other_rows = lineage.Lineage.of("train", {"labels": lineage.Fingerprint(method="columns", content="ffff0000")},
                                    {"train": {"lr": 0.001}, "fold": "0"})
    assert other_rows.changes_from(older) == ["labels changed (a1b2c3d4 -> ffff0000)"]
    # records of this format are compared key by key, as before
    fewer = lineage.Lineage.of("train", {"labels": fp}, {"train": {"lr": 0.001}, "fold": "0",
                                                         "transforms": {"color_constancy_power": 6.0}})
    assert fewer.changes_from(now) == ["train.max_pixels 5 -> '<unset>'"]


def test_a_worker_output_the_driver_cannot_see_is_an_error(tmp_path):
    """A file a Ray worker reports written but the driver cannot see (another node's disk, a lost write) fails the
    stage naming it (train's held-out predictions no longer travel through a file: the driver measures them)."""
    from dermray.stages.saliency.stage import check_written

    (tmp_path / "gradient").mkdir()
    (tmp_path / "gradient" / "a__t.png").write_bytes(b"png")
    (tmp_path / "gradient" / "a__t.npy").write_bytes(b"npy")
    index = pd.DataFrame({"png_uri": [str(tmp_path / "gradient" / "a__t.png"),
                                      str(tmp_path / "gradient" / "b__t.png")],
                          "npy_uri": [str(tmp_path / "gradient" / "a__t.npy"),
                                      str(tmp_path / "gradient" / "b__t.npy")]})
    check_written(index.head(1), str(tmp_path))
    with pytest.raises(RuntimeError, match=r"the map .*b__t\.png that an actor wrote is not visible to the driver"):
        check_written(index, str(tmp_path))


# ---- incremental scoring: an input row's hash (issue 27, finding 5) --------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["nv", "mel", None, ""]), st.one_of(st.none(), st.integers(0, 90)),
                          st.lists(st.integers(0, 3), max_size=2)), min_size=1, max_size=40),
       st.data())
def test_an_input_row_hash_changes_with_its_row_alone(rows, data):
    """The hash of a row covers its image_id and every column (null apart from empty, lists included), not the
    column order, the row's position or dermray's internal columns; it round-trips through its stored text."""
    from dermray.core import ids
    from dermray.stages.score.plan import hash_text, hash_values, row_hashes

    table = pa.table({"image_id": [f"I{i}" for i in range(len(rows))], "label": [r[0] for r in rows],
                      "age": pa.array([r[1] for r in rows], pa.int64()),
                      "tags": pa.array([r[2] for r in rows], pa.list_(pa.int64())), "row": list(range(len(rows)))})
    h = row_hashes(table)
    assert len(set(map(bytes, h.view(np.uint8).reshape(-1, 16)))) == len(rows)  # distinct image ids
    reordered = table.select(["tags", "age", "image_id", "label"]).append_column(
        "row", pa.array(range(100, 100 + len(rows)), pa.int64()))
    assert (row_hashes(reordered) == h).all()
    assert (hash_values(hash_text(h)) == h).all()
    i = data.draw(st.integers(0, len(rows) - 1))
    label = table.column("label").to_pylist()
    label[i] = {"nv": "mel", "mel": None, None: "", "": "nv"}[label[i]]
    changed = row_hashes(table.set_column(1, "label", pa.array(label, pa.string())))
    assert not ids.isin(changed[i:i + 1], np.sort(h[i:i + 1]))[0]
    assert (np.delete(changed, i) == np.delete(h, i)).all()
