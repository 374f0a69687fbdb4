"""The study: the planner (the stage graph, written once), the executor that runs a plan resumably, one-target studies (`raugment <stage>`), and Ray Tune sweeps."""
