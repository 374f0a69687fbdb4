"""Runtime: where things run. Knows no stage.

Ray start-up, the GPU policy, leased actor pools, DDP worker groups and the training-loop contexts.
"""
