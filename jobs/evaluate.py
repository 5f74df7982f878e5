"""`ray job submit ... -- python jobs/evaluate.py --config FILE [--set k=v ...]`: the evaluation stage."""
import sys

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
