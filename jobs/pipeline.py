"""`ray job submit ... -- python jobs/pipeline.py --config FILE [--set k=v ...]`: the whole pipeline as one job
(partition -> train -> score -> evaluate -> saliency; `make demo-cluster` submits it, cluster/demo-cluster.sh)."""
import sys

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
