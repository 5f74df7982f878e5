"""Real Ray Train runs on a small real subset of HAM10000 (tiny model, small images, 2 folds, 1-3 epochs)."""
import json
import time

import numpy as np
import pytest

from dermray.runtime import trainloop
from dermray.runtime.config import load_config
from dermray.stages.train.plan import fold_names, read_rows
from dermray.store import models


def test_a_last_batch_of_one_image_is_skipped_not_fatal():
    """Batch norm cannot train on one image (inception_v3's aux head raised on such a last batch): it is skipped."""
    import torch

    from dermray.runtime.config import TrainConfig

    s = models.spec("inception_v3")
    tc = TrainConfig(arch="inception_v3", weights="none")
    job = trainloop.FoldJob(train=tc, n_classes=3, image_size=299, mean=s.mean, std=s.std)
    model = models.build_model("inception_v3", 3, weights="none")
    rng = np.random.default_rng(0)
    batches = [{"image": torch.from_numpy(rng.integers(0, 256, (n, 299, 299, 3), dtype=np.uint8)),
                "label": torch.tensor([0, 1][:n])} for n in (2, 1)]
    r = trainloop.train_one_epoch(model, trainloop.make_optimizer(model.parameters(), tc), batches, job,
                                  torch.device("cpu"))
    assert (r["images"], r["images_skipped"]) == (2, 1) and np.isfinite(r["loss"])


class _Epochs:
    """make_batches for EpochBatches: epoch e yields (e, 0) .. (e, n - 1); records when each epoch was started and
    whether its iterator was closed."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at, self.started, self.closed = n, fail_at, {}, set()

    def __call__(self, epoch: int):
        self.started[epoch] = time.monotonic()
        try:
            for i in range(self.n):
                if epoch == self.fail_at and i == 2:
                    raise OSError(f"cannot read a block of epoch {epoch}")
                yield (epoch, i)
        finally:
            self.closed.add(epoch)


def test_epoch_batches_hand_out_every_epoch_in_order_and_start_the_next_one_early():
    make = _Epochs(10)
    seen, finished = [], {}
    with trainloop.EpochBatches(make, 2, 5, queue_batches=3) as epochs:
        for epoch in range(2, 5):
            for batch in epochs.epoch(epoch):
                time.sleep(0.01)  # a training step
                seen.append(batch)
            finished[epoch] = time.monotonic()
    assert seen == [(e, i) for e in range(2, 5) for i in range(10)]
    # The next epoch's data was started while the current epoch still had queued batches to train.
    assert make.started[3] < finished[2] and make.started[4] < finished[3]
    assert make.closed == {2, 3, 4}


def test_epoch_batches_stopped_mid_epoch_close_the_running_epoch():
    make = _Epochs(1000)
    t0 = time.monotonic()
    with trainloop.EpochBatches(make, 0, 3, queue_batches=2) as epochs:
        got = [b for _, b in zip(range(5), epochs.epoch(0))]  # the time budget ends the epoch after 5 batches
    assert got == [(0, i) for i in range(5)]
    assert make.closed == {0} and 1 not in make.started and time.monotonic() - t0 < 5


def test_epoch_batches_skip_what_an_unfinished_epoch_left_and_raise_errors_in_the_trainer():
    make = _Epochs(6, fail_at=2)
    with trainloop.EpochBatches(make, 0, 3, queue_batches=2) as epochs:
        assert next(epochs.epoch(0)) == (0, 0)
        assert list(epochs.epoch(1)) == [(1, i) for i in range(6)]
        with pytest.raises(OSError, match="epoch 2"):
            list(epochs.epoch(2))


def test_reading_a_large_training_manifest_makes_no_python_object_per_row(tmp_path):
    """The driver's training table stays columnar: 300,000 relative URIs resolved and joined with the labels
    with the traced heap (Python objects and numpy buffers) under 25 bytes per image: a few numeric vectors (the
    fingerprint's row hashes) but no Python string per row (the per-row resolve took 222 bytes per image)."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 300_000
    image_ids = pa.array([f"IMG_{i:07d}" for i in range(n)])
    pq.write_table(pa.table({"image_id": image_ids, "uri": pa.array([f"images/IMG_{i:07d}.jpg" for i in range(n)]),
                             "label": pa.array(["nv", "mel"] * (n // 2)),
                             "group_id": pa.array([f"L{i // 3}" if i % 5 else "" for i in range(n)])}),
                   tmp_path / "manifest.parquet")
    part = tmp_path / "partition"
    part.mkdir()
    pq.write_table(pa.table({"image_id": image_ids, "class_index": pa.array([i % 2 for i in range(n)], pa.int32()),
                             "fold": pa.array([i % 3 for i in range(n)], pa.int32())}), part / "labels.parquet")
    pq.write_table(pa.table({"class_index": pa.array([0, 1], pa.int32()), "node_id": ["nv", "mel"],
                             "name": ["nevus", "melanoma"], "n_images": pa.array([n // 2] * 2, pa.int64()),
                             "scope": ["subtree"] * 2}), part / "training_classes.parquet")
    del image_ids
    cfg = load_config(None, [f"data.manifest={tmp_path / 'manifest.parquet'}", f"output={tmp_path / 'out'}"])
    read_rows(cfg, str(part))  # imports and caches warmed, so the peak below is the read's own
    tracemalloc.start()
    try:
        table, classes, fingerprints = read_rows(cfg, str(part))
        folds = fold_names(table, cfg.train)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert table.num_rows == n and folds == [0, 1, 2] + (["final"] if cfg.train.final_model else [])
    assert table.column("uri")[7].as_py() == str(tmp_path / "images" / "IMG_0000007.jpg")
    # An image without a group (empty group_id) is a group of its own.
    assert table.column("group")[0].as_py() == "IMG_0000000" and table.column("group")[1].as_py() == "L0"
    assert peak / n < 25, f"read_rows held {peak / 1e6:.1f} MB of Python objects and numpy buffers for {n:,} rows"


def test_an_epoch_line_fits_a_console():
    """Issue 29: epoch lines were 204-268 characters wide, every task's selection accuracy among them. The line
    holds the selection split's loss, top-1 and the metric that picks the epoch; the rest is in metrics.parquet."""
    from types import SimpleNamespace

    from dermray.runtime.trainloop import epoch_line

    job = SimpleNamespace(fold="3", train=SimpleNamespace(epochs=60, checkpoint_metric="acc_melanoma_vs_nevus"))
    metrics = {"epoch": 11, "train_loss": 1.234, "train_images_per_s": 148.4, "select_loss": 1.5, "select_top1": 0.41,
               "select_images": 1200.0, **{f"select_acc_{t}": 0.7 for t in (
                   "melanoma_vs_nevus", "carcinoma_vs_benign_keratosis", "three_class", "nine_class")}}
    line = epoch_line(job, metrics, spent_s=600.0, budget_s=None)
    assert len(line) <= 120, line
    assert "acc_melanoma_vs_nevus 0.700" in line and "nine_class" not in line and "epoch 12/60" in line


def _relay(workers: int = 3):
    """The driver's side of a Relay, without the Ray queue behind it, and the console's silence watch on a clock
    the test moves."""
    from dermray.runtime import progress, trainloop

    relay = object.__new__(progress.Relay)
    relay._init_state(workers, trainloop.MERGERS)
    return relay


def _clock(monkeypatch, start: float = 1000.0) -> list[float]:
    """The progress module's clock, moved by the test (``now[0] += ...``); the console last spoke at ``start``."""
    from dermray.runtime import progress

    now = [start]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(progress, "_last_shown", [now[0]])
    return now


def _epoch(fold: int, epoch: int, loss: float, eta_s: float) -> str:
    from dermray.runtime import progress

    record = {"fold": str(fold), "epoch": epoch, "epochs": 3, "train_loss": loss, "selection": {"loss": loss + 1,
              "top1": 0.4 + fold / 100}, "images_per_s": 30.0 + fold, "eta_s": eta_s, "by_budget": False}
    return f"{progress.GATHER}epoch {epoch}\x00{fold}\x00{json.dumps(record)}"


def test_every_workers_precision_and_epoch_is_one_line(caplog):
    """Issue 29: a line per fold and epoch, and the precision said by every worker, made the demo's console 61
    lines long (40 the target). Each worker sends a record; the driver says one line per epoch once every fold's
    is in, and one precision line (with which folds chose what when they differ; each worker's figures go to the
    log file only)."""
    import logging

    from dermray.runtime import progress

    relay = _relay(3)
    with caplog.at_level(logging.INFO, logger=progress.log.name):
        for fold, why in enumerate(["bf16: measured 1.30x faster than fp32 on this CPU",
                                    "bf16: measured 2.39x faster than fp32 on this CPU",
                                    "fp32: bf16 measured 0.42x on this CPU (below 1.1x)"]):
            relay._show(f"{progress.GATHER}precision\x00{fold}\x00{json.dumps({'fold': str(fold), 'why': why})}")
        for fold in range(3):
            relay._show(_epoch(fold, 1, 2.4 + fold / 100, 60.0 + fold))
            if fold < 2:
                assert not [r for r in caplog.records if "epoch" in r.getMessage()]  # waits for every fold
    console = [r.getMessage() for r in caplog.records if not getattr(r, "file_only", False)]
    assert console == [
        "train: computing in bf16 in folds 0, 1, fp32 in fold 2 (each worker measured its own: the log has the "
        "figures)",
        "train: epoch 1/3, folds 0-2, train loss 2.40-2.42, selection: loss 3.40-3.42 top1 0.40-0.42, 30-32 img/s, "
        "ETA 1m02s"], console
    assert all(len(line) <= 120 for line in console)
    logged = [r.getMessage() for r in caplog.records if getattr(r, "file_only", False)]
    assert len(logged) == 3 and "0.42x" in logged[2], logged


def test_a_fold_that_is_behind_is_not_waited_for_after_a_silence(caplog, monkeypatch):
    """An epoch whose folds are not all in is said at the next silence, with the folds that are; the late fold's
    record is said when it comes (the epoch's folds are all said then)."""
    import logging

    from dermray.runtime import progress

    now = _clock(monkeypatch)
    relay = _relay(3)
    with caplog.at_level(logging.INFO, logger=progress.log.name), progress.working("train: running"), \
            progress.working(relay.quiet_lines):
        for fold in range(3):
            relay._show(f"{progress.STATUS}{fold}\x00train: fold {fold} epoch 1/3, 992 images")
        relay._show(_epoch(0, 1, 2.4, 60.0))  # folds 0 and 1 finish the epoch: their statuses are stale now
        relay._show(_epoch(1, 1, 2.5, 61.0))
        progress.break_silence()
        assert caplog.records == []  # not yet quiet for long
        now[0] += progress.QUIET_S
        progress.break_silence()
        relay._show(_epoch(2, 1, 2.6, 70.0))
    shown = [r.getMessage() for r in caplog.records]
    assert shown[0].startswith("train: epoch 1/3, folds 0, 1, train loss 2.40-2.50") and len(shown) == 2, shown
    assert shown[1].startswith("train: fold 2 epoch 1/3, train loss 2.600"), shown
    assert relay._status == {} and relay._gathered == {}  # nothing stale or pending is said later


def test_a_precision_said_at_a_silence_is_not_said_again_by_the_late_fold(caplog, monkeypatch):
    """Issue 29: the demo's console said "train: computing in bf16: measured 2.39x ..." twice: once for the folds
    in at a silence, again when the late fold's record (the same) came."""
    import logging

    from dermray.runtime import progress

    now = _clock(monkeypatch)
    relay = _relay(3)
    why = "bf16: measured 2.39x faster than fp32 on this CPU"
    with caplog.at_level(logging.INFO, logger=progress.log.name), progress.working(relay.quiet_lines):
        for fold in range(3):
            if fold == 2:
                now[0] += progress.QUIET_S
                progress.break_silence()
            relay._show(f"{progress.GATHER}precision\x00{fold}\x00{json.dumps({'fold': str(fold), 'why': why})}")
        now[0] += progress.QUIET_S
        progress.break_silence()
    assert [r.getMessage() for r in caplog.records] == [f"train: computing in {why}"], caplog.records


def test_the_workers_status_is_one_line_after_a_silence_and_none_while_lines_come(caplog, monkeypatch):
    """Issue 29: 2 minutes without a line between a fold's start and its first epoch line. Workers send where they
    are; the driver shows one line of all of them only after QUIET_S seconds without a line; with nothing new,
    the stage says how long it has run."""
    import logging

    from dermray.runtime import progress

    now = _clock(monkeypatch)
    relay = _relay(3)
    with caplog.at_level(logging.INFO, logger=progress.log.name), progress.working("train: running"), \
            progress.working(relay.quiet_lines):
        for fold in range(3):
            relay._show(f"{progress.STATUS}{fold}\x00train: fold {fold} epoch 1/3, {256 * (fold + 1):,} images")
        progress.break_silence()
        assert caplog.records == []  # the console spoke a moment ago
        now[0] += progress.QUIET_S
        progress.break_silence()
        progress.break_silence()  # it just spoke
        now[0] += progress.QUIET_S
        progress.break_silence()  # nothing new from the workers
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["train: fold 0 epoch 1/3, 256 images; fold 1 epoch 1/3, 512 images; fold 2 epoch 1/3, 768 "
                     "images", f"train: running ({2 * progress.QUIET_S:.0f}s so far)"], shown


def test_a_slow_start_is_said_again_after_each_silence_until_a_worker_speaks(caplog, monkeypatch):
    import logging

    from dermray.runtime import progress

    now = _clock(monkeypatch, 0.0)
    relay = _relay(3)
    relay.starting("train: starting 3 Ray Train workers")
    with caplog.at_level(logging.INFO, logger=progress.log.name), progress.working(relay.quiet_lines):
        for _ in range(2):
            now[0] += progress.QUIET_S
            progress.break_silence()
        relay._show(f"{progress.STATUS}0\x00train: fold 0 epoch 1/3, 32 images")  # a worker speaks
        now[0] += progress.QUIET_S
        progress.break_silence()
    assert [r.getMessage() for r in caplog.records] == ["train: starting 3 Ray Train workers"] * 2 + [
        "train: fold 0 epoch 1/3, 32 images"]


def test_a_stage_begins_its_first_console_line_with_its_place_and_the_log_file_has_its_own_line():
    """Issue 29: "pipeline [2/5] train: running (not run yet)", a line of its own before each stage, was 5 of the
    demo's 47 lines. The stage's first console line begins "[2/5] " instead (a live meter's redraw does not take
    it); a stage that said nothing says its place at its end; the log file keeps the lines as they were said."""
    import io
    import logging

    from dermray.runtime import console, progress

    shown, filed = io.StringIO(), io.StringIO()
    to_file = logging.StreamHandler(filed)
    to_file.setFormatter(logging.Formatter(console.FORMAT))
    handlers = [console.console_handler(shown), to_file]
    for h in handlers:
        progress.log.addHandler(h)
    level = progress.log.level
    progress.log.setLevel(logging.INFO)
    try:
        with progress.leading("[2/5] ", "[2/5] train: ran"):
            progress.log.info("train: 50%", extra={"console_only": True, "live": True})
            progress.say("train: 3 folds")
            progress.say("train: epoch 1/3")
        with progress.leading("[3/5] ", "[3/5] score: ran"):
            pass
        with pytest.raises(RuntimeError), progress.leading("[4/5] ", "[4/5] evaluate: ran"):
            raise RuntimeError("failed")
        progress.say("pipeline: done")
    finally:
        progress.log.setLevel(level)
        for h in handlers:
            progress.log.removeHandler(h)
    assert shown.getvalue().splitlines() == ["[2/5] train: 3 folds", "train: epoch 1/3", "[3/5] score: ran",
                                             "pipeline: done"], shown.getvalue()
    assert "] train: 3 folds" not in filed.getvalue() and "INFO dermray.progress: train: 3 folds" in filed.getvalue()


def test_a_meters_in_between_line_goes_to_the_log_file_only_when_the_console_spoke_a_moment_ago(caplog, monkeypatch):
    """Issue 29: scoring's "64 / 454 images" came 2 s after a status line. A meter's in-between line is a console
    line only after every_s seconds without one; otherwise the log file alone has it. Its last line always shows."""
    import logging

    from dermray.runtime import progress

    now = _clock(monkeypatch)
    meter = progress.Meter("score", 3, every_s=10.0)
    with caplog.at_level(logging.INFO, logger=progress.log.name):
        now[0] += 10.0
        meter.update()  # quiet for 10 s: a console line
        progress.shown()
        now[0] += 10.0
        progress._last_shown[0] = now[0] - 2.0  # a status line 2 s ago
        meter.update()
        now[0] += 10.0
        meter.update()  # the last
    said = [(r.getMessage().split(",")[0], getattr(r, "file_only", False)) for r in caplog.records]
    assert said == [("score: 1 / 3 images (33%)", False), ("score: 2 / 3 images (67%)", True),
                    ("score: 3 / 3 images (100%)", False)], said
