"""``ray job submit --working-dir . -- python -m jobs.retrieve --config CONFIG.yaml``.

CLIP kNN retrieval with quota growth and downloads (``raugment retrieve``: the dataset, the local
index when retrieval builds one, then retrieval). On the offline demo corpus, which the demo
serves on 127.0.0.1: ``raugment demo --target retrieve --config jobs/configs/retrieve_demo.yaml``.
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrieve", *sys.argv[1:]]))
