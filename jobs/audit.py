"""``ray job submit --working-dir . -- python -m jobs.audit --config jobs/configs/filter_demo.yaml``.

Options: ``[--dataset DIR] [--added DIR ...]``.

The test-leakage audit (``raugment audit``), per method: candidate pairs, ``summary.json`` and
``gallery.html``. ``--added DIR`` is what the audit reads (e.g. a dedup output); without it the
methods of ``study.methods`` are planned up to their audit.
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
