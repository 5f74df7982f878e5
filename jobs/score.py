"""`ray job submit ... -- python jobs/score.py --config FILE [--set k=v ...]`: the scoring stage on a cluster."""
import sys

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
