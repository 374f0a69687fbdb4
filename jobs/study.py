"""Run a whole study on a Ray cluster: ``python -m jobs.study --config jobs/configs/imagenet10.yaml``."""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
