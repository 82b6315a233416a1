"""The training loop and its step: train.py (setup, then the loop), step.py (one optimizer step), evaluate.py
(validation loss), lr.py (the learning rate), guard.py (bad steps), metrics.py (where numbers go), flops.py
(peak FLOP/s and compute budgets), preemption.py (signals)."""
