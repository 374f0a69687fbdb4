"""``ray job submit --working-dir . -- python -m jobs.finetune --config jobs/configs/finetune_tiny.yaml``.

Fine-tune Stable Diffusion (``raugment finetune``, methods 5-9); pick the method with
``--set finetune.method=textual_inversion``.
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
