"""``ray job submit --working-dir . -- python -m jobs.index build --config jobs/configs/retrieve_demo.yaml --set index.path=...``.

Builds a local CLIP kNN index (``raugment index build``).
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
