"""``ray job submit --working-dir . -- python -m jobs.audit --config jobs/configs/filter_demo.yaml [--dataset DIR] [--added DIR ...]``.

The test-leakage audit (``raugment audit``): candidate pairs, ``summary.json`` and ``gallery.html``.
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
