"""Interop with LLaDA's Hugging Face layout and SMDM's lit-gpt checkpoints (model/adapters.py, convert.py,
export.py): round trips, hand-written folders against an independent reference forward, refusals."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import Transformer
from model.adapters import Unsupported, halves_to_pairs, pairs_to_halves
from model.config import ModelConfig
from pretrain.config import ConfigError, load_run_config
from pretrain.interop.convert import (ConvertError, import_llada, import_smdm, load_llada_model, run_config, write_run)
from pretrain.interop.export import export_llada

# The keys of LLaDA's public config.json (GSAI-ML/LLaDA-8B-Base) that its loader reads; an export must spell out
# every one, since LLaDAConfig fills missing keys with GPT-2-like defaults (rope off, LayerNorm, tied weights).
LLADA_KEYS = {"d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_ratio", "mlp_hidden_size", "activation_type",
              "block_type", "block_group_size", "alibi", "alibi_bias_max", "rope", "rope_full_precision",
              "flash_attention", "attention_dropout", "multi_query_attention", "attention_layer_norm",
              "residual_dropout", "embedding_dropout", "input_emb_norm", "layer_norm_type", "layer_norm_with_affine",
              "rms_norm_eps", "attention_layer_norm_with_affine", "max_sequence_length", "rope_theta",
              "include_qkv_bias", "include_bias", "bias_for_layer_norm", "scale_logits", "vocab_size",
              "embedding_size", "weight_tying", "eos_token_id", "pad_token_id", "mask_token_id", "init_device",
              "init_fn", "init_std", "init_cutoff_factor", "precision", "architectures", "auto_map", "model_type",
              "use_cache"}
SHAPE = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "vocab_size", "mask_id", "max_seq_len",
         "rope_theta", "norm_eps")


# ----------------------------------------------------------------------------- an independent reference

def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half_rope(x, theta):
    """RoPE as LLaDA and lit-gpt document it: channel i rotates with channel i + D/2. x: (B, H, L, D)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(x.shape[2], dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(tokens, layers, emb, ln_f, head, *, heads, kv_heads, theta, eps):
    """layers: dicts with attn_norm, q, k, v, o, ff_norm, gate, up, down (plain matrices, rotate-half q/k)."""
    h = emb[tokens]
    b, L, d = h.shape
    hd = d // heads
    for p in layers:
        x = rms(h, p["attn_norm"], eps)
        q = (x @ p["q"].T).view(b, L, heads, hd).transpose(1, 2)
        k = (x @ p["k"].T).view(b, L, kv_heads, hd).transpose(1, 2)
        v = (x @ p["v"].T).view(b, L, kv_heads, hd).transpose(1, 2)
        q, k = rotate_half_rope(q, theta), rotate_half_rope(k, theta)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        h = h + att.transpose(1, 2).reshape(b, L, d) @ p["o"].T
        x = rms(h, p["ff_norm"], eps)
        h = h + (F.silu(x @ p["gate"].T) * (x @ p["up"].T)) @ p["down"].T
    return rms(h, ln_f, eps) @ head.T


# ----------------------------------------------------------------------------- fixtures

def bpe_tokenizer(vocab_size=300, mask="<|mdm_mask|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>", mask],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return tok


def llada_folder(tmp_path, *, block_type="llama", kv_heads=2, vocab=320, n_layers=2, dim=32, heads=4, ffn=48,
                 extra=None, shards=2, seed=0):
    """A LLaDA-format folder written from the documented names and shapes only, plus the plain matrices."""
    g = torch.Generator().manual_seed(seed)
    hd = dim // heads

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    pre = "model.transformer."
    tensors = {pre + "wte.weight": r(vocab, dim, scale=1.0), pre + "ln_f.weight": 1 + r(dim),
               pre + "ff_out.weight": r(vocab, dim)}
    layers = []
    for i in range(n_layers):
        p = dict(attn_norm=1 + r(dim), q=r(heads * hd, dim), k=r(kv_heads * hd, dim), v=r(kv_heads * hd, dim),
                 o=r(dim, dim), ff_norm=1 + r(dim), gate=r(ffn, dim), up=r(ffn, dim), down=r(dim, ffn))
        layers.append(p)
        b = f"{pre}blocks.{i}."
        tensors.update({b + "attn_norm.weight": p["attn_norm"], b + "ff_norm.weight": p["ff_norm"],
                        b + "attn_out.weight": p["o"], b + "ff_out.weight": p["down"]})
        if block_type == "llama":
            tensors.update({b + "q_proj.weight": p["q"], b + "k_proj.weight": p["k"], b + "v_proj.weight": p["v"],
                            b + "ff_proj.weight": p["gate"], b + "up_proj.weight": p["up"]})
        else:  # fused: att_proj = [q; k; v], ff_proj = [up; gate] (SwiGLU: silu(second half) * first half)
            tensors[b + "att_proj.weight"] = torch.cat([p["q"], p["k"], p["v"]])
            tensors[b + "ff_proj.weight"] = torch.cat([p["up"], p["gate"]])
    tok = bpe_tokenizer()
    mask_id = tok.token_to_id("<|mdm_mask|>")
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type":
              "silu" if block_type == "llama" else "swiglu", "block_type": block_type, "d_model": dim,
              "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": n_layers,
              "mlp_hidden_size": ffn if block_type == "llama" else 2 * ffn, "embedding_size": vocab,
              "vocab_size": vocab, "mask_token_id": mask_id, "eos_token_id": tok.token_to_id("<|endoftext|>"),
              "pad_token_id": tok.token_to_id("<|endoftext|>"), "rope": True, "rope_theta": 500000.0,
              "rms_norm_eps": 1e-5, "layer_norm_type": "rms", "weight_tying": False, "include_bias": False,
              "alibi": False, "max_sequence_length": 64, **(extra or {})}
    folder = tmp_path / f"llada-{block_type}"
    folder.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    ref = dict(layers=layers, emb=tensors[pre + "wte.weight"], ln_f=tensors[pre + "ln_f.weight"],
               head=tensors[pre + "ff_out.weight"], heads=heads, kv_heads=kv_heads, theta=500000.0, eps=1e-5)
    return folder, ref


def unmask_run(tmp_path, name="src", **shape):
    """A run directory with random weights and a BPE tokenizer, written the way an import writes one."""
    from data.tokenizer import TextTokenizer
    tok = bpe_tokenizer()
    tt = TextTokenizer(tok, mask_id=tok.token_to_id("<|mdm_mask|>"), eos_id=tok.token_to_id("<|endoftext|>"),
                       bos_id=tok.token_to_id("<|startoftext|>"))
    mcfg = ModelConfig(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=320,
                                 mask_id=tt.mask_id, max_seq_len=64, rope_theta=10000.0), **shape})
    model = Transformer(mcfg)
    model.init_weights(seed=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)  # gains off one, so a swapped norm would show
    dst = tmp_path / name
    write_run(dst, run_config(mcfg, dst, 64), dict(model.state_dict()), tt, {"format": "test"})
    return dst, model


# ----------------------------------------------------------------------------- tests

def test_rotary_permutation_is_an_exact_involution_pair():
    w = torch.randn(4 * 8, 16)
    assert torch.equal(halves_to_pairs(pairs_to_halves(w, 8), 8), w)
    assert not torch.equal(pairs_to_halves(w, 8), w)
    # Row 2i + c of a head (consecutive pairs) is row c * D/2 + i in the rotate-half layout.
    halves = pairs_to_halves(w, 8)
    assert torch.equal(halves[8 + 0 * 4 + 3], w[8 + 2 * 3 + 0]) and torch.equal(halves[8 + 1 * 4 + 3], w[8 + 7])


@pytest.mark.parametrize("block_type", ["llama", "sequential"])
def test_handwritten_llada_folder_imports_and_matches_reference_logits(tmp_path, block_type):
    folder, ref = llada_folder(tmp_path, block_type=block_type)
    final = import_llada(str(folder), tmp_path / "run")
    run = final.parent.parent
    from eval.load import load
    loaded = load(run)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = loaded.model(tokens)
        want = reference_logits(tokens, **ref)
    assert torch.allclose(ours, want, atol=2e-4, rtol=1e-4), (ours - want).abs().max()
    # The tokenizer became the run's, mask id included, and the model shape came from config.json.
    assert loaded.tokenizer.mask_id == json.loads((folder / "config.json").read_text())["mask_token_id"]
    assert loaded.cfg.model.mask_id == loaded.tokenizer.mask_id and loaded.cfg.model.kv_heads == 2
    assert loaded.step == 0 and (run / "tokenizer_config.json").is_file()
    # --ckpt given as the LLaDA folder itself: converted on the fly, the same logits.
    direct = load(folder)
    with torch.no_grad():
        assert torch.equal(direct.model(tokens), ours)
    assert direct.tokenizer.encode("the quick fox") == loaded.tokenizer.encode("the quick fox")


def test_unmask_to_llada_to_unmask_is_the_identity(tmp_path):
    src, model = unmask_run(tmp_path)
    out = export_llada(src, tmp_path / "llada", shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    config = json.loads((out / "config.json").read_text())
    assert LLADA_KEYS <= set(config), LLADA_KEYS - set(config)
    assert config["architectures"] == ["LLaDAModelLM"] and config["block_type"] == "llama" and config["rope"]
    assert config["weight_tying"] is False and config["layer_norm_type"] == "rms"
    names = set(index["weight_map"])
    assert "model.transformer.blocks.1.up_proj.weight" in names and "model.transformer.ff_out.weight" in names
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    card = (out / "README.md").read_text()
    assert "masked diffusion" in card and "optimizer steps" in card and "final validation bound" in card
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["mask_token"] == "<|mdm_mask|>" and (out / "tokenizer.json").is_file()

    back = import_llada(str(out), tmp_path / "back").parent.parent
    with pytest.raises(ConvertError, match="already holds checkpoints"):
        import_llada(str(out), back)
    from eval.load import load
    a, b = load(src), load(back)
    for (na, ta), (nb, tb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and ta.dtype == tb.dtype and torch.equal(ta, tb), na
    assert all(getattr(a.cfg.model, k) == getattr(b.cfg.model, k) for k in SHAPE)
    assert a.tokenizer.fingerprint == b.tokenizer.fingerprint
    tokens = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.equal(a.model(tokens), b.model(tokens))
        # The exported tensors read by the reference (LLaDA's documented math) give the original logits.
        sd = {}
        for f in shards:
            sd.update(load_file(str(out / f)))
        p = "model.transformer."
        layers = [{k: sd[f"{p}blocks.{i}.{n}.weight"] for k, n in (
            ("attn_norm", "attn_norm"), ("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "attn_out"),
            ("ff_norm", "ff_norm"), ("gate", "ff_proj"), ("up", "up_proj"), ("down", "ff_out"))} for i in range(2)]
        want = reference_logits(tokens, layers, sd[p + "wte.weight"], sd[p + "ln_f.weight"], sd[p + "ff_out.weight"],
                                heads=4, kv_heads=2, theta=10000.0, eps=1e-5)
        assert torch.allclose(model(tokens), want, atol=2e-4, rtol=1e-4)


def test_export_bf16_and_no_tokenizer_loss_of_ids(tmp_path):
    src, model = unmask_run(tmp_path)
    out = export_llada(src, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    sd = load_file(str(next(out.glob("model-*.safetensors"))))
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    loaded_model, mcfg, tok, _ = load_llada_model(out, dtype=torch.bfloat16)
    ref = {k: v.bfloat16() for k, v in model.state_dict().items()}
    assert all(torch.equal(loaded_model.state_dict()[k], v) for k, v in ref.items())
    assert tok.mask_id == mcfg.mask_id


@pytest.mark.parametrize("extra, words", [
    ({"alibi": True, "rope": False}, "alibi"),
    ({"include_bias": True}, "bias"),
    ({"layer_norm_type": "default"}, "RMSNorm"),
    ({"attention_layer_norm": True}, "q/k norms"),
    ({"block_type": "parallel"}, "block_type"),
])
def test_unsupported_llada_variants_are_refused_by_name(tmp_path, extra, words):
    folder, _ = llada_folder(tmp_path, extra=extra)
    with pytest.raises(Unsupported, match=words):
        import_llada(str(folder), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_other_families_are_refused_naming_what_is_missing(tmp_path):
    mdlm = tmp_path / "mdlm"
    mdlm.mkdir()
    (mdlm / "config.json").write_text(json.dumps({"model_type": "mdlm", "architectures": ["MDLM"]}))
    save_file({"backbone.blocks.0.adaLN_modulation.weight": torch.zeros(6, 2)}, str(mdlm / "model.safetensors"))
    with pytest.raises(Unsupported, match="adaLN"):
        import_llada(str(mdlm), tmp_path / "a")
    dream = tmp_path / "dream"
    dream.mkdir()
    (dream / "config.json").write_text(json.dumps({"model_type": "Dream", "architectures": ["DreamModel"]}))
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(2)}, str(dream / "model.safetensors"))
    with pytest.raises(Unsupported, match="biases on the q/k/v"):
        import_llada(str(dream), tmp_path / "b")
    with pytest.raises(ConvertError, match="does not exist"):
        import_llada(str(tmp_path / "nothing" / "here"), tmp_path / "c")
    # A hub id is looked up in the local cache only when offline (conftest sets HF_HUB_OFFLINE): a clear failure.
    with pytest.raises(ConvertError, match="as a hub id it could not be downloaded"):
        import_llada("unmask-tests/no-such-model", tmp_path / "d")


def test_smdm_checkpoint_imports_and_matches_reference_logits(tmp_path):
    g = torch.Generator().manual_seed(5)
    # SMDM: the tokenizer's ids are the (padded) vocabulary, the mask is the one id past them (Llama-2: 32000).
    tok = bpe_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    dim, heads, groups, ffn, n_layers, vocab = 32, 4, 2, 48, 2, tok.get_vocab_size(with_added_tokens=True)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.2

    hd, per = dim // heads, heads // groups
    sd = {"transformer.wte.weight": r(vocab + 1, dim) * 5, "lm_head.weight": r(vocab, dim),
          "transformer.ln_f.weight": 1 + r(dim)}
    layers = []
    for i in range(n_layers):
        p = dict(attn_norm=1 + r(dim), q=r(heads * hd, dim), k=r(groups * hd, dim), v=r(groups * hd, dim),
                 o=r(dim, dim), ff_norm=1 + r(dim), gate=r(ffn, dim), up=r(ffn, dim), down=r(dim, ffn))
        layers.append(p)
        # lit-gpt's fused qkv: per query group, its `per` query heads, then its key head, then its value head.
        qkv = torch.cat([p["q"].view(groups, per, hd, dim), p["k"].view(groups, 1, hd, dim),
                         p["v"].view(groups, 1, hd, dim)], 1).reshape(-1, dim)
        b = f"transformer.h.{i}."
        sd.update({b + "norm_1.weight": p["attn_norm"], b + "attn.attn.weight": qkv, b + "attn.proj.weight": p["o"],
                   b + "norm_2.weight": p["ff_norm"], b + "mlp.swiglu.w1.weight": p["gate"],
                   b + "mlp.swiglu.w2.weight": p["up"], b + "mlp.swiglu.w3.weight": p["down"]})
    save_file(sd, str(tmp_path / "smdm.safetensors"))
    run = import_smdm(str(tmp_path / "smdm.safetensors"), tmp_path / "run", n_heads=heads,
                      tokenizer=str(tmp_path / "tokenizer.json")).parent.parent
    from data.tokenizer import TextTokenizer
    tt = TextTokenizer.load(run)
    assert tt.mask_id == vocab and tt.vocab_size == vocab + 1 and tt.eos_id == tok.token_to_id("<|endoftext|>")
    from pretrain.checkpoint.weights import load_model_weights
    cfg = load_run_config(run)
    assert (cfg.model.vocab_size, cfg.model.mask_id, cfg.model.kv_heads) == (vocab + 1, vocab, groups)
    model = Transformer(cfg.model)
    load_model_weights(run / "checkpoints" / "step_00000000", model)
    tokens = torch.randint(0, vocab, (2, 20), generator=g)
    with torch.no_grad():
        ours = model(tokens)
        want = reference_logits(tokens, layers, sd["transformer.wte.weight"], sd["transformer.ln_f.weight"],
                                sd["lm_head.weight"], heads=heads, kv_heads=groups, theta=10000.0, eps=1e-5)
    # The head row of the mask id is zero (SMDM never predicts it; evaluation sets its logit to -inf).
    assert torch.allclose(ours[..., :vocab], want, atol=2e-4, rtol=1e-4) and torch.all(ours[..., vocab] == 0)
    # Imported without --tokenizer: evaluation refuses (it once fell back to the synthetic language's symbols).
    bare = import_smdm(str(tmp_path / "smdm.safetensors"), tmp_path / "bare", n_heads=heads).parent.parent
    from eval.load import load
    with pytest.raises(FileNotFoundError, match="imported without a tokenizer.*--tokenizer"):
        load(bare)


def _train(tmp_path, *extra, nproc=1):
    import subprocess
    import sys
    from pathlib import Path

    from dist_launch import env
    root = Path(__file__).resolve().parents[1]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    args = [*launcher, "-m", "pretrain", "--config", "configs/tiny.yaml", f"train.out_dir={tmp_path}",
            "train.samples=0", "logging.progress_bar=false", "logging.plot=false", "train.threads=1",
            "train.eval_batches=1", "train.global_batch_size=4", "data.seq_len=32", "train.peak_flops=1e12", *extra]
    done = subprocess.run(args, cwd=root, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_trained_run_round_trips_and_continued_pretraining_starts_from_its_weights(tmp_path):
    from pretrain.checkpoint.store import latest_checkpoint, read_trainer_state
    from pretrain.checkpoint.weights import load_model_weights
    # vocab 66 (the synthetic language has 65 ids): divisible by the tensor-parallel degree used below.
    _train(tmp_path, "train.name=a", "train.steps=2", "train.eval_every=2", "train.save_every=2",
           "train.ema_decay=0.5", "model.vocab_size=66")
    a = tmp_path / "a"
    out = export_llada(a, tmp_path / "a-llada")
    card = (out / "README.md").read_text()
    assert "final validation bound (step 2)" in card and "EMA of the weights" in card
    b = import_llada(str(out), tmp_path / "b").parent.parent
    from eval.load import load
    la, lb, raw = load(a), load(b), load(a, ema=False)  # the export carries the EMA, not the raw weights
    assert all(torch.equal(x, y) for x, y in zip(la.model.state_dict().values(), lb.model.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(raw.model.state_dict().values(), lb.model.state_dict().values()))
    raw_out = export_llada(a, tmp_path / "a-raw", weights="raw")
    assert "the trained weights (no EMA)" in (raw_out / "README.md").read_text()
    # Continued pretraining from the imported run, on 2 processes with tensor parallelism (the 1-process
    # checkpoint is resharded into the TP layout): weights only, fresh optimizer, step 0. With a zero learning
    # rate the weights must come through the step unchanged, and the run counts its own steps from zero.
    log = _train(tmp_path, "train.name=c", "train.steps=1", f"train.init_from={b}", "optim.lr=0", "optim.min_lr=0",
                 "optim.warmup_steps=0", "train.eval_every=1", "train.save_every=1", "model.vocab_size=66",
                 "parallel.tp=2", nproc=2)
    assert "initialised the weights from" in log and "resumed" not in log
    ckpt = latest_checkpoint(tmp_path / "c" / "checkpoints")
    assert read_trainer_state(ckpt)["step"] == 1
    model = Transformer(la.cfg.model)
    load_model_weights(ckpt, model)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), lb.model.state_dict().values()))
    # Requeued after a preemption with the same command: the run's own checkpoint wins over init_from.
    log = _train(tmp_path, "train.name=c", "train.steps=2", f"train.init_from={b}", "optim.lr=0", "optim.min_lr=0",
                 "optim.warmup_steps=0", "train.eval_every=1", "train.save_every=1", "model.vocab_size=66",
                 "parallel.tp=2", nproc=2)
    assert "initialised the weights from" not in log and "resumed at step 1" in log
    with pytest.raises(ConfigError, match="another model shape"):
        from pretrain.checkpoint.weights import load_init_weights
        load_init_weights(b, Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=
                                                     la.cfg.model.vocab_size, mask_id=la.cfg.model.mask_id)),
                          ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=la.cfg.model.vocab_size,
                                      mask_id=la.cfg.model.mask_id))


def test_llada_8b_base_config_is_the_llada_8b_preset():
    from model.config import get_preset
    from model.adapters import llada_model_config
    # The published config.json of GSAI-ML/LLaDA-8B-Base (the keys that shape the model).
    base = {"architectures": ["LLaDAModelLM"], "activation_type": "silu", "alibi": False, "block_type": "llama",
            "d_model": 4096, "embedding_size": 126464, "eos_token_id": 126081, "include_bias": False,
            "include_qkv_bias": False, "layer_norm_type": "rms", "mask_token_id": 126336, "max_sequence_length": 4096,
            "mlp_hidden_size": 12288, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081,
            "rms_norm_eps": 1e-05, "rope": True, "rope_theta": 500000.0, "scale_logits": False,
            "vocab_size": 126464, "weight_tying": False, "input_emb_norm": False, "attention_layer_norm": False}
    got, want = llada_model_config(base), get_preset("llada-8b")
    assert all(getattr(got, k) == getattr(want, k) for k in SHAPE)


def test_lm_eval_model_accepts_a_llada_folder(tmp_path):
    pytest.importorskip("lm_eval")
    from eval.lm_eval_model import UnmaskLM
    folder, ref = llada_folder(tmp_path)
    lm = UnmaskLM(pretrained=str(folder), device="cpu", dtype="fp32", mc_samples=2)
    tokens = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert torch.allclose(lm.run.model(tokens), reference_logits(tokens, **ref), atol=2e-4, rtol=1e-4)


def test_llada_export_of_a_dp2_tp2_checkpoint_matches_the_flat_export(tmp_path_factory, tmp_path):
    # The 4-process DP=2 x TP=2 run of tests/test_dist_checkpoint.py (run once per session, shared).
    from dist_launch import run_once
    from pretrain.interop.export import export
    four = run_once(tmp_path_factory, "four", 4, "four")
    flat = load_file(str(export(four / "dp2tp2", tmp_path / "flat") / "model.safetensors"))
    back = import_llada(str(export_llada(four / "dp2tp2", tmp_path / "llada")), tmp_path / "back")
    from eval.load import load
    got = load(back.parent.parent).model.state_dict()
    assert set(got) == set(flat) and all(torch.equal(got[k], flat[k]) for k in flat)
