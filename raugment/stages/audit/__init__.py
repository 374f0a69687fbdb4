"""Stage `audit`."""
