"""The unit tier's rule, enforced: no Ray and no process of Python, Ray, a shell or make. (A library's own quick
helper, such as `git rev-parse` for the version stamp, is allowed.)"""
import os
import subprocess
import sys

import pytest

REFUSED = {"python", "python3", "ray", "bash", "sh", "make", "dermray", "kubectl", "chromium"}


@pytest.fixture(autouse=True)
def _no_ray_and_no_heavy_processes(monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("a unit test started Ray: it belongs in tests/stage")

    real_init = subprocess.Popen.__init__

    def checked_init(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        program = os.path.basename(str(argv[0]).split()[0]) if argv else ""
        if argv and (str(argv[0]) == sys.executable or program in REFUSED or program.startswith("python")):
            raise AssertionError(f"a unit test started {program!r}: it belongs in tests/system")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(subprocess.Popen, "__init__", checked_init)
