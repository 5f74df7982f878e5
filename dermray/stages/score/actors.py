"""What Ray Data runs: decode tasks (manifest rows or tar shards) and the actor that holds the models
(``Predictor``: mean softmax over the fold models and the test-time-augmentation views)."""
from __future__ import annotations

import json
import time
import warnings

import numpy as np

from dermray.errors import UserError
from dermray.runtime import artifacts
from dermray.runtime.artifacts import Ensemble
from dermray.stages.score.shared import CHUNK, END_OF_SHARD, ROW, TOTAL, log
from dermray.store import archive, storage
from dermray.store.archive import TRANSIENT
from dermray.store.models import mean_probabilities


def decode_rows(batch: dict, size: int, max_pixels: int, retry: storage.Retry, pre=None) -> dict:
    """Ray Data batch fn over work rows: read + decode + resize -> ``image`` uint8 [B, size, size, 3], ``error``
    ("" when the image is usable); the other columns pass through."""
    decoded = [archive.decode_one(d, size, max_pixels, pre) for d in archive.fetch_all(list(batch["uri"]), retry)]
    out = dict(batch)
    out["image"] = archive.stack_images([d[0] for d in decoded], size)
    out["error"] = np.array([d[1] for d in decoded], dtype=object)
    out["meta"] = np.array([""] * len(decoded), dtype=object)
    return out


def _shard_rows(shard: str, retry: storage.Retry):
    """(image_id, uri, data or None, error, meta JSON) of every sample and problem of a shard, streamed. A read
    that fails part-way for a transient reason is retried from the start (``retry``'s attempts and backoff: a
    tenacity controller, one attempt per ``with``), skipping what was already yielded."""
    emitted = 0
    try:
        for attempt in retry.retrying():
            with attempt:
                seen = 0
                with storage.open_read(shard, retry) as f:
                    for kind, item in archive.iter_shard(f):
                        seen += 1
                        if seen <= emitted:
                            continue
                        emitted += 1
                        if kind == "problem":
                            member = item["member"]
                            yield (item["key"] or "", f"{shard}#{member}" if member else shard, None,
                                   item["reason"], "")
                        else:
                            yield (item["image_id"], f"{shard}#{item['member']}", item["data"], "",
                                   json.dumps(item["meta"], default=str))
    except UserError as e:
        yield ("", shard, None, archive.reason_of(e), "")
    except storage.IO_ERRORS as e:  # permanent, or transient after the last attempt
        yield ("", shard, None, TRANSIENT + f"cannot read {storage.redact(shard)}: {e}", "")


def decode_shards(batch: dict, size: int, max_pixels: int, rows_per_batch: int, retry: storage.Retry, pre=None):
    """Ray Data batch fn over shard rows (uri, chunk): yields decoded samples in batches of ``rows_per_batch``,
    reading each shard as a stream; the last row of a shard is an END_OF_SHARD marker carrying its count."""
    for shard, chunk in zip(batch["uri"], batch[CHUNK]):
        total, buf = 0, []

        def emit(rows, end: int | None = None, chunk=chunk):
            decoded = [archive.decode_one(r[2], size, max_pixels, pre) if not r[3] else (None, r[3]) for r in rows]
            n = len(rows)
            return {"image_id": np.array([r[0] for r in rows], dtype=object),
                    "uri": np.array([r[1] for r in rows], dtype=object), ROW: np.full(n, -1, np.int64),
                    CHUNK: np.array([chunk] * n, dtype=object),
                    TOTAL: np.full(n, -1 if end is None else end, np.int64),
                    "image": archive.stack_images([d[0] for d in decoded], size),
                    "error": np.array([d[1] for d in decoded], dtype=object),
                    "meta": np.array([r[4] for r in rows], dtype=object)}

        for row in _shard_rows(shard, retry):
            buf.append(row)
            total += 1
            if len(buf) == rows_per_batch:
                yield emit(buf)
                buf = []
        if buf:
            yield emit(buf)
        yield emit([("", shard, None, END_OF_SHARD, "")], end=total)


class Predictor:
    """Ray Data actor: the ensemble's models, built once (weights checked against their sha256); ``__call__`` maps
    decoded images to the mean softmax over models and views (float32 [B, n_classes]); rows with an ``error`` pass
    through unscored."""

    def __init__(self, ensemble: Ensemble, threads: int, channels_last: bool, tta: str, use_gpu: bool,
                 amp: str = "off", slow_batch_s: float = 0.0, compile_batch: int = 0):
        import torch

        torch.set_num_threads(max(1, threads))
        # Ray hands out read-only arrays; the tensors made from them are only read (a float copy is normalised).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.models = []
        for i in range(len(ensemble.weights)):
            m = artifacts.load_member(ensemble, i, self.device)
            self.models.append(m.to(memory_format=torch.channels_last) if channels_last else m)
        self.channels_last, self.tta = channels_last, tta
        self.autocast_dtype = None
        # Before the precision is chosen: amp=auto measures _probabilities, which normalises with these.
        self.mean = torch.tensor(ensemble.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(ensemble.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.n_classes = ensemble.n_classes
        if amp == "auto":
            amp, self.precision_why = self._choose(ensemble)
        else:
            self.precision_why = f"{amp} (configured)"
        self.amp = {"off": "fp32"}.get(amp, amp)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.slow_batch_s = slow_batch_s  # tests: stretch a run so that a fault can land inside it
        # torch.compile with one static shape: every batch is padded to compile_batch images (no recompiles for
        # a short last batch or one with quarantined rows). The eager models stay for a compile that fails.
        self.compile_batch, self.eager = compile_batch, self.models
        if compile_batch:
            self.models = [torch.compile(m, dynamic=False) for m in self.models]

    def _choose(self, ensemble: Ensemble) -> tuple[str, str]:
        """``auto``: dermray/runtime/precision.py, measured on this actor's first model where the CPU has native
        bf16."""
        from dermray.runtime import precision as P

        images = np.random.default_rng(0).integers(0, 256, (8, ensemble.size, ensemble.size, 3), dtype=np.uint8)

        def measure():
            import torch

            times = []
            for dtype in (None, torch.bfloat16):
                self.autocast_dtype = dtype
                times.append(P.time_step(lambda: self._probabilities(images)))
            self.autocast_dtype = None
            return tuple(times)

        return P.choose("auto", self.device, f"score:{ensemble.arch}:{ensemble.size}:tta={self.tta}", measure)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """float32 [B, n_classes] for uint8 NHWC images."""
        n = len(images)
        if self.compile_batch and n < self.compile_batch:
            images = np.concatenate([images, np.zeros((self.compile_batch - n, *images.shape[1:]), images.dtype)])
        try:
            return self._probabilities(images)[:n]
        except Exception as e:  # noqa: BLE001 - compiling needs a C++ toolchain on the node; eager needs nothing
            if self.models is self.eager:
                raise
            log.warning("score: torch.compile failed on this node (%s: %s); scoring eager", type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            self.models, self.compile_batch = self.eager, 0
            return self._probabilities(images)[:n]

    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            # NHWC uint8 -> NCHW float32 whose memory stays NHWC: channels_last with no copy.
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
            x = (x.float() - self.mean) / self.std
            if not self.channels_last:
                x = x.contiguous()
            return mean_probabilities(self.models, x, self.tta, self.autocast_dtype).cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        t_start = time.time()
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        probs = np.zeros((len(ok), self.n_classes), np.float32)
        if ok.any():
            probs[ok] = self.probabilities(batch["image"] if ok.all() else batch["image"][ok])
        if self.slow_batch_s:
            time.sleep(self.slow_batch_s)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probs"] = probs
        out["precision"] = np.array([self.amp] * len(ok), dtype=object)
        out["compiled"] = np.full(len(ok), bool(self.compile_batch))
        # When this batch's model work ran (wall clock): the steady rate excludes start-up and output bunching.
        out["t_model"] = np.tile(np.array([[t_start, time.time()]]), (len(ok), 1))
        return out
