"""Pretraining: config, objective, training loop, checkpoints, parallelism."""
