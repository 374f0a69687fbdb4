"""One package per stage. Stages never import each other: they meet through artifacts.

Each owns its code (`stage.py`: `run(cfg, *inputs) -> Artifact`), its config section (`config.py`) and
its plug-in folder.
"""
