"""Launchers: torchrun, slurm, and the memory planner."""
