"""Core: config machinery and errors, resources, schema, storage (the stage contract), shared artifact readers, registry, image io, stats, extras. Knows no stage; imports neither torch nor Ray."""
