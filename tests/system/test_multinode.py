"""dermray on a real multi-node Ray cluster: a head and two worker nodes on this machine (each its own raylet,
object store and workers, offering {"trainer": 1, "scorer": 1}), S3 (the session's moto server) as the shared
storage, and worker nodes killed without grace (SIGKILL of the raylet and its workers) part-way through a stage.

The cluster and the stages run in one subprocess, tests/multinode_driver.py (this pytest process may hold the
session's in-process Ray, and a process joins one Ray cluster at most); it plays the scenarios one after another on
one cluster, a replacement node joining after each kill, and writes a JSON report that the tests below judge,
together with the outputs it left in S3. Figures (nodes, kills survived, seconds) are printed by the fixture.
"""

import numpy as np
import pytest

from dermray.store import storage

import early as runs


@pytest.fixture(scope="module")
def multinode(early, ham_dir, s3_steady, tmp_path_factory):
    """The driver's run (all scenarios; started at the session's start, in the background: tests/early.py): yields
    {"report", "bucket", "log", "rc"}. Every process the driver started has been killed by PID."""
    r = early.result("multinode", lambda env: runs.multinode(ham_dir, s3_steady, tmp_path_factory.mktemp("multinode"),
                                                             env))
    report = r["report"]
    assert report is not None, f"the driver wrote no report (exit {r['rc']}):\n{r['log'][-6000:]}"
    killed = report.get("nodes_killed", [])
    print(f"\nmultinode: {report.get('cluster', {}).get('nodes')} nodes at start (head + 2 workers), "
          f"{len(report.get('nodes_joined', []))} worker nodes joined in all, {len(killed)} killed without grace "
          f"({'; '.join(k['why'] for k in killed)}); seconds: {report.get('seconds')}; driver exit "
          f"{r['rc']} after {r['seconds']:.0f} s")
    return r


def scenario(multinode, name: str) -> dict:
    report = multinode["report"]
    assert name not in report["errors"], report["errors"][name]
    assert name in report["scenarios"], f"scenario {name} did not run:\n{multinode['log'][-4000:]}"
    return report["scenarios"][name]


def test_the_cluster_is_a_head_and_two_worker_nodes_offering_custom_resources(multinode):
    c = multinode["report"]["cluster"]
    assert c["nodes"] == 3
    r = c["resources"]
    assert r["CPU"] == 4 and r["trainer"] == 2 and r["scorer"] == 2  # the head offers no CPU: workers do the work
    assert multinode["rc"] == 0, multinode["log"][-4000:]


def test_partition_with_a_node_killed_mid_run_writes_the_tables_of_an_undisturbed_run(multinode):
    s = scenario(multinode, "partition")
    assert s["kill"] and s["killed_before_end"], s  # a node died while the stage's tasks ran on it
    assert s["kill_seen"]["title"].startswith("ray::"), s["kill_seen"]
    clean, killed = s["clean"], s["killed_run"]
    assert clean["input_rows"] == killed["input_rows"] == 300_000
    for key in ("assigned", "quarantined", "duplicates", "classes"):
        assert clean[key] == killed[key], key
    base = f"s3://{multinode['bucket']}/synth-out/partition"
    for table in ("labels", "training_classes", "quarantine", "fold_counts", "task_membership"):
        a = storage.read_table(f"{base}/clean/{table}.parquet")
        b = storage.read_table(f"{base}/killed/{table}.parquet")
        assert a.num_rows > 0 or table in ("task_membership",), table
        assert a.equals(b), f"{table} differs after the node was killed"


def test_two_folds_train_on_two_nodes_and_the_killed_node_s_fold_resumes_from_its_s3_checkpoint(multinode):
    s = scenario(multinode, "train")
    assert s["error"] is None, s["error"]
    first = {fold: places[0][1] for fold, places in s["placement"].items()}
    assert first["0"] != first["1"], s["placement"]  # one fold per node ({"trainer": 1} each)
    f0, f1 = s["per_fold"]
    assert f0["t_start"] < f1["t_end"] and f1["t_start"] < f0["t_end"], (f0, f1)  # concurrently
    assert s["kill"]["node"] == first["0"]  # fold 0's node was killed, inside epoch 1
    # Fold 0 came back on the surviving node (once fold 1 had freed its {"trainer": 1}) ...
    resumed = s["placement"]["0"][-1][1]
    assert len(s["placement"]["0"]) >= 2 and resumed == first["1"], s["placement"]
    # ... from its checkpoint in S3: epoch 0 was not trained again; the interrupted epoch 1 was, and was the last.
    assert s["events"]["0"] == [0, 1, 1], s["events"]
    assert s["events"]["1"] == [0, 1], s["events"]
    assert f0["epochs"] == f1["epochs"] == 2 and s["trained_on"] == 48 and s["quarantined"] == 0
    # The resumed fold's model (read back from S3) scores images.
    sc = s["fold0_scores"]
    assert sc["shape"][0] == 4 and np.allclose(sc["row_sums"], 1, atol=1e-4), sc
    keys = list(storage.list_files(f"s3://{multinode['bucket']}/out/train/mn-train/fold=0"))
    assert any("/checkpoint_" in k for k in keys) and any(k.endswith("model_card.json") for k in keys)


def test_a_node_loss_does_not_deadlock_the_surviving_node(multinode):
    s = scenario(multinode, "train")
    assert s["stall"] is None, s["stall"]


def test_scoring_with_a_node_killed_part_way_scores_every_image_exactly_once(multinode):
    s = scenario(multinode, "score")
    assert s["error"] is None, s["error"]
    assert s["kill"] and all(n >= 1 for n in s["actors_by_node_at_kill"].values()) and \
        len(s["actors_by_node_at_kill"]) == 2, s  # one model actor per node ({"scorer": 1}), one node killed
    summary = s["summary"]
    assert (summary["input"], summary["scored"], summary["quarantined"], summary["already_done"]) == (48, 48, 0, 0)
    assert summary["run_scored_total"] == 48 and summary["models"] == 2
    preds = storage.read_table(s["predictions"]).to_pandas()
    manifest = storage.read_table(f"s3://{multinode['bucket']}/in/manifest.parquet").to_pandas()
    assert len(preds) == 48 and preds["image_id"].is_unique
    assert set(preds["image_id"]) == set(manifest["image_id"])
    np.testing.assert_allclose(np.stack(preds["probs"]).sum(1), 1, atol=1e-4)
    assert s["stall"] is None, s["stall"]


def test_local_paths_are_refused_on_the_cluster_before_any_work_unless_declared_shared(multinode):
    s = scenario(multinode, "guard")
    assert s["nodes_alive"] >= 3
    for case in ("partition_local_output", "train_local_output", "score_local_output", "train_local_images",
                 "score_local_images", "evaluate_local_predictions"):
        r = s[case]
        assert r["type"] == "UserError" and r["error"], (case, r)
        assert "\n" not in r["error"] and "is a local path" in r["error"] and "nodes" in r["error"], (case, r)
        assert "shared_filesystem" in r["error"], (case, r)
    assert "image URI" in s["train_local_images"]["error"] and "image URI" in s["score_local_images"]["error"]
    assert "evaluate.predictions" in s["evaluate_local_predictions"]["error"]
    for case in ("partition_local_output", "score_local_output", "score_local_images", "evaluate_local_predictions"):
        assert s[case]["files_left"] == [], (case, s[case])
    shared = s["partition_shared_filesystem"]
    assert shared["error"] is None and shared["assigned"] == 48, shared
    assert {"partition/g/labels.parquet", "partition/g/training_classes.parquet"} <= set(shared["files"])


def test_a_refused_train_run_writes_nothing(multinode):
    s = scenario(multinode, "guard")
    assert s["train_local_output"]["files_left"] == [] and s["train_local_images"]["files_left"] == [], s
