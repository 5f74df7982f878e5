"""Paths in a submitted Ray job, checked when the config has loaded, before the stage starts Ray or reads anything.

``ray job submit --working-dir .`` runs the job's driver in an uploaded copy of the working directory, and
``cluster/runtime_env.yaml`` leaves ``outputs/`` and ``data/`` (and every ``*.parquet``) out of that copy. So a
relative input path that works on a laptop (``configs/demo.yaml``'s ``outputs/demo/data/...``) names nothing inside
the job, and a relative ``output`` would be written into the copy, which Ray deletes once it is no longer used.
Inside a job (``JOB_ENV`` set), :func:`check_paths` therefore refuses, with one line naming the key, the path and
what to do instead:

- a relative local path of an input the command reads that does not exist in the job's working directory
  (resolved against it; one that does exist there, e.g. a file under ``configs/``, is fine);
- a relative local ``output``, always (it is created by the stage, so it would land in the temporary copy).

``s3://`` URIs and absolute paths are left to the stages: on a cluster of several nodes they refuse node-local paths
(``raysession.check_shared_storage``) with the same advice, :data:`REMEDY`. Outside a job nothing changes: a
relative path is read from the current directory and a missing one fails in the stage ("no such file").
"""
from __future__ import annotations

import json
import os

from dermray.errors import UserError
from dermray.runtime.registry import REGISTRY

# Ray's job supervisor sets this for a submitted job's driver (Ray 2.60, ray/_private/runtime_env/constants.py):
# JSON with the job's runtime_env (its working_dir a gcs:// package when one was uploaded) and metadata
# (job_submission_id). Ray sets no RAY_JOB_SUBMISSION_ID; RAY_ADDRESS alone would not tell a job from a client.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# The advice shared, word for word, with raysession.check_shared_storage's refusal of node-local paths.
REMEDY = ("Use an s3:// URI, or an absolute path on a filesystem every node mounts (NFS) with "
          "storage.shared_filesystem: true")


def job_working_dir() -> tuple[str, bool] | None:
    """(the job's working directory, whether it is an uploaded copy) inside a submitted Ray job; None outside."""
    raw = os.environ.get(JOB_ENV)
    if raw is None:
        return None
    try:
        uploaded = bool((json.loads(raw).get("runtime_env") or {}).get("working_dir"))
    except (ValueError, AttributeError):
        uploaded = False
    return os.getcwd(), uploaded


# The input keys each command reads (all of them must exist when it runs; list keys entry by entry): the stages'
# from their registry; the nightly job's are score's and evaluate's but its own predictions (the night's).
STAGE_INPUTS = {s.name: s.inputs for s in REGISTRY.values()}
STAGE_INPUTS["nightly"] = tuple(dict.fromkeys(STAGE_INPUTS["score"] + tuple(
    k for k in STAGE_INPUTS["evaluate"] if k != "evaluate.predictions")))
# What the pipeline wires itself (score.input: the test split).
_PIPELINE_WIRED = tuple(k for s in REGISTRY.values() for k in s.wired)


def input_keys(cfg, stage: str) -> list[str]:
    """The input keys ``stage`` reads; for the pipeline, those of its configured stages and the test manifest."""
    if stage != "pipeline":
        return list(STAGE_INPUTS.get(stage, sorted({k for ks in STAGE_INPUTS.values() for k in ks})))
    keys = [k for st in cfg.pipeline.stages for k in STAGE_INPUTS[st] if k not in _PIPELINE_WIRED]
    if {"score", "evaluate", "saliency"} & set(cfg.pipeline.stages):
        keys.append("pipeline.test_manifest")
    return list(dict.fromkeys(keys))


def _stage_inputs(cfg, stage: str) -> list[tuple[str, str, str]]:
    """(config key, path, what must exist) for every configured input that ``stage`` reads."""
    checks = []
    for key in input_keys(cfg, stage):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key == "train.weights" and value in ("imagenet", "none"):
            continue
        if key == "saliency.masks" and value:  # a pattern with {image_id}: its folder must exist
            checks.append((key, value, os.path.dirname(value.split("{image_id}")[0]) or "."))
            continue
        checks += [(key, v, v) for v in (value if isinstance(value, list) else [value]) if v]
    return checks


def _relative_local(path: str) -> bool:
    """A plain relative filesystem path: no scheme (s3://, file://), not absolute."""
    return "://" not in path and not os.path.isabs(path)


def _where(cwd: str, uploaded: bool) -> str:
    if uploaded:
        return (f"this Ray job runs in the uploaded copy of its working directory ({cwd}), which "
                "cluster/runtime_env.yaml ships without outputs/ and data/")
    return f"this Ray job runs in {cwd} on the cluster, not in the directory it was submitted from"


def check_paths(cfg, stage: str) -> None:
    """Inside a submitted Ray job, refuse the relative local paths of ``stage``'s inputs and output that cannot work
    there (see the module's doc). ``stage``: the dermray command (partition ... pipeline, nightly)."""
    job = job_working_dir()
    if job is None:
        return
    cwd, uploaded = job
    for key, path, must_exist in _stage_inputs(cfg, stage):
        if _relative_local(path) and not os.path.exists(os.path.join(cwd, must_exist)):
            raise UserError(f"{key} {path} is a relative local path, and {_where(cwd, uploaded)}: there is no such "
                            f"file there. {REMEDY} (on a one-machine cluster any absolute local path will do)")
    if _relative_local(cfg.output):
        gone = "Ray deletes that copy" if uploaded else "it is not the directory the job was submitted from"
        raise UserError(f"output {cfg.output} is a relative local path, and {_where(cwd, uploaded)}: what the job "
                        f"wrote there would be lost ({gone}). {REMEDY} (on a one-machine cluster any absolute "
                        "local path will do)")
