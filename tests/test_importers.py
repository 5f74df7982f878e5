import pandas as pd
import pytest

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


# ---- images in any format; a hospital's folder + labels + mapping --------------------------------------------------
def _image(path, fmt: str, source=None, seed: int = 0) -> None:
    """A real image file: ``source`` (a HAM10000 JPEG) re-encoded as ``fmt``, or a small noise image."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        with Image.open(source) as im:
            im.convert("RGB").save(path, format=fmt)
    else:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path, format=fmt)


def test_import_isic_finds_png_bmp_tiff_and_quarantines_missing_or_ambiguous(tmp_path):
    images = tmp_path / "img"
    for i, (name, fmt) in enumerate([("ISIC_1.png", "PNG"), ("ISIC_2.BMP", "BMP"), ("part2/ISIC_3.tiff", "TIFF"),
                                     ("ISIC_5.jpg", "JPEG"), ("ISIC_5.png", "PNG"), ("ISIC_6.JPEG", "JPEG")]):
        _image(images / name, fmt, seed=i)
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
    _image(tmp_path / "images" / "A.png", "PNG")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": ["A"], "lesion_id": ["L1"], "dx": ["nv"], "dx_type": ["histo"]}).to_csv(csv, index=False)
    r = importers.import_ham10000(str(csv), str(tmp_path / "images"))
    assert list(r.manifest["uri"]) == [str(tmp_path / "images" / "A.png")] and r.quarantine.empty


HOSPITAL_NAMES = {"nv": "Naevus", "mel": "Malignant melanoma", "bcc": "BCC", "bkl": "Seborrhoeic keratosis"}
NODES = {"nv": "Benign:Benign melanocytic proliferations:Nevus",
         "mel": "Malignant:Malignant melanocytic proliferations (Melanoma)",
         "bcc": "Malignant:Malignant adnexal epithelial proliferations - Follicular:Basal cell carcinoma",
         "bkl": "Benign:Benign epidermal proliferations"}
FORMATS = [("jpg", "JPEG"), ("png", "PNG"), ("bmp", "BMP"), ("tiff", "TIFF"), ("PNG", "PNG"), ("TIF", "TIFF")]


@pytest.fixture(scope="module")
def hospital(ham_dir, tmp_path_factory):
    """24 real HAM10000 images (6 each of nv, mel, bcc, bkl) as a hospital hands them over: JPEG, PNG, BMP and TIFF
    files (some upper-case extensions, some in a subfolder), a labels CSV in its own label names, and a mapping.
    Planted: 2 labels not in the mapping, 1 mapped to a node that does not exist, 1 image with no labels row,
    1 labels row with no image, 1 second file with an image_id already taken."""
    d = tmp_path_factory.mktemp("hospital")
    ham = pd.read_csv(ham_dir / "labels.csv")
    picked = pd.concat([ham[ham.dx == dx].head(6) for dx in HOSPITAL_NAMES]).reset_index(drop=True)
    files = {}
    for k, r in picked.iterrows():
        ext, fmt = FORMATS[k % len(FORMATS)]
        rel = f"{'2024-06/' if k % 3 == 0 else ''}{r.image_id}.{ext}"
        _image(d / "images" / rel, fmt, ham_dir / "images" / f"{r.image_id}.jpg")
        files[r.image_id] = d / "images" / rel
    _image(d / "images" / "HOSP_0001.png", "PNG", ham_dir / "images" / f"{ham.image_id.iloc[-1]}.jpg")  # no row
    dup = picked.image_id[1]
    _image(d / "images" / "zz_copies" / f"{dup}.bmp", "BMP", files[dup])  # the image_id is taken
    diagnosis = picked.dx.map(HOSPITAL_NAMES)
    nv = picked.index[picked.dx == "nv"]
    diagnosis[nv[0]], diagnosis[nv[1]] = "naevus, atypical", "  NAEVUS,   atypical "  # not in the mapping
    diagnosis[nv[2]] = "  naevus "  # in the mapping: labels are compared trimmed and case-folded
    bkl = picked.index[picked.dx == "bkl"]
    diagnosis[bkl[0]] = "lichenoid keratosis"  # mapped to a node that does not exist
    ids = picked.image_id.copy()
    ids[2] = f"{ids[2]}.jpg"  # a file name in the id column: the extension is dropped
    labels = pd.DataFrame({
        "image_id": list(ids) + ["HOSP_9999"], "diagnosis": list(diagnosis) + ["Naevus"],
        "lesion_id": list(picked.lesion_id) + ["L9"],
        "label_source": list(picked.dx_type.map({"histo": "Histopathology"}).fillna("clinical follow-up")) + [""],
        "age": list(picked.age.astype(str)) + ["50.0"], "site": list(picked.localization) + ["back"]})
    labels.to_csv(d / "labels.csv", index=False)
    pd.DataFrame({"label": ["Naevus", "malignant melanoma", "BCC", "Seborrhoeic keratosis", "lichenoid keratosis"],
                  "node": ["Nevus", NODES["mel"], "Basal cell carcinoma", NODES["bkl"], "Lichenoid keratosis"]}
                 ).to_csv(d / "mapping.csv", index=False)
    return {"dir": d, "ham_images": ham_dir / "images", "picked": picked, "files": files, "dup": dup,
            "nv": picked.image_id[nv], "bkl0": picked.image_id[bkl[0]]}


def test_import_folder_real_images(hospital, capsys):
    import numpy as np
    from PIL import Image

    d, picked = hospital["dir"], hospital["picked"]
    out = d / "in"
    assert main(["import", "folder", "--images", str(d / "images"), "--labels", str(d / "labels.csv"), "--mapping",
                 str(d / "mapping.csv"), "--output", str(out), "--modality", "dermoscopy", "--source", "Hospital A",
                 "--group-column", "lesion_id"]) == 0
    printed = capsys.readouterr().out
    m = pd.read_parquet(out / "manifest.parquet")
    q = pd.read_parquet(out / "quarantine.parquet")
    # Rows in: 26 image files + 1 labels row without an image = 21 in the manifest + 6 quarantined.
    assert "27 rows = 21 in the manifest + 6 quarantined (rows: 26 image files + 1 labels rows" in printed
    assert len(m) == 21 and len(q) == 6 and m["image_id"].is_unique
    bad = set(hospital["nv"][:2]) | {hospital["bkl0"]}
    expected = picked[~picked.image_id.isin(bad)].set_index("image_id")
    m = m.set_index("image_id")
    assert set(m.index) == set(expected.index)
    expected = expected.loc[m.index]
    assert (m["label"] == expected.dx.map(NODES)).all()
    assert (m["uri"] == pd.Series({i: str(hospital["files"][i]) for i in m.index})).all()
    assert (m["group_id"] == expected.lesion_id).all()
    assert (m["label_source"] == expected.dx_type.map({"histo": "biopsy"}).fillna("clinical")).all()
    assert (m["modality"] == "dermoscopy").all() and (m["source"] == "Hospital A").all()
    assert (m["diagnosis"].str.strip().str.lower().isin({n.lower() for n in HOSPITAL_NAMES.values()})).all()
    assert {"label_source_raw", "age", "site", "lesion_id"} <= set(m.columns)
    # The URIs are the real files, in the formats they were written in, with HAM10000's pixels where lossless.
    fmts = {}
    for image_id, uri in m["uri"].items():
        with Image.open(uri) as im:
            fmts[im.format] = fmts.get(im.format, 0) + 1
            if im.format != "JPEG":  # lossless: HAM10000's pixels exactly
                with Image.open(hospital["ham_images"] / f"{image_id}.jpg") as ham:
                    assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ham.convert("RGB")))
    assert set(fmts) == {"JPEG", "PNG", "BMP", "TIFF"}
    reasons = dict(zip(q["uri"].fillna(q["image_id"]), q["reason"]))
    nv0, nv1 = hospital["nv"][:2]
    assert reasons[str(hospital["files"][nv0])] == "label 'naevus, atypical' is not in the mapping mapping.csv"
    assert reasons[str(hospital["files"][nv1])] == "label 'NAEVUS,   atypical' is not in the mapping mapping.csv"
    assert reasons[str(hospital["files"][hospital["bkl0"]])] == (
        "label 'lichenoid keratosis' is mapped to 'Lichenoid keratosis' in mapping.csv, which is not a node of the "
        "taxonomy isic_diagnosis_nodes.csv")
    assert reasons[str(d / "images" / "HOSP_0001.png")] == "no row in labels.csv"
    dup = hospital["dup"]
    first = hospital["files"][dup].relative_to(d / "images")
    assert reasons[str(d / "images" / "zz_copies" / f"{dup}.bmp")] == (
        f"zz_copies/{dup}.bmp and {first} have the same image_id (file name without extension); {first} is used")
    assert reasons["HOSP_9999"] == f"image file not found in {d / 'images'}"
    assert q.set_index("image_id").loc["HOSP_9999", "row"] == 24
    assert "quarantined 1: label 'naevus, atypical' is not in the mapping mapping.csv" in printed
    # The outputs have the other importers' shape: the partition stage takes them as they are.
    assert main(["partition", "--manifest", str(out / "manifest.parquet"), "--taxonomy",
                 str(out / "taxonomy.parquet"), "--tasks", str(out / "tasks.yaml"), "--max-class-size", "8",
                 "--folds", "2", "--output", str(d / "out"), "--run-id", "r1"]) == 0
    part = pd.read_parquet(d / "out" / "partition" / "r1" / "labels.parquet")
    assert set(part["image_id"]) == set(m.index)
    assert pd.read_parquet(d / "out" / "partition" / "r1" / "quarantine.parquet").empty


def test_import_folder_rules(tmp_path):
    """Duplicate labels rows (agreeing through the mapping, or not), an excluded label, an empty label, an unknown
    modality, an empty id; a YAML mapping; the columns found by their usual names."""
    import yaml

    for i, (name, fmt) in enumerate([("A.jpg", "JPEG"), ("B.png", "PNG"), ("C.bmp", "BMP"), ("D.tif", "TIFF"),
                                     ("E.webp", "WEBP"), ("F.png", "PNG")]):
        _image(tmp_path / "img" / name, fmt, seed=i)
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


def test_import_folder_on_s3(s3_bucket, s3_server, tmp_path, capsys):
    """Images, labels and a YAML mapping under an S3 prefix; outputs written back to S3. The ISIC importer finds
    the same PNG/BMP objects."""
    import json

    import boto3

    from dermray import storage

    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    keys = {"S1": "hosp/images/S1.png", "S2": "hosp/images/sub/S2.BMP", "S3": "hosp/images/S3.jpeg"}
    for i, (image_id, key) in enumerate(keys.items()):
        fmt = {"png": "PNG", "bmp": "BMP", "jpeg": "JPEG"}[key.rsplit(".", 1)[1].lower()]
        _image(tmp_path / key, fmt, seed=i)
        client.upload_file(str(tmp_path / key), bucket, key)
    client.put_object(Bucket=bucket, Key="hosp/images-other/S9.png", Body=b"a neighbouring prefix, not listed")
    labels = "image_id,diagnosis,lesion_id,dx_type\nS1,mel,L1,histo\nS2,nv,L2,consensus\nS3,seb k,L3,histo\n"
    client.put_object(Bucket=bucket, Key="hosp/labels.csv", Body=labels.encode())
    client.put_object(Bucket=bucket, Key="hosp/mapping.yaml",
                      Body=b"mel: 'Malignant:Malignant melanocytic proliferations (Melanoma)'\nnv: Nevus\n")
    hosp = f"{s3_bucket}/hosp"
    assert main(["import", "folder", "--images", f"{hosp}/images/", "--labels", f"{hosp}/labels.csv", "--mapping",
                 f"{hosp}/mapping.yaml", "--output", f"{hosp}/in", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows_in"], summary["manifest_rows"], summary["quarantined"]) == (3, 2, 1)
    assert summary["unmapped_labels"] == {"seb k": 1}
    m = storage.read_table(f"{s3_bucket}/hosp/in/manifest.parquet").to_pandas().set_index("image_id")
    assert dict(m["uri"]) == {"S1": f"{s3_bucket}/{keys['S1']}", "S2": f"{s3_bucket}/{keys['S2']}"}
    assert dict(m["label_source"]) == {"S1": "biopsy", "S2": "clinical"} and (m["source"] == "images").all()
    q = storage.read_table(f"{s3_bucket}/hosp/in/quarantine.parquet").to_pandas()
    assert list(q["reason"]) == ["label 'seb k' is not in the mapping mapping.yaml"]
    assert list(q["uri"]) == [f"{s3_bucket}/{keys['S3']}"]
    meta = tmp_path / "isic.csv"
    pd.DataFrame({"isic_id": ["S1", "S2", "S4"], "diagnosis_1": ["Benign"] * 3}).to_csv(meta, index=False)
    r = importers.import_isic(str(meta), f"{s3_bucket}/hosp/images")
    assert dict(zip(r.manifest["image_id"], r.manifest["uri"])) == {
        "S1": f"{s3_bucket}/{keys['S1']}", "S2": f"{s3_bucket}/{keys['S2']}"}
    assert list(r.quarantine["reason"]) == [f"image file not found in {s3_bucket}/hosp/images"]


def test_import_folder_user_errors(tmp_path, capsys):
    _image(tmp_path / "img" / "A.png", "PNG")
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
