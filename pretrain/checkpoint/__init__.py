"""Checkpoint storage: store.py (writing atomically, manifests, listing, the run-or-checkpoint resolver),
ema.py (the EMA of the weights), weights.py (a checkpoint's weights, whichever engine wrote it) and
resume.py (which checkpoint a run resumes from, rollbacks; python -m pretrain.checkpoint.resume)."""
