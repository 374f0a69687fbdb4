"""``ray job submit --working-dir . -- python -m jobs.dedup --config jobs/configs/filter_demo.yaml [--added DIR ...]``.

pHash de-duplication of each method's added images (``raugment dedup``): of each ``--added``
artifact (e.g. a filter output), else ``study.methods``' sources -> filter -> dedup.
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["dedup", *sys.argv[1:]]))
