"""`ray job submit ... -- python jobs/partition.py --config FILE [--set k=v ...]`: the partition stage on a cluster.

Inside a Ray job, RAY_ADDRESS is set, so the stage joins the job's cluster instead of starting its own.
"""
import sys

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["partition", *sys.argv[1:]]))
