"""Test-only fault injection: the one hook through which tests slow a stage down or learn which process to kill.

It is read from the environment variable ``DERMRAY_TEST_FAULTS`` (a JSON object) on the driver, when a stage
starts, and handed to the stage's workers explicitly; no run config, ``--set`` or YAML key reaches it, so a user
config cannot turn it on by accident. Unset (the normal case), every field is off.

    DERMRAY_TEST_FAULTS='{"slow_batch_s": 0.5, "pid_file": "/tmp/t/pid-{fold}", "events_file": "/tmp/t/ev-{fold}"}'
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from dermray.errors import UserError

ENV = "DERMRAY_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    slow_batch_s: float = 0.0  # sleep after every model batch (training and scoring): a fault can land mid-run
    pid_file: str | None = None  # a training worker writes its PID here ({fold} is replaced)
    events_file: str | None = None  # a training worker appends each epoch it starts ({fold} is replaced)
    consumed_file: str | None = None  # a training worker appends the image ids it trains on ({fold} is replaced)

    def for_fold(self, fold) -> "Faults":
        def fmt(v):
            return v.format(fold=fold) if v else v

        return Faults(self.slow_batch_s, fmt(self.pid_file), fmt(self.events_file), fmt(self.consumed_file))


NONE = Faults()


def from_env() -> Faults:
    raw = os.environ.get(ENV)
    if not raw:
        return NONE
    try:
        data = json.loads(raw)
        known = {f.name for f in fields(Faults)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} (known: {sorted(known)})")
        return Faults(**data)
    except (ValueError, TypeError) as e:
        raise UserError(f"{ENV}: {e}") from e
