"""Core: config machinery and errors, resources, schema, storage (the stage contract), shared artifact readers.

Also the registry, image io, stats and extras. Knows no stage; imports neither torch nor Ray.
"""
