"""Stage `finetune`."""
