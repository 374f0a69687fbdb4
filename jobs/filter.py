"""``ray job submit --working-dir . -- python -m jobs.filter --config jobs/configs/filter_demo.yaml [--added DIR ...]``.

The filter stage of each method's added images (``raugment filter``): of each ``--added`` artifact,
else of ``study.methods``' sources (planned, run or skipped as in a study). ``jobs.dedup`` de-duplicates.
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
