"""What every benchmark shares: smoke mode, where its results go, and writing them with the machine they came from.

Smoke mode (``DERMRAY_BENCH_SMOKE=1``): every size shrinks (by 100-1000x) so that a script runs end to end in a
minute or two - to check that it works, never to measure. Its results go to ``$TMPDIR/dermray-bench-smoke/<name>/``
(or ``DERMRAY_BENCH_OUT/<name>/`` when that is set), never to ``benchmarks/results/``, which holds the real
measurements that ``benchmarks/report.py`` puts on the benchmarks page (docs/benchmarks.md).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
SMOKE = os.environ.get("DERMRAY_BENCH_SMOKE", "").strip().lower() not in ("", "0", "false", "no")


def size(full, smoke):
    """``full`` normally, ``smoke`` in smoke mode."""
    return smoke if SMOKE else full


def results_dir(name: str) -> pathlib.Path:
    """Where benchmark ``name`` writes its results.json (and any other result files)."""
    if os.environ.get("DERMRAY_BENCH_OUT"):
        base = pathlib.Path(os.environ["DERMRAY_BENCH_OUT"])
    elif SMOKE:
        base = pathlib.Path(tempfile.gettempdir()) / "dermray-bench-smoke"
    else:
        base = RESULTS
    out = base / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_results(name: str, figures: dict, details: dict | None = None, started: float | None = None) -> pathlib.Path:
    """``results.json`` of benchmark ``name``: its figures (the keys of its last line), ``machine``
    (benchmarks/machine.py), when and how long, smoke or not, and ``details`` (per-size or per-model figures)."""
    sys.path.insert(0, str(BENCH))
    import time

    from machine import machine_info

    record = dict(figures)
    record["machine"] = machine_info()
    record["measured_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if started is not None:
        record["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
    record["smoke"] = SMOKE
    if details is not None:
        record["details"] = details
    path = results_dir(name) / "results.json"
    path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    print(f"results: {path}", file=sys.stderr)
    return path


def _plain(x):
    """numpy scalars and arrays as JSON."""
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM of /proc/self/status (the high-water mark of this program's
    own address space). Not ``getrusage``'s ru_maxrss: Linux carries that across exec from the process that
    spawned this one, so a child started by a big parent reports at least the parent's RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def last_line(figures: dict) -> None:
    """The benchmark's last line: one JSON object (its figures, no machine record)."""
    print(json.dumps(figures, default=_plain), flush=True)


def run_child(script: str, kind: str, *args) -> dict:
    """``script --child kind args...`` in a fresh interpreter (its peak RSS is its own); the JSON object on its
    last stdout line. A failing child prints its stderr's tail and stops the benchmark."""
    import subprocess

    proc = subprocess.run([sys.executable, script, "--child", kind, *map(str, args)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])
