"""What a fine-tuned diffusion model is.

The learned-table families, the denoising loss and the fine-tuning artifact (snapshots, checkpoints,
pointers). Written by the finetune stage, read by generate, select and report.
"""
