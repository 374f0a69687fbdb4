"""``ray job submit --working-dir . -- python -m jobs.retrieve --config jobs/configs/retrieve_demo.yaml [--demo-pool DIR]``.

CLIP kNN retrieval with quota growth and downloads (``raugment retrieve``).
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrieve", *sys.argv[1:]]))
