"""The study: the planner, the executor, one-target studies and Ray Tune sweeps.

The planner holds the stage graph, written once; the executor runs a plan resumably; one-target
studies are `raugment <stage>`.
"""
