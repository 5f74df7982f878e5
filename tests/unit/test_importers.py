import pandas as pd

from dermray.apps import importers
from dermray.cli import main
from dermray.store.definitions import load_tasks, load_taxonomy

from helpers import write_image


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


# ---- images in any format; a hospital's folder + labels + mapping --------------------------------------------------
def test_import_isic_finds_png_bmp_tiff_and_quarantines_missing_or_ambiguous(tmp_path):
    images = tmp_path / "img"
    for i, (name, fmt) in enumerate([("ISIC_1.png", "PNG"), ("ISIC_2.BMP", "BMP"), ("part2/ISIC_3.tiff", "TIFF"),
                                     ("ISIC_5.jpg", "JPEG"), ("ISIC_5.png", "PNG"), ("ISIC_6.JPEG", "JPEG")]):
        write_image(images / name, fmt, seed=i)
    (images / "notes.txt").write_text("not an image")
    csv = tmp_path / "metadata.csv"
    node = ["Benign", "Benign melanocytic proliferations", "Nevus"]
    pd.DataFrame({"isic_id": ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4", "ISIC_5", "ISIC_6"],
                  **{f"diagnosis_{k + 1}": [node[k]] * 6 for k in range(3)}}).to_csv(csv, index=False)
    r = importers.import_isic(str(csv), str(images))
    uris = dict(zip(r.manifest["image_id"], r.manifest["uri"]))
    assert uris == {"ISIC_1": str(images / "ISIC_1.png"), "ISIC_2": str(images / "ISIC_2.BMP"),
                    "ISIC_3": str(images / "part2" / "ISIC_3.tiff"), "ISIC_6": str(images / "ISIC_6.JPEG")}
    reasons = dict(zip(r.quarantine["image_id"], r.quarantine["reason"]))
    assert reasons == {"ISIC_4": f"image file not found in {images}",
                       "ISIC_5": "more than one image file for this id: ISIC_5.jpg, ISIC_5.png"}
    assert list(r.quarantine["row"]) == [3, 4]


def test_import_ham10000_finds_a_png(tmp_path):
    write_image(tmp_path / "images" / "A.png", "PNG")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": ["A"], "lesion_id": ["L1"], "dx": ["nv"], "dx_type": ["histo"]}).to_csv(csv, index=False)
    r = importers.import_ham10000(str(csv), str(tmp_path / "images"))
    assert list(r.manifest["uri"]) == [str(tmp_path / "images" / "A.png")] and r.quarantine.empty


def test_import_folder_rules(tmp_path):
    """Duplicate labels rows (agreeing through the mapping, or not), an excluded label, an empty label, an unknown
    modality, an empty id; a YAML mapping; the columns found by their usual names."""
    import yaml

    for i, (name, fmt) in enumerate([("A.jpg", "JPEG"), ("B.png", "PNG"), ("C.bmp", "BMP"), ("D.tif", "TIFF"),
                                     ("E.webp", "WEBP"), ("F.png", "PNG")]):
        write_image(tmp_path / "img" / name, fmt, seed=i)
    pd.DataFrame({
        "image_id": ["A", "B", "B", "C", "C", "D", "E", "F", " "],
        "label": ["nevus", "Naevus", "nevus", "melanoma", "naevus", "unknown", "nevus", None, "nevus"],
        "patient_id": ["P1", "P2", "P2", "P3", "P3", "P4", "P5", "P6", "P7"],
        "Modality": ["dermoscopic", None, None, None, None, None, "x-ray", None, None],
    }).to_csv(tmp_path / "labels.csv", index=False)
    (tmp_path / "mapping.yaml").write_text(yaml.safe_dump({"mapping": {
        "Naevus": "Nevus", "nevus": "Benign:Benign melanocytic proliferations:Nevus", "melanoma": "Melanoma Invasive",
        "unknown": None}}))
    r = importers.import_folder(str(tmp_path / "img"), str(tmp_path / "labels.csv"), str(tmp_path / "mapping.yaml"))
    m = r.manifest.set_index("image_id")
    assert list(m.index) == ["A", "B"]
    assert (m["label"] == "Benign:Benign melanocytic proliferations:Nevus").all()
    assert list(m["label_raw"]) == ["nevus", "Naevus"] and list(m["group_id"]) == ["P1", "P2"]
    assert m.loc["A", "modality"] == "dermoscopy" and m["modality"].isna()["B"] and m["label_source"].isna().all()
    assert (m["source"] == "img").all()
    reasons = list(zip(r.quarantine["image_id"], r.quarantine["row"], r.quarantine["reason"]))
    assert reasons == [
        ("C", 3, "rows 3, 4 of labels.csv give different labels: 'melanoma', 'naevus'"),
        ("D", 5, "label 'unknown' is excluded by mapping.yaml (mapped to no node)"),
        ("E", 6, "modality 'x-ray' in labels.csv is neither clinical nor dermoscopy"),
        ("F", 7, "no label in column 'label' of labels.csv"),
        ("B", 2, "another row of labels.csv (row 1) labels this image_id"),
        ("C", 4, "another row of labels.csv (row 3) labels this image_id"),
        (None, 8, "image_id is empty"),
    ]
    s = importers.write_import(r, str(tmp_path / "out"))
    assert s["rows_in"] == s["images_found"] + s["labels_rows_unused"] == 6 + 3 == s["manifest_rows"] + s["quarantined"]


def test_import_folder_user_errors(tmp_path, capsys):
    write_image(tmp_path / "img" / "A.png", "PNG")
    (tmp_path / "empty").mkdir()
    pd.DataFrame({"image_id": ["A"], "diagnosis": ["naevus"]}).to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({"image_id": ["A"], "finding": ["naevus"]}).to_csv(tmp_path / "nolabel.csv", index=False)
    pd.DataFrame({"label": ["Naevus", "naevus "], "node": ["Nevus", "Melanoma Invasive"]}).to_csv(
        tmp_path / "twice.csv", index=False)
    pd.DataFrame({"label": ["naevus"], "node": ["mole"]}).to_csv(tmp_path / "mapping.csv", index=False)
    pd.DataFrame({"node_id": ["skin", "mole", "tumour"], "parent_id": [None, "skin", "skin"],
                  "name": ["skin", "mole", "tumour"]}).to_csv(tmp_path / "tiny.csv", index=False)

    def run(labels="labels.csv", mapping="mapping.csv", images="img", *extra):
        code = main(["import", "folder", "--images", str(tmp_path / images), "--labels", str(tmp_path / labels),
                     "--mapping", str(tmp_path / mapping), "--output", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    assert "twice.csv: label 'Naevus' is mapped to different nodes: 'Nevus', 'Melanoma Invasive'" in run(
        mapping="twice.csv")
    assert ("nolabel.csv: no label column (looked for label, diagnosis, dx; has: image_id, finding); name it with "
            "--label-column") in run(labels="nolabel.csv")
    assert "no column 'dx' for the label" in run("labels.csv", "mapping.csv", "img", "--label-column", "dx")
    assert "no image files (.jpg, .jpeg, .png" in run(images="empty")
    assert "the packaged HAM10000 tasks do not fit the taxonomy tiny.csv; give --tasks" in run(
        "labels.csv", "mapping.csv", "img", "--taxonomy", str(tmp_path / "tiny.csv"))
    (tmp_path / "tasks.yaml").write_text("tasks:\n  mole_vs_tumour:\n    classes: {mole: [mole], tumour: [tumour]}\n")
    assert main(["import", "folder", "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "labels.csv"),
                 "--mapping", str(tmp_path / "mapping.csv"), "--output", str(tmp_path / "out"), "--taxonomy",
                 str(tmp_path / "tiny.csv"), "--tasks", str(tmp_path / "tasks.yaml")]) == 0
    assert list(pd.read_parquet(tmp_path / "out" / "manifest.parquet")["label"]) == ["mole"]
    assert load_tasks(str(tmp_path / "out" / "tasks.yaml"), load_taxonomy(str(tmp_path / "out" / "taxonomy.parquet")))


def test_example_mapping_names_real_isic_nodes():
    m = importers.read_mapping(importers.packaged_file("example_label_mapping.csv"), importers.isic_taxonomy())
    assert len(m) >= 30 and m["key"].is_unique
    assert list(m.loc[m["problem"].notna(), "label"]) == ["unknown"]  # mapped to no node: excluded on purpose
