"""Train's inner epoch-selection split groups images as the partition finally grouped them (issue 28, finding 5):
an accepted near-duplicate pair that the partition merged across two lesions is never split between the images a
fold trains on and the images that choose its epoch."""
import pyarrow as pa
import pyarrow.parquet as pq

from dermray.runtime.config import load_config
from dermray.stages.train.data import split_rows
from dermray.stages.train.plan import read_rows
from dermray.store import schemas


def _partition(tmp_path, n_lesions: int = 200, merged_pairs: int = 40):
    """n_lesions lesions of two images each; ``merged_pairs`` near-duplicate pairs, each joining the first image of
    lesion 2k with the first image of lesion 2k+1 (different lesion ids: only the partition knows they are one)."""
    ids = [f"IMG_{lesion:04d}_{k}" for lesion in range(n_lesions) for k in range(2)]
    groups = [f"L{lesion:04d}" for lesion in range(n_lesions) for _ in range(2)]
    pq.write_table(pa.table({"image_id": ids, "uri": [f"images/{i}.jpg" for i in ids], "label": ["nv"] * len(ids),
                             "group_id": groups}), tmp_path / "manifest.parquet")
    part = tmp_path / "partition"
    part.mkdir()
    # Everything in fold 1: fold 0's training rows are all of them.
    pq.write_table(pa.table({"image_id": ids, "class_index": pa.array([i % 2 for i in range(len(ids))], pa.int32()),
                             "fold": pa.array([1] * len(ids), pa.int32())}), part / "labels.parquet")
    pq.write_table(pa.table({"class_index": pa.array([0, 1], pa.int32()), "node_id": ["nv", "mel"],
                             "name": ["nevus", "melanoma"], "n_images": pa.array([len(ids) // 2] * 2, pa.int64()),
                             "scope": ["subtree"] * 2}), part / "training_classes.parquet")
    pairs = [(f"IMG_{2 * k:04d}_0", f"IMG_{2 * k + 1:04d}_0", f"L{2 * k:04d}", f"L{2 * k + 1:04d}")
             for k in range(merged_pairs)]
    rows = [{"image_a": a, "image_b": b, "group_a": ga, "group_b": gb, "hamming": 2, "similarity": 0.99,
             "exact": False, "crossed_groups": True, "merged": True} for a, b, ga, gb in pairs]
    # A pair the component cap refused: not merged, so its lesions stay apart.
    rows.append({"image_a": "IMG_0198_1", "image_b": "IMG_0199_1", "group_a": "L0198", "group_b": "L0199",
                 "hamming": 2, "similarity": 0.99, "exact": False, "crossed_groups": True, "merged": False})
    pq.write_table(pa.Table.from_pylist(rows, schema=schemas.NEAR_DUPLICATES.arrow()), part / "near_duplicates.parquet")
    cfg = load_config(None, [f"data.manifest={tmp_path / 'manifest.parquet'}", f"output={tmp_path / 'out'}",
                             "train.selection_fraction=0.3"])
    return cfg, part, pairs


def test_the_inner_split_keeps_each_merged_near_duplicate_pair_on_one_side(tmp_path):
    cfg, part, pairs = _partition(tmp_path)
    table, _, fingerprints = read_rows(cfg, str(part))
    split = split_rows(0, table, cfg.train)
    side = {i: name for name, rows in split.items() for i in rows.column("image_id").to_pylist()}
    apart = [(a, b) for a, b, _, _ in pairs if side[a] != side[b]]
    assert not apart, f"{len(apart)} of {len(pairs)} merged near-duplicate pairs split between train and select"
    # The merged lesions move together, all their images; the lesions of a refused pair keep their own groups.
    group = dict(zip(table.column("image_id").to_pylist(), table.column("group").to_pylist()))
    assert group["IMG_0000_1"] == group["IMG_0001_1"] == group["IMG_0000_0"]
    assert group["IMG_0198_1"] != group["IMG_0199_1"] and group["IMG_0198_1"] == "L0198"
    assert {"select", "train"} <= set(split)


def test_the_split_groups_are_part_of_the_training_lineage(tmp_path):
    cfg, part, _ = _partition(tmp_path)
    _, _, before = read_rows(cfg, str(part))
    near = pq.read_table(part / "near_duplicates.parquet")
    pq.write_table(near.slice(1), part / "near_duplicates.parquet")  # one merge less
    _, _, after = read_rows(cfg, str(part))
    changed = [k for k in before if before[k] != after.get(k)]
    assert changed == ["selection_groups"], changed


def test_no_fold_model_trains_on_an_image_the_points_are_locked_on():
    """Issue 28, finding 1: the operating points are fitted on the ensemble's predictions of the images no fold
    model trained on (stages/train/decisions.py). For every set of folds trained - all of them, a subset, one - no
    fold's training rows hold such an image, and they are not empty."""
    import itertools

    import numpy as np

    from dermray.stages.train.data import never_trained

    rng = np.random.default_rng(0)
    n = 3000
    groups = [f"L{g:04d}" for g in rng.integers(0, 1200, n)]
    fold_of = {g: int(rng.integers(0, 5)) for g in set(groups)}  # lesion-grouped folds, as the partition cuts them
    table = pa.table({"image_id": [f"I{i}" for i in range(n)], "group": groups,
                      "fold": pa.array([fold_of[g] for g in groups], pa.int32())})
    cfg = load_config(None, ["train.selection_fraction=0.1"])
    for folds in ([0, 1, 2, 3, 4], [1, 3], [2]):
        mask = never_trained(table, cfg.train, [str(f) for f in folds])
        chosen = set(table.filter(pa.array(mask)).column("image_id").to_pylist())
        trained = set(itertools.chain.from_iterable(split_rows(f, table, cfg.train)["train"].column("image_id")
                                                    .to_pylist() for f in folds))
        assert chosen and not chosen & trained, folds
        # Every image left out of all the folds' training is found (the held-out ones with one fold).
        left_out = set(table.column("image_id").to_pylist()) - trained
        assert chosen == left_out or len(folds) > 1 and chosen <= left_out, folds


def _biopsy_study(n_biopsy_pos: int, seed: int = 0):
    """Locking predictions of a melanoma-vs-nevus task: biopsy-proven melanomas and nevi whose scores overlap (the
    nevi were cut out because they looked suspicious), and many nevi that were only followed up, scored low."""
    import types

    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    groups = [("biopsy", 1, n_biopsy_pos, 1.0), ("biopsy", 0, 150, 0.2), ("follow-up", 0, 600, -1.5)]
    rows = [(src, y, rng.normal(mu, 0.8)) for src, y, n, mu in groups for _ in range(n)]
    src, y, logit = (np.array(c) for c in zip(*rows))
    p_mel = 1 / (1 + np.exp(-logit.astype(float)))
    ids = [f"img{i:04d}" for i in range(len(y))]
    frame = pd.DataFrame({"image_id": ids, "class_index": y.astype(int),
                          "probs": list(np.stack([1 - p_mel, p_mel], 1))})
    table = pa.table({"image_id": ids, "label_source": src.tolist(),
                      "task_truth": pa.array([[int(v)] for v in y], pa.list_(pa.int64()))})
    plan = types.SimpleNamespace(table=table, task_names=["mel"])
    binary = [("mel", 0, 1, np.eye(2))]
    return plan, frame, binary, src == "biopsy", y


def test_the_operating_points_are_locked_on_the_biopsy_proven_images_evaluation_reports():
    """Issue 28: on HAM10000 the melanoma point locked on every image no model trained on gave specificity 0.736
    there and 0.476 on the biopsy-proven test split: the followed-up nevi are easy and set the threshold among
    them. With enough biopsy-proven images of each class, a task's points are locked on those; the temperature
    stays the one fitted on all."""
    import numpy as np

    from dermray.core import decisions, metrics
    from dermray.stages.train.decisions import _on_biopsy_proven

    plan, frame, binary, biopsy, y = _biopsy_study(60)
    probs = np.stack(frame["probs"])
    truth = np.array([[v] for v in y])
    _, on_all = decisions.lock(probs, y, truth, binary, 0.95, fit_temperature=False)
    points = [pt | {"chosen_on": "the images no model trained on"} for pt in on_all]
    relocked = _on_biopsy_proven(plan, frame, points, temperature=1.0, binary=binary, target_sensitivity=0.95,
                                 readers={})
    sens = {pt["name"]: pt for pt in relocked}["sens0.95"]
    assert "biopsy-proven" in sens["chosen_on"] and sens["n"] == int(biopsy.sum())
    # Its rates are those on the biopsy-proven images, where evaluation measures it ...
    rates = metrics.rates_at(y[biopsy], probs[biopsy, 1], sens["threshold"])
    assert abs(rates.specificity - sens["specificity"]) < 1e-9 and sens["sensitivity"] >= 0.95
    # ... where the point locked on every image would have called more of the excised nevi melanoma.
    before = {pt["name"]: pt for pt in on_all}["sens0.95"]
    assert metrics.rates_at(y[biopsy], probs[biopsy, 1], before["threshold"]).specificity < before["specificity"]
    # Too few biopsy-proven melanomas: the points stay as they were.
    plan, frame, binary, biopsy, y = _biopsy_study(5)
    _, on_all = decisions.lock(np.stack(frame["probs"]), y, np.array([[v] for v in y]), binary, 0.95,
                               fit_temperature=False)
    points = [pt | {"chosen_on": "x"} for pt in on_all]
    assert _on_biopsy_proven(plan, frame, points, temperature=1.0, binary=binary, target_sensitivity=0.95,
                             readers={}) == points
