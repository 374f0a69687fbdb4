"""Scripts for ``ray job submit --working-dir . -- python -m jobs.<name> --config jobs/configs/X.yaml``.

Each is a thin wrapper over ``raugment.cli.main``; the submitted working directory is on
``sys.path``, so ``import raugment`` finds the package shipped with the job.
"""
