"""What the saliency modules share: the stage's name, its logger, the training-class target's name."""
from __future__ import annotations

import logging
import re

log = logging.getLogger("dermray.saliency")
STAGE = "saliency"
TRAINING_CLASS = "__training_class__"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
