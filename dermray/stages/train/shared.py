"""What the training modules share: the stage's name, its logger, the final model's fold name and the names of
a fold's records."""
from __future__ import annotations

import logging

from dermray.runtime import layout

log = logging.getLogger("dermray.train")
STAGE = "train"
FINAL = layout.FINAL_FOLD
LINEAGE_FILE = "lineage.json"
# A fold's summary row, written last: a fold that has it (from the same lineage, its weights as recorded) is finished.
FINISHED_FILE = "fold_result.json"
