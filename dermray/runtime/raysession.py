"""Starting or joining Ray: the embedded default (in-process local Ray) or a cluster address."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import pyarrow as pa


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Use the running Ray if there is one; else join ``address`` (or ``RAY_ADDRESS``; "auto" finds a cluster
    started with ``ray start`` on this machine); else start a local Ray of its own in this process - never
    silently joining another one - and stop it on exit. Progress bars are turned off when stdout is not a
    terminal."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if not sys.stdout.isatty():
        ctx.enable_progress_bars = False
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    from dermray.runtime import progress

    if address:
        progress.say("ray: joining the cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        starting = f"ray: starting a local Ray in this process ({num_cpus or os.cpu_count()} CPUs)"
        progress.to_log_only("%s", starting)  # on the console only if it takes long (progress.working)
        hook = "dermray.runtime.raysession.quiet_embedded_workers"
        with progress.working(starting):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     runtime_env={"worker_process_setup_hook": hook}, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def quiet_embedded_workers() -> None:
    """Worker set-up for the embedded Ray, which runs without a dashboard and so without the State API: Ray Train's
    placement-group cleaner (a safety net for a controller that dies) asks the State API about its controller every
    second and would log a warning each time, for as long as training runs."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared_storage(storage_cfg, uris: dict[str, str | None]) -> None:
    """On a cluster of more than one node, refuse local paths (each node would read and write its own disk, and
    the driver would not see what a worker wrote), unless ``storage.shared_filesystem`` declares them shared.
    ``uris``: config key -> URI, for the message."""
    from dermray.errors import UserError
    from dermray.store import storage

    if storage_cfg.shared_filesystem:
        return
    local = {k: u for k, u in uris.items() if u and not storage.is_s3(u)}
    if not local:
        return
    nodes = alive_nodes()
    if nodes > 1:
        key, uri = next(iter(local.items()))
        raise UserError(f"{key} {storage.redact(uri)} is a local path, and this Ray cluster has {nodes} nodes: each "
                        "node would see its own disk. Use an s3:// URI, or an absolute path on a filesystem every node "
                        "mounts (NFS) with storage.shared_filesystem: true")


def cluster_cpus(default: int = 1) -> int:
    import ray

    try:
        return max(1, int(ray.cluster_resources().get("CPU", default)))
    except Exception:  # noqa: BLE001 - resources are advisory here
        return default


def blocks_of(table: pa.Table, rows: int) -> list[pa.Table]:
    """``table`` cut into blocks of ``rows`` rows (copies, so each block ships only its own rows). Made on the driver
    rather than with Dataset.repartition: a repartition is a shuffle whose tasks each want a whole CPU, and with the
    fold workers holding the rest of a small cluster they would never be scheduled (a silent hang)."""
    if table.num_rows == 0:
        return [table]
    return [table.take(pa.array(range(i, min(i + rows, table.num_rows)))) for i in range(0, table.num_rows, rows)]
