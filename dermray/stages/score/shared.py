"""What the scoring modules share: the stage's name, its logger, the internal columns of the work rows."""
from __future__ import annotations

import logging

log = logging.getLogger("dermray.score")
STAGE = "score"
END_OF_SHARD = "<end of shard>"  # a marker row: its part total is the shard's sample count
# Columns the work rows carry besides the input's own: the input row, the part, the part's size, the row's hash.
ROW, CHUNK, TOTAL, ROW_HASH = "__row", "__chunk", "__chunk_total", "__row_hash"
INTERNAL = (ROW, CHUNK, TOTAL, ROW_HASH, "row", "input_row_hash")
# In the predictions: the fingerprint of the input row an image was scored from (image_id and every column the input
# gave it). An image is "already scored" only with the same row: a relabelled image is scored again.
INPUT_ROW_HASH = "input_row_hash"
