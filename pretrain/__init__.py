"""Pretraining, in rooms that import one way (loop -> engines -> checkpoint -> config; interop -> checkpoint):

- config.py: the typed run configuration every room reads (`python -m pretrain --config ...`: __main__.py);
- loop/: the training loop and its step (train, step, evaluate, lr, guard, metrics, flops, preemption);
- engines/: how the model runs on devices (parallel: FSDP2/TP layouts and the mesh; native; deepspeed);
- checkpoint/: storage (store: writing, verifying, listing; ema; weights: reading any checkpoint's weights;
  resume: choosing, rolling back, comparing configs; `python -m pretrain.checkpoint.resume`);
- interop/: other formats (`python -m pretrain.interop.convert`, `python -m pretrain.interop.export`);
- plot.py: loss curves (`python -m pretrain.plot`). The objectives live next to the model (model/objectives/).

Nothing imports loop/ but __main__.py (and the launchers, tests and benchmarks that run training).
"""
