"""Stage `train`."""
