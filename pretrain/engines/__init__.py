"""How the model runs on devices: parallel.py (process groups, the mesh, FSDP2/TP layouts), native.py
(NativeEngine, build_engine) and deepspeed.py (DeepSpeedEngine): backward, optimizer step, checkpoints."""
