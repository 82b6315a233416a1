"""eval.scaling on a noise-type sweep (masked, hybrid, uniform, AR): a compute multiplier against AR and
N_opt ~ C^a for every diffusion objective, in the JSON and the markdown."""
import json

from eval import scaling
from tests.test_scaling_fit import planted_sweep


def test_every_noise_type_gets_a_multiplier_and_an_exponent(tmp_path):
    rows = planted_sweep({"ar": 0.0, "mdm": 0.2, "hybrid": 0.3, "uniform": 0.5}, seed=3)
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = scaling.analyse(d, boot=10, seed=0, plots=False)
    mults = res["multipliers"]
    assert set(mults) == {"mdm", "hybrid", "uniform"}
    geo = {o: m["geomean"] for o, m in mults.items()}
    assert 1 < geo["mdm"] < geo["hybrid"] < geo["uniform"]  # worse loss at every budget: more compute
    for o in mults:
        assert abs(res["isoflop"][o]["a"] - 0.5) < 0.1  # the planted N_opt ~ C^0.5
    md = (d / "scaling" / "scaling.md").read_text()
    assert "Per noise type" in md and "| uniform |" in md
