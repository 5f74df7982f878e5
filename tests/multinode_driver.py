"""The driver of tests/system/test_multinode.py: a real multi-node Ray cluster on this machine, dermray stages run on it
with S3 (moto) as the shared storage, and worker nodes killed without grace at chosen moments.

It runs in its own process because the pytest process may already hold an in-process Ray (a process joins one Ray
cluster at most). The cluster is ``ray.cluster_utils.Cluster``: a head that offers no CPU (the driver, GCS and
Ray Train's controllers live there; it is never killed) and worker nodes of 2 CPUs each, every one its own raylet,
object store and worker processes, offering the custom resources {"trainer": 1, "scorer": 1}. A node is killed
with ``cluster.remove_node(node, allow_graceful=False)``: SIGKILL of its raylet, object store and agents, after
which its workers die too. The S3 endpoint and credentials come from this process's environment
(AWS_ENDPOINT_URL, ...), which the node processes inherit.

    python tests/multinode_driver.py --work DIR --bucket NAME --ham HAM10000_DIR --report report.json \
        [--scenarios partition,train,score,guard]

Scenarios (each records what happened in the report; tests/system/test_multinode.py judges it):
  guard      local output / local image URIs / local predictions (evaluate.distributed) refused on the cluster
             (UserError), unless storage.shared_filesystem
  partition  a 300k-row synthetic manifest partitioned undisturbed, then again with a node killed mid-run
  train      two folds on two nodes ({"trainer": 1} each); fold 0's node killed mid-epoch 1; fold 0 resumes
  score      score.actors=2, one per node ({"scorer": 1}); a node killed once the first part is written
Between scenarios a replacement node joins, so that every scenario starts with two worker nodes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

NODE_RESOURCES = {"trainer": 1, "scorer": 1}
HEAD_SYSTEM_CONFIG = {
    # A killed raylet is declared dead within ~3 s instead of ~15 s (the default health check).
    "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 3,
}
OBJECT_STORE = 200 * 2**20


def now() -> float:
    return time.time()


# ---- the cluster -------------------------------------------------------------------------------------------------
class MultiNode:
    """The cluster and its worker nodes by name (a, b, c, ... in the order they joined)."""

    def __init__(self):
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE,
            "_system_config": HEAD_SYSTEM_CONFIG})
        self.nodes: dict[str, object] = {}
        self.killed: list[dict] = []
        self.joined: list[str] = []
        for _ in range(2):
            self.add()
        ray.init(address=self.cluster.address, logging_level=logging.ERROR, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "dermray.runtime.raysession.quiet_embedded_workers"})

    def add(self) -> str:
        name = chr(ord("a") + len(self.joined))
        self.nodes[name] = self.cluster.add_node(num_cpus=2, resources=dict(NODE_RESOURCES),
                                                 object_store_memory=OBJECT_STORE)
        self.joined.append(name)
        return name

    def alive(self) -> list[str]:
        return list(self.nodes)

    def ensure_two(self) -> None:
        """A replacement node joins when a scenario killed one, and the cluster sees it before we go on."""
        import ray

        while len(self.nodes) < 2:
            self.add()
        deadline = now() + 60
        while sum(1 for n in ray.nodes() if n["Alive"]) != 1 + len(self.nodes) and now() < deadline:
            time.sleep(0.2)

    @staticmethod
    def raylet_pid(node) -> int:
        from ray._private import ray_constants

        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    def node_of_pid(self, pid: int) -> str | None:
        """The worker node whose raylet is an ancestor of ``pid`` (Ray workers are the raylet's children)."""
        import psutil

        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.NoSuchProcess:
            return None
        return next((name for name, node in self.nodes.items() if self.raylet_pid(node) in ancestors), None)

    def processes(self, name: str, title: str) -> list[int]:
        """PIDs of node ``name``'s worker processes whose title contains ``title`` (e.g. "ray::pass1")."""
        import psutil

        out = []
        node = self.nodes.get(name)  # None once a watcher thread has killed it
        if node is None:
            return out
        try:
            for p in psutil.Process(self.raylet_pid(node)).children(recursive=True):
                try:
                    if any(title in c for c in p.cmdline()):
                        out.append(p.pid)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return out

    def kill(self, name: str, why: str) -> dict:
        node = self.nodes.pop(name)
        t = now()
        self.cluster.remove_node(node, allow_graceful=False)
        event = {"node": name, "node_id": node.node_id, "why": why, "t": t}
        self.killed.append(event)
        print(f"multinode: killed node {name} ({why})", flush=True)
        return event

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


class Watcher(threading.Thread):
    """Polls ``condition()`` until it returns a truthy value, then calls ``action(value)`` once."""

    def __init__(self, condition, action, timeout_s: float = 300, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.condition, self.action, self.timeout_s, self.every_s = condition, action, timeout_s, every_s
        self.result, self.error, self._halt = None, None, threading.Event()

    def run(self) -> None:
        deadline = now() + self.timeout_s
        try:
            while not self._halt.is_set() and now() < deadline:
                value = self.condition()
                if value:
                    self.result = self.action(value)
                    return
                time.sleep(self.every_s)
        except Exception:  # noqa: BLE001 - reported, not raised in a thread
            self.error = traceback.format_exc()

    def stop(self) -> None:
        self._halt.set()


_CLIENT = []


def s3_client():
    """One boto3 client (thread-safe) for the polling."""
    if not _CLIENT:
        import boto3

        _CLIENT.append(boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]))
    return _CLIENT[0]


def s3_keys(bucket: str, prefix: str) -> list[str]:
    resp = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


def user_error(fn) -> dict:
    """{"error": the one-line UserError message, "type"} of ``fn()``, or {"error": None, "result"}."""
    from dermray.errors import UserError

    try:
        return {"error": None, "result": fn()}
    except UserError as e:
        return {"error": str(e), "type": type(e).__name__}


def listing(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs) \
        if os.path.exists(path) else []


# ---- inputs ------------------------------------------------------------------------------------------------------
def prepare_study(ham: str, bucket: str, work: str, per_dx: int) -> dict:
    """``per_dx`` real HAM10000 images of four diagnoses, uploaded to S3, imported (manifest with s3:// URIs)."""
    from dermray.apps import importers

    labels = pd.read_csv(os.path.join(ham, "labels.csv"))
    subset = pd.concat([labels[labels.dx == dx].head(per_dx) for dx in ("nv", "mel", "bkl", "bcc")])
    os.makedirs(work, exist_ok=True)
    subset.to_csv(os.path.join(work, "labels.csv"), index=False)
    client = s3_client()
    for image_id in subset.image_id:
        with open(os.path.join(ham, "images", f"{image_id}.jpg"), "rb") as f:
            client.put_object(Bucket=bucket, Key=f"images/{image_id}.jpg", Body=f.read())
    result = importers.import_ham10000(os.path.join(work, "labels.csv"), f"s3://{bucket}/images")
    out = importers.write_import(result, f"s3://{bucket}/in")
    # The same manifest with local image URIs (for the guard).
    local = result.manifest.assign(uri=[os.path.join(ham, "images", f"{i}.jpg") for i in result.manifest.image_id])
    local_uri = f"s3://{bucket}/in/manifest_local_uris.parquet"
    from dermray.store import storage

    storage.write_table(pa.Table.from_pandas(local, preserve_index=False), local_uri)
    return {"images": len(result.manifest), "manifest": out["outputs"]["manifest"],
            "taxonomy": out["outputs"]["taxonomy"], "tasks": out["outputs"]["tasks"],
            "manifest_local_uris": local_uri}


def synthetic_manifest(uri: str, rows: int, seed: int = 0) -> dict:
    """A manifest of ``rows`` rows over the ISIC taxonomy (image files are never read by partition): lesions of
    1-3 images, a few repeated ids and unknown labels (quarantined), row groups of 10k rows (parallel chunks)."""
    from dermray.apps import importers
    from dermray.store import storage

    tax = importers.isic_taxonomy()
    rng = np.random.default_rng(seed)
    nodes = np.array(tax.node_ids)
    weights = 1.0 / np.arange(1, len(nodes) + 1) ** 0.8
    labels = nodes[rng.choice(len(nodes), rows, p=weights / weights.sum())]
    group = np.cumsum(rng.random(rows) < 0.6)  # runs of 1-3 rows share a lesion
    ids = np.array([f"SYN_{i:07d}" for i in range(rows)], dtype=object)
    dup = rng.choice(rows, 200, replace=False)
    ids[dup[:100]] = ids[dup[100:]]  # 100 repeated image ids
    labels = labels.astype(object)
    labels[rng.choice(rows, 50, replace=False)] = "not-a-node"
    table = pa.table({"image_id": pa.array(ids, pa.string()),
                      "uri": pa.array([f"s3://nowhere/{i}.jpg" for i in ids], pa.string()),
                      "label": pa.array(labels, pa.string()),
                      "group_id": pa.array([f"L{g:07d}" for g in group], pa.string()),
                      "label_source": pa.array(np.where(rng.random(rows) < 0.5, "biopsy", "clinical"), pa.string()),
                      "modality": pa.array(["dermoscopy"] * rows, pa.string())})
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=10_000, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())
    taxonomy_uri = storage.join(storage.parent(uri), "taxonomy.parquet")
    storage.write_table(tax.to_table(), taxonomy_uri)
    return {"manifest": uri, "taxonomy": taxonomy_uri, "rows": rows}


def cfg(*overrides):
    from dermray.runtime.config import load_config

    return load_config(None, list(overrides))


def partition_keys(*overrides) -> list[str]:
    """Partition overrides; the near-duplicate search (which reads every image) is off where the config has it:
    these runs are about nodes dying, and the synthetic manifest's images do not exist."""
    from dermray.runtime.config import PartitionConfig

    extra = ["partition.near_duplicates=false"] if "near_duplicates" in PartitionConfig.model_fields else []
    return [*overrides, *extra]


def set_faults(**kw) -> None:
    from dermray.runtime import faults

    if kw:
        os.environ[faults.ENV] = json.dumps(kw)
    else:
        os.environ.pop(faults.ENV, None)


# ---- scenarios ---------------------------------------------------------------------------------------------------
def scenario_guard(mn: MultiNode, ctx: dict) -> dict:
    from dermray.stages import evaluate, partition, score, train

    study, bucket, work = ctx["study"], ctx["bucket"], ctx["work"]
    local_out = os.path.join(work, "guard-local-out")
    part = partition_keys(f"data.manifest={study['manifest']}", f"data.taxonomy={study['taxonomy']}",
                          "partition.max_class_size=8", "partition.folds=2")
    tr = [f"data.manifest={study['manifest']}", "train.arch=mobilenet_v3_small", "train.weights=none",
          "train.image_size=32", "train.epochs=1", f"train.partition={ctx['partition']}"]
    sc = [f"score.input={study['manifest']}", f"score.checkpoints={ctx['fold_models']}"]
    out = {"nodes_alive": 1 + len(mn.nodes)}
    t0 = now()
    out["partition_local_output"] = user_error(lambda: partition.run(cfg(*part, f"output={local_out}/p",
                                                                         "run_id=g")))
    out["partition_local_output"]["files_left"] = listing(f"{local_out}/p")
    out["train_local_output"] = user_error(lambda: train.run(cfg(*tr, f"output={local_out}/t", "run_id=g")))
    out["train_local_output"]["files_left"] = listing(f"{local_out}/t")
    out["score_local_output"] = user_error(lambda: score.run(cfg(*sc, f"output={local_out}/s", "run_id=g")))
    out["score_local_output"]["files_left"] = listing(f"{local_out}/s")
    s3_out = f"s3://{bucket}/guard"
    out["train_local_images"] = user_error(lambda: train.run(cfg(
        *[t.replace(study["manifest"], study["manifest_local_uris"]) for t in tr], f"output={s3_out}",
        "run_id=gi")))
    out["train_local_images"]["files_left"] = s3_keys(bucket, "guard/train/gi/")
    out["score_local_images"] = user_error(lambda: score.run(cfg(
        f"score.input={study['manifest_local_uris']}", f"score.checkpoints={ctx['fold_models']}",
        f"output={s3_out}", "run_id=gi")))
    out["score_local_images"]["files_left"] = s3_keys(bucket, "guard/predictions/gi/")
    local_preds = os.path.join(work, "guard-local-predictions")
    os.makedirs(local_preds, exist_ok=True)
    out["evaluate_local_predictions"] = user_error(lambda: evaluate.run(cfg(
        f"evaluate.predictions={local_preds}", "evaluate.distributed=true", f"evaluate.partition={ctx['partition']}",
        f"data.taxonomy={study['taxonomy']}", f"data.tasks={study['tasks']}", f"output={s3_out}", "run_id=ge")))
    out["evaluate_local_predictions"]["files_left"] = s3_keys(bucket, "guard/evaluate/ge/")
    out["refusals_s"] = round(now() - t0, 1)
    # Declared shared (every node mounts it: here they all share this machine's disk), a local output is used.
    t1 = now()
    r = user_error(lambda: partition.run(cfg(*part, f"output={local_out}/shared", "run_id=g",
                                             "storage.shared_filesystem=true")))
    out["partition_shared_filesystem"] = {"error": r["error"], "assigned": (r.get("result") or {}).get("assigned"),
                                          "files": listing(f"{local_out}/shared"), "seconds": round(now() - t1, 1)}
    return out


def run_partition(ctx: dict, run_id: str) -> dict:
    from dermray.stages import partition

    syn = ctx["synthetic"]
    t0 = now()
    s = partition.run(cfg(*partition_keys(
        f"data.manifest={syn['manifest']}", f"data.taxonomy={syn['taxonomy']}", f"output=s3://{ctx['bucket']}/synth-out",
        f"run_id={run_id}", "partition.max_class_size=5000", "partition.folds=3")))
    return {"t_start": t0, "t_end": now(), "seconds": round(now() - t0, 1), "assigned": s["assigned"],
            "quarantined": s["quarantined"], "duplicates": s["duplicates"], "classes": s["training_classes"],
            "chunks": s["chunks"], "input_rows": s["input_rows"]}


PARTITION_TASKS = ("ray::pass1", "ray::pass2", "ray::dup_reduce", "ray::group_reduce")


def scenario_partition(mn: MultiNode, ctx: dict) -> dict:
    out = {"clean": run_partition(ctx, "clean")}
    victim = mn.alive()[0]
    seen = {}

    def busy():
        for title in PARTITION_TASKS:
            pids = mn.processes(victim, title)
            if pids:
                seen.update(title=title, pids=pids)
                return title
        return None

    w = Watcher(busy, lambda title: mn.kill(victim, f"partition: running {title}"), timeout_s=300, every_s=0.02)
    w.start()
    out["killed_run"] = run_partition(ctx, "killed")
    w.stop()
    w.join(5)
    out["kill"] = w.result
    out["kill_seen"] = seen
    out["watcher_error"] = w.error
    if w.result:
        out["kill_at_s"] = round(w.result["t"] - out["killed_run"]["t_start"], 2)
        out["killed_before_end"] = w.result["t"] < out["killed_run"]["t_end"]
    return out


def train_config(ctx: dict, run_id: str, *extra):
    study = ctx["study"]
    return cfg(f"data.manifest={study['manifest']}", f"output=s3://{ctx['bucket']}/out", f"run_id={run_id}",
               f"train.partition={ctx['partition']}", "train.arch=mobilenet_v3_small", "train.weights=none",
               "train.image_size=32", "train.batch_size=8", "train.epochs=2", "train.cpus_per_worker=1",
               "train.data_cpus=0.5", "train.max_failures=2", "train.worker_resources={trainer: 1}", *extra)


def read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


def run_stage(mn: MultiNode, fn, progress, stall_s: float, timeout_s: float) -> dict:
    """``fn()`` in a thread, watched: when ``progress()`` (any comparable state) has not changed for ``stall_s``
    while the cluster has less than half a CPU free, the stage is stalled - a replacement node joins (what an
    autoscaler would do), once, and the stall is recorded. Returns {"result" | "error", "stall", "seconds"}."""
    import ray

    out: dict = {"stall": None}

    def target():
        try:
            out["result"] = fn()
        except BaseException:  # noqa: BLE001 - reported
            out["error"] = traceback.format_exc()

    t0 = now()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    last, since, shown = None, now(), now()
    while thread.is_alive():
        thread.join(0.5)
        state = progress()
        free = ray.available_resources().get("CPU", 0.0)
        if now() - shown > 5:  # where the time goes, in the driver's log
            shown = now()
            busy = {name: [t for t in ("RayTrainWorker", "measure_held_out", "MapWorker", "find_undecodable",
                                       "decode") if mn.processes(name, t)] for name in mn.alive()}
            free_now = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "trainer", "scorer")}
            print(f"multinode: {now() - t0:5.1f} s into the stage: free {free_now}; running {busy}", flush=True)
        if state != last or free >= 0.5:
            last, since = state, now()
        elif out["stall"] is None and now() - since > stall_s:
            titles = {name: [t for t in ("RayTrainWorker", "measure_held_out", "MapWorker(MapBatches(Predictor))")
                             if mn.processes(name, t)] for name in mn.alive()}
            out["stall"] = {"t": now(), "after_s": round(now() - t0, 1), "no_progress_s": round(now() - since, 1),
                            "cpu_free": free, "processes": titles, "replacement": mn.add()}
            print(f"multinode: stalled {out['stall']['no_progress_s']} s with {free} CPU free ({titles}): a "
                  f"replacement node joined", flush=True)
        if now() - t0 > timeout_s:
            out["error"] = f"did not finish in {timeout_s} s"
            break
    out["seconds"] = round(now() - t0, 1)
    return out


def scenario_train(mn: MultiNode, ctx: dict) -> dict:
    from dermray.stages import train

    work, bucket, run_id = ctx["work"], ctx["bucket"], "mn-train"
    pid_file, events_file = os.path.join(work, "pid-{fold}"), os.path.join(work, "events-{fold}")
    set_faults(slow_batch_s=ctx["train_slow_batch_s"], pid_file=pid_file, events_file=events_file)
    snapshot_key = f"out/train/{run_id}/fold=0/checkpoint_manager_snapshot.json"
    placement: dict[str, list] = {"0": [], "1": []}
    client = s3_client()

    def where() -> None:
        for fold in ("0", "1"):
            pid = read_lines(pid_file.format(fold=fold))
            if pid and (not placement[fold] or placement[fold][-1][0] != int(pid[0])):
                node = mn.node_of_pid(int(pid[0]))
                if node:
                    placement[fold].append((int(pid[0]), node, round(now(), 2)))

    def ready():
        # Fold 0 inside epoch 1, once Ray Train registered epoch 0's checkpoint (in S3).
        where()
        if "1" not in read_lines(events_file.format(fold=0)) or not placement["0"]:
            return None
        try:
            snap = json.loads(client.get_object(Bucket=bucket, Key=snapshot_key)["Body"].read())
            registered = len(snap.get("checkpoint_results", []))
        except Exception:  # noqa: BLE001 - not written yet
            registered = 0
        return placement["0"][-1][1] if registered >= 1 else None

    w = Watcher(ready, lambda node: mn.kill(node, "train: fold 0 inside epoch 1"), timeout_s=400, every_s=0.1)
    w.start()

    def progress():
        where()
        return (tuple(read_lines(events_file.format(fold=0))), tuple(read_lines(events_file.format(fold=1))),
                len(s3_keys(bucket, f"out/train/{run_id}/")))

    try:
        run = run_stage(mn, lambda: train.run(train_config(ctx, run_id)), progress, ctx["stall_s"], 400)
    finally:
        w.stop()
        set_faults()
    where()
    s = run.get("result") or {}
    out = {"seconds": run["seconds"], "error": run.get("error"), "stall": run["stall"], "kill": w.result,
           "watcher_error": w.error, "placement": placement, "per_fold": s.get("per_fold"),
           "events": {f: [int(x) for x in read_lines(events_file.format(fold=f))] for f in ("0", "1")},
           "trained_on": s.get("trained_on"), "quarantined": s.get("quarantined")}
    if run.get("error"):
        return out
    # The resumed fold's model scores real images (loaded from S3 as `dermray score` would).
    from dermray.core.transforms import decode_image, eval_transform
    from dermray.runtime import artifacts
    from dermray.stages.score.actors import Predictor
    from dermray.store import storage

    ens = artifacts.load_ensemble([f"s3://{bucket}/out/train/{run_id}/fold=0"])
    uris = storage.read_table(ctx["study"]["manifest"], columns=["uri"]).column("uri").to_pylist()[:4]
    images = np.stack([np.asarray(eval_transform(decode_image(storage.read_bytes(u)), ens.size)) for u in uris])
    probs = Predictor(ens, 1, channels_last=True, tta="none", use_gpu=False)(
        {"image": images, "error": np.array([""] * 4, dtype=object)})["probs"]
    out["fold0_scores"] = {"shape": list(probs.shape), "row_sums": probs.sum(1).round(5).tolist(),
                           "model_id": ens.model_id, "input_size": ens.size}
    return out


def scenario_score(mn: MultiNode, ctx: dict) -> dict:
    from dermray.stages import score

    bucket, run_id = ctx["bucket"], "mn-score"
    set_faults(slow_batch_s=ctx["score_slow_batch_s"])
    prefix = f"out/predictions/{run_id}/predictions/part-"
    actors_by_node: dict[str, int] = {}
    at_kill: dict[str, int] = {}

    def first_part():
        for name in mn.alive():
            actors_by_node[name] = len(mn.processes(name, "MapWorker(MapBatches(Predictor))"))
        if not s3_keys(bucket, prefix):
            return None
        hosts = [n for n, k in actors_by_node.items() if k]
        at_kill.update(actors_by_node)
        return hosts[0] if hosts else None

    w = Watcher(first_part, lambda node: mn.kill(node, "score: first part written"), timeout_s=400, every_s=0.1)
    w.start()
    try:
        run = run_stage(mn, lambda: score.run(cfg(
            f"score.input={ctx['study']['manifest']}", f"score.checkpoints={ctx['train_run']}",
            f"output=s3://{bucket}/out", f"run_id={run_id}", "score.batch_size=4", "score.rows_per_file=8",
            "score.actors=2", "score.actor_resources={scorer: 1}", "score.cpus_per_actor=1",
            "score.decode_cpus=0.5")), lambda: len(s3_keys(bucket, prefix)), ctx["stall_s"], 300)
    finally:
        w.stop()
        set_faults()
    s = run.get("result") or {}
    return {"seconds": run["seconds"], "kill": w.result, "watcher_error": w.error, "error": run.get("error"),
            "stall": run["stall"], "actors_by_node_at_kill": at_kill,
            "summary": {k: s.get(k) for k in ("input", "scored", "quarantined", "already_done", "files_written",
                                              "run_scored_total", "models")},
            "predictions": f"s3://{bucket}/out/predictions/{run_id}/predictions"}


SCENARIOS = {"guard": scenario_guard, "partition": scenario_partition, "train": scenario_train,
             "score": scenario_score}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--ham", required=True)
    p.add_argument("--report", required=True)
    # guard scores with the trained models: it comes after train
    p.add_argument("--scenarios", default="partition,train,score,guard")
    p.add_argument("--per-dx", type=int, default=12)
    p.add_argument("--synthetic-rows", type=int, default=300_000)
    p.add_argument("--train-slow-batch-s", type=float, default=1.0)
    p.add_argument("--score-slow-batch-s", type=float, default=0.5)
    # No progress for this long with the cluster's CPUs taken is a stall. 60 s, not less: the driver runs while
    # the rest of the suite shares the machine's two cores (tests/early.py), and a slowed step is not a stall.
    p.add_argument("--stall-s", type=float, default=60.0)
    a = p.parse_args(argv)
    scenarios = [s for s in a.scenarios.split(",") if s]
    report: dict = {"scenarios": {}, "errors": {}, "seconds": {}}
    ctx = {"work": a.work, "bucket": a.bucket, "train_slow_batch_s": a.train_slow_batch_s,
           "score_slow_batch_s": a.score_slow_batch_s, "stall_s": a.stall_s}
    t_all = now()
    # Ray's files (and its "current cluster" address file) in a folder of our own: a cluster started here must
    # never be found by another process's ray.init("auto") or `ray status` on this shared machine.
    own_tmp = None
    if "RAY_TMPDIR" not in os.environ:
        own_tmp = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="dmn-", dir="/tmp")

    def save() -> None:
        report["seconds"]["total"] = round(now() - t_all, 1)
        with open(a.report + ".tmp", "w") as f:
            json.dump(report, f, indent=2, default=str)
        os.replace(a.report + ".tmp", a.report)

    t0 = now()
    ctx["study"] = prepare_study(a.ham, a.bucket, os.path.join(a.work, "study"), a.per_dx)
    if "partition" in scenarios:
        ctx["synthetic"] = synthetic_manifest(f"s3://{a.bucket}/synth/manifest.parquet", a.synthetic_rows)
    report["seconds"]["inputs"] = round(now() - t0, 1)
    t0 = now()
    mn = MultiNode()
    report["seconds"]["cluster_start"] = round(now() - t0, 1)
    try:
        import ray

        report["cluster"] = {"nodes": len([n for n in ray.nodes() if n["Alive"]]),
                             "resources": ray.cluster_resources()}
        from dermray.stages import partition

        t0 = now()
        partition.run(cfg(*partition_keys(
            f"data.manifest={ctx['study']['manifest']}", f"data.taxonomy={ctx['study']['taxonomy']}",
            f"output=s3://{a.bucket}/out", "run_id=study", "partition.max_class_size=8", "partition.folds=2")))
        ctx["partition"] = f"s3://{a.bucket}/out/partition/study"
        report["seconds"]["study_partition"] = round(now() - t0, 1)
        ctx["train_run"] = f"s3://{a.bucket}/out/train/mn-train"
        ctx["fold_models"] = ctx["train_run"]
        for name in scenarios:
            mn.ensure_two()
            t0 = now()
            print(f"multinode: scenario {name} on nodes {mn.alive()}", flush=True)
            try:
                report["scenarios"][name] = SCENARIOS[name](mn, ctx)
            except BaseException:  # noqa: BLE001 - the report says what failed; the next scenario still runs
                report["errors"][name] = traceback.format_exc()
                print(report["errors"][name], flush=True)
            report["seconds"][name] = round(now() - t0, 1)
            save()
        report["nodes_joined"] = mn.joined
        report["nodes_killed"] = mn.killed
    finally:
        save()
        mn.shutdown()
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
