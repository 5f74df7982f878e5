"""Whole processes that read, score and die: a reader that exits at once exits cleanly; a scoring driver killed
part-way and re-run scores every image exactly once."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa

from dermray.cli import main
from dermray.runtime import faults
from dermray.store import storage


def read_preds(uri) -> pd.DataFrame:
    return storage.read_table(uri).to_pandas().sort_values("image_id").reset_index(drop=True)


READ_AND_EXIT = """
import sys
from dermray.store import storage
storage.read_table(sys.argv[1], columns=["a"])
"""


def test_a_process_that_reads_a_table_and_exits_at_once_exits_cleanly(tmp_path):
    """Regression (CI: `score` with storage.retries=0 died with SIGABRT after writing its summary): pyarrow's
    read_table on a Python file object leaves the file's last reference to an Arrow I/O thread, which needs the GIL
    to drop it; at interpreter exit that thread found Python finalizing and the process aborted (about one run in
    two here). Twenty-four short-lived readers, of a file and of a folder, must all exit 0."""
    import subprocess
    import sys

    one, folder = tmp_path / "one.parquet", tmp_path / "folder"
    storage.write_table(pa.table({"a": range(1000)}), str(one))
    for i in range(2):
        storage.write_table(pa.table({"a": range(i * 500, (i + 1) * 500)}), str(folder / f"part-{i}.parquet"))
    codes = []
    for path in [one] * 12 + [folder] * 12:
        run = subprocess.run([sys.executable, "-c", READ_AND_EXIT, str(path)], capture_output=True, text=True,
                             timeout=120)
        codes.append((run.returncode, path.name, run.stderr[-300:]))
    assert all(rc == 0 for rc, *_ in codes), [c for c in codes if c[0] != 0][:2]


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_a_driver_killed_part_way_and_rerun_scores_each_image_exactly_once(score_study, ray_local, tmp_path, capsys):
    """A separate `dermray score` process, a driver on the session's Ray (as a job's driver on a cluster that
    outlives it), is SIGKILLed after its first chunk is written; the same command re-run (here in this process)
    scores the rest, each image exactly once."""
    import psutil

    d = score_study
    address = ray_local.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "dermray.cli", "score", "--input", str(d / "archive" / "manifest.parquet"),
            "--checkpoint", str(d / "out" / "train" / "r1"), "--output", str(tmp_path), "--run-id", "k",
            "--set", "score.rows_per_file=4", "--set", "score.batch_size=4", "--set", f"ray.address={address}"]
    env = dict(os.environ, **{faults.ENV: json.dumps({"slow_batch_s": 0.4})})
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parts = tmp_path / "predictions" / "k" / "predictions"
    children = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (parts.exists() and any(parts.glob("part-*.parquet"))):
            children = _descendants(proc.pid) or children
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        children = _descendants(proc.pid) or children
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        for pid in [proc.pid, *children]:  # whatever the killed driver started itself, by PID
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
    done_before = len(read_preds(parts))
    assert 0 < done_before < 24, done_before
    capsys.readouterr()
    assert main([*args[3:], "--json"]) == 0
    out = capsys.readouterr().out
    s = json.loads(out[out.index("{"):])
    assert s["already_done"] == done_before and s["scored"] == 24 - done_before
    df = read_preds(parts)
    assert len(df) == 24 and df["image_id"].is_unique
