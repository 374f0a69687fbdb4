"""Stage `filter`."""
