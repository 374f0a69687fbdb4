"""``ray job submit --working-dir . -- python -m jobs.filter --config jobs/configs/filter_demo.yaml [--added DIR ...]``.

Filters each added-image artifact, then de-duplicates them together (``raugment filter``).
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
