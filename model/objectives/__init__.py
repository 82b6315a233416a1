"""Objectives of the discrete-diffusion family behind one interface (base.py), one file each.

Adding an objective: a file here with a registered `Objective` subclass, its import below, and its tests.
docs/objectives.md describes the interface and has a row per objective.
"""
from .base import (OBJECTIVES, EvalDraw, Noised, Objective, StepNoise, build_objective, draw_step_noise, noise_level,
                   pad, register, sample_u, step_generator)
from .config import DiffusionConfig
from .schedules import (SCHEDULES, CosAlphaSchedule, CosineSchedule, LinearSchedule, PolySchedule, Schedule,
                        get_schedule)

# Registration: importing a module registers its objective.
from . import mdm, ar, genmd4, block, uniform, hybrid, sedd, d3pm, dfm  # noqa: E402,F401  isort: skip

__all__ = ["OBJECTIVES", "CosAlphaSchedule", "CosineSchedule", "DiffusionConfig", "LinearSchedule", "PolySchedule",
            "EvalDraw", "Noised", "Objective", "SCHEDULES", "Schedule", "StepNoise",
           "build_objective", "draw_step_noise", "get_schedule", "noise_level", "pad", "register", "sample_u",
           "step_generator"]
