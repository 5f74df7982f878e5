"""The check of a job's paths (dermray/runtime/jobpaths.py), without a cluster: the job's environment as Ray's job
supervisor sets it."""
import json
import pathlib
import re

import pytest

from dermray.errors import UserError
from dermray.runtime import jobpaths, raysession
from dermray.runtime.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[2]


# ---- dermray/runtime/jobpaths.py without a cluster: the job's environment as Ray's job supervisor sets it -------
DEMO = REPO / "configs" / "demo.yaml"


def in_a_job(monkeypatch, cwd: pathlib.Path, uploaded: bool = True) -> None:
    runtime_env = {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"} if uploaded else {}
    monkeypatch.setenv(jobpaths.JOB_ENV, json.dumps({"runtime_env": runtime_env,
                                                     "metadata": {"job_submission_id": "raysubmit_x"}}))
    monkeypatch.chdir(cwd)


def absolute_demo(d: pathlib.Path, *extra: str):
    for name in ("manifest.parquet", "taxonomy.parquet", "tasks.yaml", "readers.parquet", "test_manifest.parquet"):
        (d / name).write_text("x")
    return load_config(str(DEMO), [f"output={d / 'out'}", f"data.manifest={d / 'manifest.parquet'}",
                                   f"data.taxonomy={d / 'taxonomy.parquet'}", f"data.tasks={d / 'tasks.yaml'}",
                                   f"evaluate.readers={d / 'readers.parquet'}",
                                   f"pipeline.test_manifest={d / 'test_manifest.parquet'}", *extra])


def test_in_a_job_relative_inputs_missing_from_the_working_directory_and_a_relative_output_are_refused(
        monkeypatch, tmp_path):
    copy = tmp_path / "copy"
    (copy / "configs").mkdir(parents=True)
    (copy / "configs" / "tasks.yaml").write_text("x")
    d = tmp_path / "shared"
    d.mkdir()
    in_a_job(monkeypatch, copy)
    with pytest.raises(UserError) as e:
        jobpaths.check_paths(load_config(str(DEMO)), "partition")
    msg = str(e.value)
    assert msg.startswith("data.manifest outputs/demo/data/manifest.parquet is a relative local path, and this Ray "
                          f"job runs in the uploaded copy of its working directory ({copy}), which "
                          "cluster/runtime_env.yaml ships without outputs/ and data/: there is no such file there. ")
    assert jobpaths.REMEDY in msg and "\n" not in msg
    # each command's input keys are checked, list keys entry by entry; keys it does not read are not
    for stage, key, value in (("score", "score.checkpoints", f"{d / 'manifest.parquet'},models/fold=0"),
                              ("train", "train.weights", "w.pt"), ("evaluate", "evaluate.compare", "runs/b/preds"),
                              ("saliency", "saliency.masks", "masks/{image_id}.png"),
                              ("nightly", "score.input", "archive/"),
                              ("pipeline", "pipeline.test_manifest", "test.parquet")):
        cfg = absolute_demo(d, f"{key}={value}")
        with pytest.raises(UserError, match=f"^{re.escape(key)} {re.escape(value.split(',')[-1])} is a relative "):
            jobpaths.check_paths(cfg, stage)
        for other in {"partition", "train", "score", "evaluate", "saliency"} - {stage}:
            if key not in jobpaths.STAGE_INPUTS[other]:
                jobpaths.check_paths(cfg, other)
    jobpaths.check_paths(absolute_demo(d, "score.input=archive/"), "pipeline")  # the pipeline wires its own
    # a relative output is refused (it would be written into the copy)
    with pytest.raises(UserError) as e:
        jobpaths.check_paths(absolute_demo(d, "output=outputs/demo"), "partition")
    assert str(e.value).startswith("output outputs/demo is a relative local path") and "Ray deletes that copy" in str(
        e.value) and jobpaths.REMEDY in str(e.value)
    # absolute paths, s3:// URIs and relative paths that exist in the copy pass
    jobpaths.check_paths(absolute_demo(d, "data.tasks=configs/tasks.yaml", "evaluate.readers=s3://b/readers.parquet",
                                       "train.weights=imagenet"), "pipeline")
    # a job whose working directory was not uploaded: the message says where it runs instead
    in_a_job(monkeypatch, copy, uploaded=False)
    with pytest.raises(UserError, match=r"runs in .* on the cluster, not in the directory it was submitted from"):
        jobpaths.check_paths(load_config(str(DEMO)), "partition")


def test_outside_a_job_nothing_changes_and_the_multi_node_refusal_gives_the_same_advice(monkeypatch, tmp_path):
    monkeypatch.delenv(jobpaths.JOB_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    # relative and missing: the stage's own "no such file" later
    jobpaths.check_paths(load_config(str(DEMO)), "pipeline")
    monkeypatch.setattr(raysession, "alive_nodes", lambda: 3)
    cfg = load_config(str(DEMO), ["output=/mnt/out"])
    with pytest.raises(UserError) as e:
        raysession.check_shared_storage(cfg.storage, {"output": cfg.output})
    assert "this Ray cluster has 3 nodes: each node would see its own disk. " + jobpaths.REMEDY == str(e.value).split(
        ", and ", 1)[1]
