"""``ray job submit --working-dir . -- python -m jobs.generate --config jobs/configs/generate_tiny.yaml``.

Generate images with Stable Diffusion (``raugment generate``); pick the method with
``--set generate.method=sariyildiz`` (simple, simple_nows, clip_templates, sariyildiz, boomerang,
or a fine-tuned one).
"""

import sys

from raugment.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
