"""Runtime: where things run. Ray start-up, the GPU policy, leased actor pools, DDP worker groups and the training-loop contexts. Knows no stage."""
