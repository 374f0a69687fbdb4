"""Stage `index`."""
