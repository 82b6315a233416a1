"""Bad configs fail at start-up with a message naming the key and the valid choices."""
import pytest

from pretrain.config import ConfigError, load_config
from pretrain.loop.lr import lr_at


@pytest.mark.parametrize("override, message", [
    (["train.stesp=3"], "unknown config key train.stesp. Did you mean train.steps?"),
    (["trian.steps=3"], "Did you mean train?"),
    (["train.steps=abc"], "train.steps must be an integer"),
    (["diffusion.schedule=cosin"], "choose one of: linear, cosine"),
    (["model.preset=llada8b"], "Did you mean llada-8b?"),
    (["diffusion.objective=ar"], "needs model.causal=true"),
    (["model.causal=true"], "diffusion.objective=mdm needs model.causal=false"),
    (["data.seq_len=4096", "model.max_seq_len=128"], "exceeds model.max_seq_len"),
    (["optim.min_lr=1", "optim.lr=0.1"], "exceeds optim.lr"),
    (["data.kind=prepared"], "needs data.sources"),
    (["train.steps"], "must look like key.sub=value"),
    (["model.causal=maybe"], "must be true or false"),
])
def test_bad_config_messages(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", override)
    assert message in str(e.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3}\nmodle: {dim: 4}\n")
    with pytest.raises(ConfigError, match="Did you mean model"):
        load_config(str(bad))


def test_overrides_and_presets_apply():
    cfg = load_config("configs/tiny.yaml", ["model.preset=19M", "model.n_layers=3", "optim.lr=1e-3",
                                            "optim.betas=[0.9,0.99]", "diffusion.objective=ar", "model.causal=true",
                                            "data.seq_len=32"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.preset) == (384, 3, "19M")
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99)


def test_string_overrides_stay_strings():
    """YAML would read `off`, `yes` or `1e3` as a bool or number; a str field takes the text as written."""
    cfg = load_config("configs/tiny.yaml", ["train.name=off", "train.out_dir=1e3", "train.init_from=yes"])
    assert (cfg.train.name, cfg.train.out_dir, cfg.train.init_from) == ("off", "1e3", "yes")
    cfg = load_config("configs/tiny.yaml", ["train.steps=7", "model.causal=false"])  # typed fields still parse
    assert cfg.train.steps == 7 and cfg.model.causal is False


def test_lr_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=100)
    cos = [lr_at(s, schedule="cosine", **kw) for s in range(100)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:])) and cos[-1] == pytest.approx(0.1, abs=1e-3)
    wsd = [lr_at(s, schedule="wsd", decay_fraction=0.2, **kw) for s in range(100)]
    assert all(v == 1.0 for v in wsd[10:80]) and wsd[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(wsd[80:], wsd[81:]))
