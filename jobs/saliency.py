"""`ray job submit ... -- python jobs/saliency.py --config FILE [--set k=v ...]`: the saliency stage on a cluster."""
import sys

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["saliency", *sys.argv[1:]]))
