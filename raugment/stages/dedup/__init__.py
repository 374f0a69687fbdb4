"""Stage `dedup`."""
