"""``ray job submit --working-dir . -- python -m jobs.dataset --config jobs/configs/imagenet10.yaml``."""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["dataset", *sys.argv[1:]]))
