"""``ray job submit --working-dir . -- python -m jobs.tune --config jobs/configs/train_demo.yaml``."""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
