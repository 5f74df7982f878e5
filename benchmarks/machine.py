"""The machine a benchmark figure came from, recorded in every results.json: CPU model and the flags that decide
speed (AVX2, AVX-512, AVX512_BF16, VNNI, AMX), cores, memory, the GPU when there is one, library versions and
threads."""
from __future__ import annotations

import os
import platform

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    flags = [fl for fl in FLAGS if fl in present]
                    break
    except OSError:
        pass
    return model, flags


def machine_info() -> dict:
    from importlib import metadata

    model, flags = cpu_model_and_flags()
    info = {"cpu": model, "cpu_flags": flags, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    for name in ("torch", "ray", "numpy", "pyarrow", "pandas", "polars", "duckdb"):
        try:
            info[f"{name}_version"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["cuda_version"] = torch.version.cuda
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    import json

    print(json.dumps(machine_info(), indent=2))
