import pandas as pd

from dermray import importers
from dermray.cli import main
from dermray.definitions import load_taxonomy
from dermray.definitions import load_tasks


def test_dx_map_points_at_real_isic_nodes():
    tax = importers.isic_taxonomy()
    dx = importers.ham10000_dx_map()
    assert set(dx) == {"mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"}
    assert all(node in tax.index for node in dx.values())
    # In the full ISIC taxonomy every HAM10000 code lands on an internal node (HAM10000 does not give subtypes).
    assert not any(tax.is_leaf(tax.index[node]) for node in dx.values())


def test_import_ham10000_real(ham_dir, tmp_path, capsys):
    out = tmp_path / "ham"
    assert main(["import", "ham10000", "--metadata", str(ham_dir / "labels.csv"), "--images",
                 str(ham_dir / "images"), "--output", str(out)]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    src = pd.read_csv(ham_dir / "labels.csv")
    assert len(m) == len(src) == 10015 and m["image_id"].is_unique
    assert (m["label_source"] == "biopsy").sum() == (src["dx_type"] == "histo").sum() == 5340
    assert m["group_id"].nunique() == src["lesion_id"].nunique()
    assert (m["modality"] == "dermoscopy").all()
    assert m["uri"].str.startswith(str(ham_dir / "images")).all()
    tax = load_taxonomy(str(out / "taxonomy.parquet"))
    assert m["label"].isin(tax.node_ids).all()
    tasks = load_tasks(str(out / "tasks.yaml"), tax)
    assert {t.name for t in tasks} >= {"melanoma_vs_nevus", "carcinoma_vs_benign_keratosis", "three_class"}
    assert "10015 rows = 10015 in the manifest + 0 quarantined" in capsys.readouterr().out


def test_import_ham10000_quarantines_unknown_codes_and_missing_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in ("A", "B"):
        (images / f"{i}.jpg").write_bytes(b"x")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": ["A", "B", "C"], "lesion_id": ["L1", "L1", "L2"], "dx": ["mel", "xyz", "nv"],
                  "dx_type": ["histo", "histo", "follow_up"]}).to_csv(csv, index=False)
    r = importers.import_ham10000(str(csv), str(images))
    assert list(r.manifest["image_id"]) == ["A"]
    reasons = dict(zip(r.quarantine["image_id"], r.quarantine["reason"]))
    assert "dx xyz is not a HAM10000 code" in reasons["B"]
    assert "image file not found" in reasons["C"]


def test_import_isic_metadata(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    for i in ("ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"):
        (images / f"{i}.jpg").write_bytes(b"x")
    csv = tmp_path / "metadata.csv"
    pd.DataFrame({
        "isic_id": ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"],
        "diagnosis_1": ["Malignant", "Benign", "Benign", None],
        "diagnosis_2": ["Malignant melanocytic proliferations (Melanoma)", "Benign melanocytic proliferations",
                        "Not a real level", None],
        "diagnosis_3": ["Melanoma Invasive", "Nevus", None, None],
        "diagnosis_confirm_type": ["histopathology", "serial imaging showing no change", None, None],
        "lesion_id": ["IL_1", None, "IL_3", "IL_4"],
        "patient_id": ["IP_1", "IP_2", "IP_3", "IP_4"],
        "image_type": ["dermoscopic", "clinical: close-up", "dermoscopic", "dermoscopic"],
    }).to_csv(csv, index=False)
    r = importers.import_isic(str(csv), str(images))
    m = r.manifest.set_index("image_id")
    assert m.loc["ISIC_1", "label"] == "Malignant:Malignant melanocytic proliferations (Melanoma):Melanoma Invasive"
    assert m.loc["ISIC_1", "label_source"] == "biopsy" and m.loc["ISIC_2", "label_source"] == "clinical"
    assert m.loc["ISIC_2", "modality"] == "clinical" and m.loc["ISIC_1", "modality"] == "dermoscopy"
    assert m.loc["ISIC_1", "group_id"] == "IL_1" and m.loc["ISIC_2", "group_id"] == "IP_2"  # lesion, else patient
    reasons = dict(zip(r.quarantine["image_id"], r.quarantine["reason"]))
    assert "is not in the ISIC taxonomy" in reasons["ISIC_3"] and reasons["ISIC_4"] == "no diagnosis given"
    assert importers.import_isic(str(csv), str(images), group="patient").manifest.set_index(
        "image_id").loc["ISIC_1", "group_id"] == "IP_1"


def test_import_missing_columns_is_a_user_error(tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": ["A"]}).to_csv(csv, index=False)
    assert main(["import", "ham10000", "--metadata", str(csv), "--images", str(tmp_path), "--output",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) lesion_id, dx, dx_type" in err and len(err.strip().splitlines()) == 1
