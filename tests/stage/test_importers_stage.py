"""The folder importer on real HAM10000 images in several formats, through the partition stage (in-process Ray)."""
import pandas as pd
import pytest

from dermray.cli import main

from helpers import FORMATS, HOSPITAL_NAMES, NODES, write_image


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
        write_image(d / "images" / rel, fmt, ham_dir / "images" / f"{r.image_id}.jpg")
        files[r.image_id] = d / "images" / rel
    write_image(d / "images" / "HOSP_0001.png", "PNG", ham_dir / "images" / f"{ham.image_id.iloc[-1]}.jpg")  # no row
    dup = picked.image_id[1]
    write_image(d / "images" / "zz_copies" / f"{dup}.bmp", "BMP", files[dup])  # the image_id is taken
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
