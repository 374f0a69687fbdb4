"""Stage `generate`."""
