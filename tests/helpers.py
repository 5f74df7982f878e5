"""Helpers shared by the tests: fold directories as `dermray train` writes them, WebDataset shards."""
import io
import json
import os
import socket
import tarfile
import time

import pyarrow as pa
import torch

from dermray.runtime import artifacts
from dermray.store import models

SIZE = 64  # input pixels of the test models


def _save_fold(fold_dir, model, classes: pa.Table, run: str, partition=None) -> None:
    """Weights and model card of a SIZE-px mobilenet_v3_small, laid out as `dermray train` writes a fold (through
    dermray.runtime.artifacts, as train does)."""
    os.makedirs(fold_dir / "best", exist_ok=True)
    torch.save(model.state_dict(), fold_dir / "best" / "model.pt")
    card = artifacts.ModelCard(
        model_id=f"{run}/{fold_dir.name}", architecture="mobilenet_v3_small", input_size=SIZE,
        normalisation={"mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD)},
        training_classes=classes.to_pylist(), classes_hash=artifacts.classes_hash(classes),
        weights_sha256=artifacts.weights_sha256(str(fold_dir / "best" / "model.pt")),
        lineage={"partition": str(partition)} if partition else {})
    artifacts.write_card(card, str(fold_dir))


def write_fold(fold_dir, classes: pa.Table, seed: int, partition=None) -> None:
    """A fold directory as `dermray train` writes it (weights + model card), with a model whose outputs depend on
    the image (batch-norm statistics set, a sharper head) so that a mix-up of images would show."""
    torch.manual_seed(seed)
    m = models.build_model("mobilenet_v3_small", classes.num_rows, weights="none")
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(16, 3, SIZE, SIZE))
        m.classifier[3].weight.mul_(20)
    _save_fold(fold_dir, m, classes, run="r1", partition=partition)


def shard_bytes(samples: list[tuple[str, bytes, dict]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data, meta in samples:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def train_small_fold(fold_dir, classes: pa.Table, images: list[str], labels: list[int], steps: int = 40,
                     seed: int = 0) -> None:
    """A quickly fine-tuned mobilenet_v3_small (from random weights, SIZE px) written as a fold directory: a model
    that has learned something from real images, for the saliency sanity checks."""
    import numpy as np

    from dermray.core.transforms import decode_image, eval_transform, to_array

    torch.manual_seed(seed)
    x = torch.from_numpy(np.stack([to_array(eval_transform(decode_image(open(u, "rb").read()), SIZE),
                                            models.IMAGENET_MEAN, models.IMAGENET_STD) for u in images]))
    y = torch.tensor(labels)
    m = models.build_model("mobilenet_v3_small", classes.num_rows, weights="none")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    for _step in range(steps):
        idx = torch.randint(0, len(y), (16,))
        loss = torch.nn.functional.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    _save_fold(fold_dir, m, classes, run="trained")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartableS3:
    """A real S3 API (moto's threaded server) on a fixed port of 127.0.0.1 that can be stopped (connections
    refused: an outage) and started again on the same port. moto keeps its buckets and objects per process, so they
    survive a restart, and every server of this process serves the same ones. ``outages`` holds [stopped, started]
    times (time.time())."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.outages: list[list[float]] = []
        self.start()

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        if self.outages and len(self.outages[-1]) == 1:
            self.outages[-1].append(time.time())

    def stop(self) -> None:
        self.server.stop()
        self.server = None
        self.outages.append([time.time()])

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def up(self) -> bool:
        return self.server is not None

    def env(self) -> dict[str, str]:
        """The environment of an S3 client that uses this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def marked(mark: str) -> list:
    """Processes whose environment carries DR_TEST_MARK=mark: everything a command started (Ray hands its
    environment on to the head's processes, its workers and the job drivers), to be checked gone or killed by PID."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("DR_TEST_MARK") == mark:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def write_image(path, fmt: str, source=None, seed: int = 0) -> None:
    """A real image file: ``source`` (a HAM10000 JPEG) re-encoded as ``fmt``, or a small noise image."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        with Image.open(source) as im:
            im.convert("RGB").save(path, format=fmt)
    else:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path, format=fmt)


# A hospital's own label names and the ISIC nodes they map to (the importers' tests).
HOSPITAL_NAMES = {"nv": "Naevus", "mel": "Malignant melanoma", "bcc": "BCC", "bkl": "Seborrhoeic keratosis"}
NODES = {"nv": "Benign:Benign melanocytic proliferations:Nevus",
         "mel": "Malignant:Malignant melanocytic proliferations (Melanoma)",
         "bcc": "Malignant:Malignant adnexal epithelial proliferations - Follicular:Basal cell carcinoma",
         "bkl": "Benign:Benign epidermal proliferations"}
FORMATS = [("jpg", "JPEG"), ("png", "PNG"), ("bmp", "BMP"), ("tiff", "TIFF"), ("PNG", "PNG"), ("TIF", "TIFF")]


def run_job(name: str, args: list[str]) -> int:
    """jobs/<name>.py as `ray job submit` or the nightly CronJob runs it, but in this process: its exit code."""
    import pathlib
    import runpy
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    old = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
    return 0
