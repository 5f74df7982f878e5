"""``dermray doctor``: what this environment can do, checked before a long run - one line per check (ok / warn /
fail; skip where there was nothing to check). Ray's version and the cluster it would use (address, auth mode, CPUs
and GPUs seen), torch's threads and whether bf16 is native on this CPU, whether an S3 prefix answers and takes a
write, and whether the configured pretrained weights can be loaded."""
from __future__ import annotations

import os
import time
import uuid

from dermray.runtime.config import RunConfig


def _check(name: str, fn) -> dict:
    t0 = time.perf_counter()
    try:
        status, detail = fn()
    except Exception as e:  # noqa: BLE001 - a check that breaks is a failed check, reported in its line
        status, detail = "fail", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {"check": name, "status": status, "detail": detail, "seconds": round(time.perf_counter() - t0, 2)}


def ray_check(cfg: RunConfig):
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    auth = os.environ.get("RAY_AUTH_MODE", "token (Ray 2.60's default for `ray start`)")
    if not address:
        return "ok", (f"Ray {ray.__version__}; no address: each command starts an in-process Ray with "
                      f"{os.cpu_count()} CPUs (auth mode {auth})")
    from dermray.runtime.raysession import ray_session

    with ray_session(address) as r:
        res = r.cluster_resources()
        nodes = sum(1 for n in r.nodes() if n.get("Alive"))
    return "ok", (f"Ray {ray.__version__} at {address}: {nodes} node(s), {res.get('CPU', 0):g} CPUs, "
                  f"{res.get('GPU', 0):g} GPUs (auth mode {auth})")


def torch_check(cfg: RunConfig):
    import torch

    from dermray.runtime.precision import native_bf16
    from dermray.runtime.trainloop import precision

    gpu = torch.cuda.is_available()
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = native_bf16()
    device = torch.device("cuda" if gpu else "cpu")
    if cfg.train.amp == "auto" and not gpu and bf16:
        amp = "bf16 or fp32, measured on the model when a fold starts (dermray/runtime/precision.py)"
    else:
        amp = f"{precision(cfg.train.amp, device)} here"
    return "ok", (f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {capability}"
                  f"{', native bf16' if bf16 else ', no native bf16'}; "
                  f"{'CUDA ' + torch.cuda.get_device_name(0) if gpu else 'no GPU'}; train.amp={cfg.train.amp} -> {amp}")


def s3_check(prefix: str | None):
    from dermray.store import storage

    if not prefix:  # nothing was checked: "ok" would read as "S3 works"
        return "skip", "not checked: no s3:// output or --s3 prefix"
    probe = storage.join(prefix.rstrip("/"), f".dermray-doctor-{uuid.uuid4().hex[:8]}")
    storage.write_text(probe, "ok")
    if storage.read_text(probe) != "ok":
        return "fail", f"{storage.redact(prefix)}: wrote a probe object but read back something else"
    storage.delete(probe)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    return "ok", f"{storage.redact(prefix)} is readable and writable (endpoint {endpoint})"


def weights_check(cfg: RunConfig, configured: bool = True):
    """Whether the weights a run would start from load; "skip" without a run config (issue 29: the defaults'
    Inception v3 was checked, and warned about, for a user whose runs use another network)."""
    from dermray.store.models import build_model

    if not configured:
        return "skip", "no run config given: pass --config (or --set train.arch=...) to check the weights it loads"
    w = cfg.train.weights
    if w == "none":
        return "ok", f"train.weights=none: {cfg.train.arch} starts from random weights"
    build_model(cfg.train.arch, 2, weights=w)
    return "ok", f"{cfg.train.arch} weights {w if w == 'imagenet' else '(a file)'} load"


def run(cfg: RunConfig, s3: str | None = None, configured: bool = True) -> list[dict]:
    from dermray.store import storage

    prefix = s3 or (cfg.output if storage.is_s3(cfg.output) else None)
    checks = [_check("ray", lambda: ray_check(cfg)), _check("torch", lambda: torch_check(cfg)),
              _check("s3", lambda: s3_check(prefix)), _check("weights", lambda: weights_check(cfg, configured))]
    for c in checks:
        if c["check"] == "weights" and c["status"] == "fail":
            c["status"] = "warn" if cfg.train.weights == "imagenet" else "fail"
    return checks


def format_checks(checks: list[dict]) -> str:
    return "\n".join(f"doctor: {c['check']:<8} {c['status']:<5} {c['detail']}" for c in checks)
