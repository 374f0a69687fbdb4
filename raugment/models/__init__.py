"""Model loading: real hub ids and tiny random-weight bundles go through the same code."""
