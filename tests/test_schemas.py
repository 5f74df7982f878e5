import pyarrow as pa
import pytest

from dermray import schemas
from dermray.errors import SchemaError


def test_manifest_columns_and_types():
    t = pa.table({"image_id": ["a"], "uri": ["u"], "label": ["l"], "modality": ["dermoscopy"], "extra": [1]})
    assert schemas.check_columns(t.schema, schemas.MANIFEST, "m.parquet") == ["modality"]
    with pytest.raises(SchemaError, match=r"m.parquet: manifest table is missing required column\(s\) label"):
        schemas.check_columns(t.drop_columns(["label"]).schema, schemas.MANIFEST, "m.parquet")
    with pytest.raises(SchemaError, match="column 'label' of the manifest table has type int64"):
        schemas.check_columns(t.set_column(2, "label", pa.array([1])).schema, schemas.MANIFEST, "m.parquet")


def test_closed_tables_refuse_extra_columns_and_bad_values():
    t = pa.table({"image_id": ["a", "b"], "class_index": pa.array([0, 1], pa.int32()), "fold": [0, 1], "x": [1, 2]})
    with pytest.raises(SchemaError, match="unexpected column"):
        schemas.check_columns(t.schema, schemas.LABELS, "labels.parquet")
    bad = pa.table({"image_id": ["a", None], "uri": ["u", "v"], "label": ["l", "l"],
                    "modality": ["dermoscopy", "xray"]})
    with pytest.raises(SchemaError, match=r"column 'image_id' is null at row\(s\) 1"):
        schemas.check_table(bad, schemas.MANIFEST, "m")
    with pytest.raises(SchemaError, match=r"column 'modality' is not one of clinical, dermoscopy at row\(s\) 1"):
        schemas.check_table(bad.set_column(0, "image_id", pa.array(["a", "b"])), schemas.MANIFEST, "m")


def test_every_table_has_an_arrow_schema():
    for table in schemas.ALL.values():
        assert table.arrow().names == table.required_names
        assert table.arrow().empty_table().num_rows == 0
