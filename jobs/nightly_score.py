"""`python jobs/nightly_score.py --config FILE [--set k=v ...]`: tonight's scoring job (KubeRay RayCronJob / CronJob).

Scores the images the current model has not scored yet, evaluates everything it has scored, writes the night's
metrics partition, and exits 3 with a one-line reason when a configured floor (nightly.min_auc,
nightly.max_quarantined_share) is missed; 2 on a configuration or input error.
"""
import sys

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
