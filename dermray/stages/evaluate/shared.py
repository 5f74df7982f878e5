"""What the evaluation modules share: the stage's name and its logger."""
from __future__ import annotations

import logging

log = logging.getLogger("dermray.evaluate")
STAGE = "evaluate"
