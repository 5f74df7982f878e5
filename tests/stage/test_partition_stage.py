"""The partition stage end to end on a real in-process Ray: real HAM10000 metadata on the real ISIC taxonomy,
bad rows, a real S3 server, the CLI's exit codes."""
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dermray.cli import main
from dermray.runtime.config import load_config
from dermray.stages import partition
from dermray.store import storage


@pytest.fixture(scope="module")
def ham_import(ham_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ham_import")
    assert main(["import", "ham10000", "--metadata", str(ham_dir / "labels.csv"), "--images",
                 str(ham_dir / "images"), "--output", str(out)]) == 0
    return out


def run_partition(ray_local, manifest, taxonomy, output, tasks=None, **settings):
    # Near-duplicate detection reads every image (about 50 s for HAM10000's 10,015 on 2 cores): off in the tests
    # of other properties, on in its own test and in the stage contract suite.
    settings.setdefault("near_duplicates", "false")
    overrides = [f"data.manifest={manifest}", f"data.taxonomy={taxonomy}", f"output={output}"]
    if tasks:
        overrides.append(f"data.tasks={tasks}")
    overrides += [f"partition.{k}={v}" for k, v in settings.items()]
    return partition.run(load_config(None, overrides))


def read(output, name):
    return storage.read_table(storage.join(output, "partition", "default", f"{name}.parquet")).to_pandas()


def check_folds(labels: pd.DataFrame, manifest: pd.DataFrame, k: int):
    joined = labels.merge(manifest[["image_id", "group_id"]], on="image_id", validate="one_to_one")
    assert joined.groupby("group_id")["fold"].nunique().max() == 1, "a group spans two folds"
    assert set(labels["fold"]) <= set(range(k))
    return pd.crosstab(joined["class_index"], joined["fold"])


def test_ham10000_on_isic_taxonomy(ray_local, ham_import, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["partition", "--manifest", str(ham_import / "manifest.parquet"), "--taxonomy",
                 str(ham_import / "taxonomy.parquet"), "--tasks", str(ham_import / "tasks.yaml"),
                 "--max-class-size", "1000", "--folds", "5", "--seed", "7", "--output", str(out),
                 "--set", "partition.near_duplicates=false"]) == 0
    printed = capsys.readouterr().out
    assert "10015 input rows = 10015 assigned + 0 quarantined" in printed
    manifest = pd.read_parquet(ham_import / "manifest.parquet")
    classes = read(out, "training_classes")
    labels = read(out, "labels")
    assert classes["n_images"].sum() == len(labels) == len(manifest)
    assert sorted(labels["image_id"]) == sorted(manifest["image_id"])
    # nv (6705), mel (1113) and bkl (1099) sit at internal nodes and exceed the limit: node-only classes.
    node_only = set(classes.loc[classes["scope"] == "node", "node_id"])
    assert node_only == {"Benign:Benign melanocytic proliferations:Nevus",
                         "Malignant:Malignant melanocytic proliferations (Melanoma)",
                         "Benign:Benign epidermal proliferations"}
    table = check_folds(labels, manifest, 5)
    # Stratified: every class is spread over the folds within a few images of even.
    for ci, row in table.iterrows():
        n = classes.set_index("class_index").loc[ci, "n_images"]
        assert (row - n / 5).abs().max() <= max(3, 0.02 * n), (ci, row.tolist())
    membership = read(out, "task_membership")
    mel_nev = membership[membership["task"] == "melanoma_vs_nevus"]
    assert set(mel_nev["task_class"]) == {"melanoma", "nevus"}
    summary = json.loads((out / "partition" / "default" / "partition_summary.json").read_text())
    assert summary["input_rows"] == summary["assigned"] + summary["quarantined"] == 10015
    assert summary["unattributable"] == []


def test_thresholds_force_big_leaf_and_internal_node_classes(ray_local, ham_import, isic_taxonomy_csv, tmp_path):
    """The real ISIC taxonomy cut at depth 3 (a coarser tree, as some hospitals use): Nevus and Dermatofibroma
    become leaves, so with a low limit they are big leaves; melanoma images stay at an internal node."""
    nodes = pd.read_csv(isic_taxonomy_csv)
    cut = tmp_path / "taxonomy_depth3.csv"
    nodes.loc[nodes["depth"] <= 3, ["full_path"]].to_csv(cut, index=False)
    out = tmp_path / "out"
    s = run_partition(ray_local, ham_import / "manifest.parquet", cut, out, max_class_size=100, folds=3)
    classes = read(out, "training_classes").set_index("node_id")
    df_node = "Benign:Benign soft tissue proliferations - Fibro-histiocytic:Dermatofibroma"
    nv_node = "Benign:Benign melanocytic proliferations:Nevus"
    mel_node = "Malignant:Malignant melanocytic proliferations (Melanoma)"
    assert classes.loc[df_node, "n_images"] == 115 and classes.loc[df_node, "scope"] == "subtree"
    assert classes.loc[nv_node, "n_images"] == 6705
    assert classes.loc[mel_node, "scope"] == "node" and classes.loc[mel_node, "n_images"] == 1113
    assert s["big_leaf_classes"] >= 2 and s["assigned"] == 10015
    check_folds(read(out, "labels"), pd.read_parquet(ham_import / "manifest.parquet"), 3)


def test_same_seed_same_folds_and_rerun_replaces(ray_local, ham_import, tmp_path):
    out = tmp_path / "out"
    args = (ray_local, ham_import / "manifest.parquet", ham_import / "taxonomy.parquet", out)
    run_partition(*args, folds=4, seed=1)
    first = read(out, "labels")
    run_partition(*args, folds=4, seed=1)
    assert read(out, "labels").equals(first)
    assert sorted(os.listdir(out / "partition" / "default")) == sorted(
        ["training_classes.parquet", "labels.parquet", "quarantine.parquet", "task_membership.parquet",
         "fold_counts.parquet", "near_duplicates.parquet", "image_hashes.parquet", "partition_summary.json"])
    run_partition(*args, folds=4, seed=2)
    assert (read(out, "labels")["fold"] != first["fold"]).mean() > 0.5


def test_bad_rows_are_quarantined_and_nothing_is_lost(ray_local, tmp_path):
    from dermray.core.taxonomy import Taxonomy

    tax = Taxonomy.from_paths(["Benign:Nevus", "Benign:SK", "Malignant:Melanoma"])
    pq.write_table(tax.to_table(), tmp_path / "taxonomy.parquet")
    rows = []
    for i in range(60):
        rows.append({"image_id": f"img{i}", "uri": f"images/img{i}.jpg", "label": ["Benign:Nevus", "Benign:SK",
                     "Malignant:Melanoma"][i % 3], "group_id": f"L{i % 3}-{i // 6}", "modality": "dermoscopy"})
    rows += [
        {"image_id": "img5", "uri": "images/dup.jpg", "label": "Benign:SK", "group_id": "LX", "modality": None},
        {"image_id": "nolabel", "uri": "images/x.jpg", "label": None, "group_id": "LY", "modality": None},
        {"image_id": "unknown", "uri": "images/y.jpg", "label": "Eczema", "group_id": "LY", "modality": None},
        {"image_id": "nouri", "uri": "", "label": "Benign:SK", "group_id": "LY", "modality": None},
        {"image_id": None, "uri": "images/z.jpg", "label": "Benign:SK", "group_id": "LY", "modality": None},
        {"image_id": "badmod", "uri": "images/w.jpg", "label": "Benign:SK", "group_id": "LY", "modality": "xray"},
        # One lesion photographed twice and labelled differently: it must stay in one fold.
        {"image_id": "mixA", "uri": "images/ma.jpg", "label": "Benign:Nevus", "group_id": "MIX", "modality": None},
        {"image_id": "mixB", "uri": "images/mb.jpg", "label": "Malignant:Melanoma", "group_id": "MIX",
         "modality": None},
        {"image_id": "nogroup", "uri": "images/ng.jpg", "label": "Benign:SK", "group_id": None, "modality": None},
    ]
    manifest = pd.DataFrame(rows)
    # Small row groups: several map tasks, so duplicates and groups meet only in the reducers.
    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), tmp_path / "manifest.parquet",
                   row_group_size=7)
    out = tmp_path / "out"
    s = run_partition(ray_local, tmp_path / "manifest.parquet", tmp_path / "taxonomy.parquet", out,
                      max_class_size=10, folds=3)
    q = read(out, "quarantine").set_index("row")
    assert s["input_rows"] == len(manifest) == s["assigned"] + s["quarantined"]
    assert q.loc[60, "reason"] == "duplicate image_id (first seen at row 5)"
    assert q.loc[61, "reason"] == "label is null or empty"
    assert q.loc[62, "reason"] == "label 'Eczema' is not a taxonomy node"
    assert q.loc[63, "reason"] == "uri is null or empty"
    assert q.loc[64, "reason"] == "image_id is null or empty"
    assert q.loc[65, "reason"].startswith("modality must be one of")
    assert set(q["stage"]) == {"partition"} and len(q) == 6
    labels = read(out, "labels").set_index("image_id")
    assert labels.loc["mixA", "fold"] == labels.loc["mixB", "fold"]
    assert labels.loc["mixA", "class_index"] != labels.loc["mixB", "class_index"]
    assert s["groups_spanning_classes"] == 1 and "nogroup" in labels.index
    check_folds(labels.reset_index(), manifest.dropna(subset=["image_id"]).drop_duplicates("image_id")
                .fillna({"group_id": "nogroup-own"}), 3)


def test_s3_and_local_give_identical_tables(ray_local, ham_import, s3_bucket, tmp_path):
    for name in ("manifest.parquet", "taxonomy.parquet", "tasks.yaml"):
        storage.write_bytes(f"{s3_bucket}/in/{name}", (ham_import / name).read_bytes())
    local_out, s3_out = tmp_path / "local", f"{s3_bucket}/out"
    run_partition(ray_local, ham_import / "manifest.parquet", ham_import / "taxonomy.parquet", local_out,
                  ham_import / "tasks.yaml", max_class_size=500, folds=3)
    s = run_partition(ray_local, f"{s3_bucket}/in/manifest.parquet", f"{s3_bucket}/in/taxonomy.parquet", s3_out,
                      f"{s3_bucket}/in/tasks.yaml", max_class_size=500, folds=3)
    assert s["outputs"]["labels"].startswith("s3://")
    for name in ("training_classes", "labels", "quarantine", "task_membership", "fold_counts"):
        assert read(local_out, name).equals(read(s3_out, name)), name
    assert json.loads(storage.read_text(f"{s3_out}/partition/default/partition_summary.json"))["assigned"] == 10015


@pytest.mark.parametrize("case, fragment", [
    ("missing_column", "missing required column(s) label"),
    ("wrong_type", "column 'label' of the manifest table has type int64"),
    ("corrupt", "as Parquet"),
    ("absent", "no such file"),
    ("cycle", "cycle through node(s)"),
    ("bad_folds", "key 'partition.folds': input should be greater than or equal to 2, got 1"),
    ("unknown_key", "unknown key 'partition.fold'"),
])
def test_user_errors_exit_2_with_one_line(ray_local, tmp_path, capsys, case, fragment):
    from dermray.core.taxonomy import Taxonomy

    pq.write_table(Taxonomy.from_paths(["A:B"]).to_table(), tmp_path / "taxonomy.parquet")
    manifest = pd.DataFrame({"image_id": ["a"], "uri": ["a.jpg"], "label": ["A:B"]})
    m = tmp_path / "manifest.parquet"
    t = tmp_path / "taxonomy.parquet"
    extra = []
    if case == "missing_column":
        manifest = manifest.drop(columns=["label"])
    if case == "wrong_type":
        manifest["label"] = [3]
    manifest.to_parquet(m)
    if case == "corrupt":
        m.write_bytes(b"PAR1 garbage")
    if case == "absent":
        m = tmp_path / "nope.parquet"
    if case == "cycle":
        pq.write_table(pa.table({"node_id": ["r", "x", "y"], "parent_id": [None, "y", "x"],
                                 "name": ["r", "x", "y"]}), t)
    if case == "bad_folds":
        extra = ["--folds", "1"]
    if case == "unknown_key":
        extra = ["--set", "partition.fold=3"]
    code = main(["partition", "--manifest", str(m), "--taxonomy", str(t), "--output", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_near_duplicate_copies_under_other_ids_and_groups_land_in_one_fold(ray_local, ham_import, tmp_path):
    """Re-encoded, resized and slightly cropped copies of real images, planted under new image and lesion ids:
    the partition finds them (near_duplicates.parquet says they crossed groups) and puts each in its original's
    fold; different lesions stay apart."""

    from PIL import Image

    manifest = pd.read_parquet(ham_import / "manifest.parquet").sort_values("image_id").head(60)
    originals = manifest.head(4)
    rows = []
    for k, r in enumerate(originals.itertuples()):
        img = Image.open(r.uri).convert("RGB")
        w, h = img.size
        copies = {"reencoded": img, "resized": img.resize((int(w * 0.7), int(h * 0.7))),
                  "cropped": img.crop((int(0.04 * w), int(0.04 * h), w - int(0.04 * w), h - int(0.04 * h)))}
        for kind, im in copies.items():
            path = tmp_path / f"copy-{k}-{kind}.jpg"
            im.save(path, "JPEG", quality=60)
            rows.append(r._asdict() | {"image_id": f"copy-{k}-{kind}", "uri": str(path),
                                       "group_id": f"other-lesion-{k}-{kind}"})
    planted = pd.concat([manifest, pd.DataFrame(rows).drop(columns=["Index"])], ignore_index=True)
    planted.to_parquet(tmp_path / "manifest.parquet", index=False)
    out = tmp_path / "out"
    s = run_partition(ray_local, tmp_path / "manifest.parquet", ham_import / "taxonomy.parquet", out, folds=5,
                      max_class_size=1000, near_duplicates="true")
    labels = read(out, "labels").set_index("image_id")["fold"]
    for k, r in enumerate(originals.itertuples()):
        for kind in ("reencoded", "resized", "cropped"):
            assert labels[f"copy-{k}-{kind}"] == labels[r.image_id], (k, kind)
    pairs = read(out, "near_duplicates")
    planted_pairs = pairs[pairs.image_a.str.startswith("copy") | pairs.image_b.str.startswith("copy")]
    assert len(planted_pairs) >= 12 and planted_pairs.crossed_groups.all() and planted_pairs.merged.all()
    nd = s["near_duplicates"]
    assert nd["described"] == len(planted) and nd["images_regrouped"] >= 12
    # The 60 real images are 60 curated lesion ids: none of them merged with another.
    real = pairs[~pairs.image_a.str.startswith("copy") & ~pairs.image_b.str.startswith("copy")]
    assert (real.group_a == real.group_b).all(), real
