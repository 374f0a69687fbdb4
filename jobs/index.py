"""``ray job submit --working-dir . -- python -m jobs.index build --config jobs/configs/retrieve_demo.yaml``.

Builds a local CLIP kNN index (``raugment index build``); ``--set index.path=...`` says where.
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
