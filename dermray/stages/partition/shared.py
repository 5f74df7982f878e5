"""What the partition modules share: the stage's name, its logger, the rows a map task reads."""
from __future__ import annotations

import logging

log = logging.getLogger("dermray.partition")
STAGE = "partition"
CHUNK_ROWS = 500_000  # target rows per map task (row groups are never split)
