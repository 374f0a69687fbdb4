"""Personalisation of a diffusion model to a classification dataset (paper 3.1, methods 5-9).

The stage module is :mod:`raugment.finetune`; this package holds its parts, one job each:

* :mod:`~raugment.personalise.policy`: pure training policy (square-root LR scaling, early
  stopping, which epochs keep a checkpoint, the held-out validation split).
* :mod:`~raugment.personalise.methods`: the five methods (registered in ``FINETUNERS``), the
  trainable module and the Stable Diffusion denoising loss.
* :mod:`~raugment.personalise.loop`: the worker loop of both runners (DDP, latent cache, checkpoints,
  resume after a worker failure).
* :mod:`~raugment.personalise.outputs`: the on-disk artifact (safetensors + tables) and loading it.
* :mod:`~raugment.personalise.generation`: generation methods of the same names, so the generator
  samples from a fine-tuning artifact.
"""
