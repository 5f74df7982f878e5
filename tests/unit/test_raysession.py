"""The embedded Ray session: what `ray_session` starts when there is no cluster, and the blocks it cuts."""
import importlib
import logging

import pyarrow as pa

from dermray.runtime import raysession


def test_the_embedded_ray_quiets_the_train_state_api_warning(monkeypatch):
    """The embedded Ray runs without a dashboard, so without the State API, and Ray Train's placement-group cleaner
    warned about that once a second for as long as training ran. The session's worker set-up hook silences that
    logger, and the logger is the one Ray's cleaner really uses (a renamed module would make the hook a no-op)."""
    import ray
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    calls = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.update(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with raysession.ray_session(num_cpus=2):
        pass
    assert calls["include_dashboard"] is False and calls["num_cpus"] == 2
    module, name = calls["runtime_env"]["worker_process_setup_hook"].rsplit(".", 1)
    logger = placement_group_cleaner.logger
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    getattr(importlib.import_module(module), name)()
    assert logger.getEffectiveLevel() == logging.ERROR and not logger.isEnabledFor(logging.WARNING)


def test_a_cluster_address_is_joined_without_the_embedded_settings(monkeypatch):
    import ray

    calls = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.update(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with raysession.ray_session(address="ray://head:10001"):
        pass
    assert calls["address"] == "ray://head:10001" and "runtime_env" not in calls


def test_blocks_of_cut_every_row_once_in_order():
    table = pa.table({"i": list(range(10))})
    blocks = raysession.blocks_of(table, 4)
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    assert pa.concat_tables(blocks).column("i").to_pylist() == list(range(10))
    assert raysession.blocks_of(table.slice(0, 0), 4)[0].num_rows == 0
