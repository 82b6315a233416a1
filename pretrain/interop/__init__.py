"""Other projects' formats: convert.py (python -m pretrain.interop.convert from-llada|from-smdm SRC DST) and
export.py (python -m pretrain.interop.export RUN --format llada|safetensors --out DIR). The state-dict
adapters themselves live next to the model (model/adapters.py)."""
