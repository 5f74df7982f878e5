"""Partition stage: manifest + taxonomy -> training_classes, labels (image_id, class_index, fold), quarantine.

Distributed on Ray as map-side partial aggregation over the manifest's Parquet row groups, so the driver holds
per-node and per-bucket counts, never per-image rows:

1. map (one task per chunk of row groups): validate rows; count valid images per taxonomy node and per
   (node, group-hash bucket); hash-partition compact (image hash, row) and (group hash, node) pairs;
2. reduce (one task per hash partition): find duplicate image_ids (keep the first row) and groups whose images
   carry more than one label; return only those (few) rows;
3. driver: the partitioning algorithm on the per-node counts, then a fold table per stratum (training class, or
   the shared "mixed" stratum for groups spanning classes) from the per-bucket counts;
4. map again: assign class and fold to each row, quarantine bad rows with a reason; the driver streams the
   chunks into single Parquet files, written atomically.

Rows are numbered from 0 in manifest order; quarantine reasons name the row.

Modules, in the order a run goes through them: ``inputs`` (what it reads, checked before Ray starts), ``chunks``
(the per-chunk logic the tasks run), ``passes`` (the map and reduce passes as Ray tasks), ``neardup`` (near-duplicate
images, grouped before the folds are cut), ``stage`` (``run``, ``lineage_now``, the tables and summary); ``shared``
holds the stage's name.
"""
from dermray.stages.partition.shared import STAGE
from dermray.stages.partition.stage import counts, format_summary, lineage_now, run

__all__ = ["STAGE", "counts", "format_summary", "lineage_now", "run"]
