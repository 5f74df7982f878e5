"""`ray job submit ... -- python jobs/train.py --config FILE [--set k=v ...]`: the training stage on a cluster."""
import sys

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
