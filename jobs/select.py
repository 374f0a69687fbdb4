"""``ray job submit --working-dir . -- python -m jobs.select --config jobs/configs/finetune_tiny.yaml``.

Checkpoint selection of ``finetune.method`` (``raugment select``): fine-tuning, then a small
generated set and a classifier per candidate checkpoint; the best validation top-1 is chosen.
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
