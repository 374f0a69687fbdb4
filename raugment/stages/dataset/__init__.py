"""Stage `dataset`."""
