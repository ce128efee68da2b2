"""Training: building components from a config, the per-rank loop, checkpoints, resume and the epoch table."""
