"""``ray job submit --working-dir . -- python -m jobs.assemble --config jobs/configs/train_demo.yaml``."""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["assemble", *sys.argv[1:]]))
