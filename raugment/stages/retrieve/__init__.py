"""Stage `retrieve`."""
