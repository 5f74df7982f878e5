"""Which precision a model computes in: ``train.amp`` / ``score.amp`` = ``auto`` decides by hardware, and on a CPU
with native bf16 (AVX512_BF16 or AMX) by measurement on the model itself.

- GPU: bf16 autocast (tensor cores).
- CPU without native bf16 (AVX2): fp32 - bf16 is emulated there (measured ~8x slower on an AVX2 machine).
- CPU with native bf16: a few steps of the actual model in both precisions on a small batch; bf16 when it is at
  least ``MARGIN`` faster, fp32 otherwise. The decision is cached per (model, input size, batch, CPU, torch) in
  ``~/.cache/dermray/precision.json`` so that a worker measures once per machine.

The decision and its reason are printed and recorded (the model card's ``precision``, the score summary).
"""
from __future__ import annotations

import json
import os
import time

MARGIN = 1.10  # bf16 must be this much faster to be chosen


def native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def _cache_path() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dermray",
                        "precision.json")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def time_step(step, repeats: int = 3) -> float:
    """Seconds per call of ``step`` (after one warm-up call), the fastest of ``repeats``."""
    step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


def choose(amp: str, device, key: str, measure) -> tuple[str, str]:
    """(bf16 | fp16 | off, why). ``measure()`` -> (seconds fp32, seconds bf16) of the model's step, called only
    on a CPU with native bf16 and no cached decision for ``key``."""
    if amp != "auto":
        return amp, f"{amp} (configured)"
    if device.type == "cuda":
        return "bf16", "bf16 on the GPU"
    if not native_bf16():
        return "off", "fp32: this CPU has no native bf16 (AVX512_BF16 / AMX)"
    import torch

    full_key = f"{key}|{_cpu_model()}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    path = _cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if full_key not in cache:
        t32, t16 = measure()
        cache[full_key] = {"fp32_s": t32, "bf16_s": t16}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError:
            pass
    t32, t16 = cache[full_key]["fp32_s"], cache[full_key]["bf16_s"]
    speedup = t32 / t16 if t16 > 0 else 0.0
    if speedup >= MARGIN:
        return "bf16", f"bf16: measured {speedup:.2f}x faster than fp32 on this CPU"
    return "off", f"fp32: bf16 measured {speedup:.2f}x on this CPU (below {MARGIN}x)"
