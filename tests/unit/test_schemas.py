import pyarrow as pa
import pytest

from dermray.errors import SchemaError
from dermray.store import schemas


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


def test_one_fold_cross_validation_renders_without_a_spread(tmp_path):
    """With one fold there is no spread: the card stores null (JSON has no NaN) and people read a dash, not a crash."""
    import json

    from dermray.apps import pipeline
    from dermray.runtime import artifacts
    from tests.helpers import write_fold

    classes = pa.table({"class_index": pa.array([0, 1], pa.int32()), "node_id": ["benign", "malignant"],
                        "name": ["benign", "malignant"], "scope": ["subtree", "subtree"]})
    write_fold(tmp_path / "fold=0", classes, seed=0)
    card = artifacts.read_card(str(tmp_path / "fold=0" / "model_card.json"))
    cv = [{"metric": "auc", "mean": 0.81, "sd": float("nan"), "folds": 1}]
    card = card.model_copy(update={"description": card.description | {"cross_validation": cv}})
    artifacts.write_card(artifacts.ModelCard.model_validate(card.model_dump()), str(tmp_path / "fold=0"))
    stored = json.loads((tmp_path / "fold=0" / "model_card.json").read_text())
    assert stored["description"]["cross_validation"][0]["sd"] is None
    assert "- auc: 0.810 +- — over 1 folds" in (tmp_path / "fold=0" / "model_card.md").read_text()
    # evaluate re-writes the card from its JSON (sd is null there now)
    artifacts.write_card(artifacts.read_card(str(tmp_path / "fold=0" / "model_card.json")), str(tmp_path / "fold=0"))
    assert "- auc: 0.810 +- — over 1 folds" in (tmp_path / "fold=0" / "model_card.md").read_text()
    summary = {"run_id": "r", "seconds": 1, "stages": [], "headline": [], "report": None, "saliency_gallery": None,
               "cross_validation": stored["description"]["cross_validation"]}
    assert "cross-validation" not in pipeline.format_summary(summary)  # on the cards and the report, not the console


def test_a_model_card_from_a_newer_dermray_or_with_a_bad_field_is_refused_naming_the_file(tmp_path):
    import json

    import pytest

    from dermray.errors import UserError
    from dermray.runtime import artifacts
    from tests.helpers import write_fold

    classes = pa.table({"class_index": pa.array([0, 1], pa.int32()), "node_id": ["benign", "malignant"],
                        "name": ["benign", "malignant"], "scope": ["subtree", "subtree"]})
    write_fold(tmp_path / "fold=0", classes, seed=0)
    path = tmp_path / "fold=0" / "model_card.json"
    good = json.loads(path.read_text())
    assert artifacts.read_card(str(path)).model_id == good["model_id"]
    path.write_text(json.dumps(good | {"schema_version": artifacts.CARD_SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match=r"model_card.json: model card schema_version \d+ is newer .* upgrade dermray"):
        artifacts.read_card(str(path))
    path.write_text(json.dumps(good | {"input_size": 2}))
    with pytest.raises(UserError, match="input_size"):
        artifacts.read_card(str(path))
    v1 = {k: v for k, v in good.items() if k != "schema_version"}  # version 1 cards (no field) are still read
    path.write_text(json.dumps(v1))
    assert artifacts.read_card(str(path)).model_id == good["model_id"]


def test_epochs_are_numbered_from_one_and_an_older_card_is_read_so(tmp_path):
    """Issue 29: the fold cards counted epochs from 0, the ensemble's card from 1. A version-2 card (epochs from 0)
    is read as version 3: its best epoch one higher, once."""
    import json

    from dermray.runtime import artifacts
    from tests.helpers import write_fold

    classes = pa.table({"class_index": pa.array([0, 1], pa.int32()), "node_id": ["benign", "malignant"],
                        "name": ["benign", "malignant"], "scope": ["subtree", "subtree"]})
    write_fold(tmp_path / "fold=0", classes, seed=0)
    path = tmp_path / "fold=0" / "model_card.json"
    card = json.loads(path.read_text())
    path.write_text(json.dumps(card | {"schema_version": 2, "best_epoch": 0}))
    read = artifacts.read_card(str(path))
    assert (read.best_epoch, read.schema_version) == (1, 3)
    artifacts.write_card(read, str(tmp_path / "fold=0"))
    assert artifacts.read_card(str(path)).best_epoch == 1  # written as version 3: not shifted again


def test_a_task_that_cannot_be_scored_is_on_every_card_with_its_reason(tmp_path):
    """Issue 28, finding 6: a binary task with a class that no training class lies under gets no locked point; the
    cards say so and why (and drop it when a later partition can score it)."""
    import json
    import pathlib

    import pandas as pd

    from dermray.runtime import layout
    from dermray.runtime.config import load_config
    from dermray.stages.train.decisions import write_decisions
    from tests.helpers import write_fold

    classes = pa.table({"class_index": pa.array([0, 1], pa.int32()), "node_id": ["benign", "malignant"],
                        "name": ["benign", "malignant"], "scope": ["subtree", "subtree"]})
    cfg = load_config(None, [f"output={tmp_path}", "run_id=r1"])
    fold = layout.fold_dir(str(tmp_path), "r1", 0)
    write_fold(pathlib.Path(fold), classes, seed=0)
    cv = pd.DataFrame([{"metric": "val_top1", "mean": 0.5, "sd": 0.1, "folds": 2}])
    why = "not estimable: no training class lies under task class melanoma of mel_vs_nev (the partition made none)"
    write_decisions(cfg, [0], None, [], cv, {"mel_vs_nev": why})
    stored = json.loads(open(f"{fold}/model_card.json").read())
    assert stored["description"]["not_estimable"] == {"mel_vs_nev": why}
    assert f"- mel_vs_nev: no operating point, {why}" in open(f"{fold}/model_card.md").read()
    write_decisions(cfg, [0], None, [], cv, {})
    assert "not_estimable" not in json.loads(open(f"{fold}/model_card.json").read())["description"]
