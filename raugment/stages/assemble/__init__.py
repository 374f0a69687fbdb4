"""Stage `assemble`."""
