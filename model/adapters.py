"""State-dict adapters between unmask's Transformer and the checkpoint layouts other masked-diffusion projects
publish: LLaDA's Hugging Face folder (`LLaDAModelLM`) and SMDM's lit-gpt `TransEncoder`.

Only names, shapes and the two layout facts that matter are encoded here; no modeling code of either project:

- LLaDA and SMDM apply rotary embeddings to the two *halves* of each head (channel i pairs with i + D/2),
  unmask to *consecutive pairs* (channel 2i pairs with 2i + 1). The same rotation results when the rows of
  the query and key projections are permuted within every head, so import and export permute those rows
  (`halves_to_pairs` / `pairs_to_halves`, exact inverses: weights round-trip bit for bit).
- LLaDA's "llama" block keeps q/k/v and gate/up separate (q_proj, k_proj, v_proj, ff_proj = gate,
  up_proj = up, ff_out = down); its "sequential" block fuses them (att_proj = [q; k; v], ff_proj = [up; gate]
  for its SwiGLU, which computes silu(second half) * first half). SMDM fuses q/k/v per query group.

Configurations that unmask's model cannot express are refused with `Unsupported`, naming what is missing.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .config import _SMDM_GRID, ModelConfig

LLADA_PREFIX = "model.transformer."
LLADA_ARCH = "LLaDAModelLM"


class Unsupported(ValueError):
    """A checkpoint whose architecture unmask's Transformer does not implement."""


def is_llada_folder(path) -> bool:
    """Whether `path` is a Hugging Face folder whose config.json names LLaDA's architecture."""
    path = Path(path)
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        c = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return LLADA_ARCH in (c.get("architectures") or []) or c.get("model_type") == "llada"


# ----------------------------------------------------------------------------- rotary layout

def halves_to_pairs(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection in the rotate-half layout -> unmask's consecutive-pair layout."""
    out_dim, d_in = w.shape
    return w.reshape(out_dim // head_dim, 2, head_dim // 2, d_in).transpose(1, 2).reshape(out_dim, d_in)


def pairs_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of halves_to_pairs."""
    out_dim, d_in = w.shape
    return w.reshape(out_dim // head_dim, head_dim // 2, 2, d_in).transpose(1, 2).reshape(out_dim, d_in)


# ----------------------------------------------------------------------------- LLaDA: config

# Every field of LLaDA's ModelConfig that changes the computation, with the value unmask's model implies. The
# LLaDAConfig constructor fills missing keys with GPT-2-like defaults (alibi off but also rope off, LayerNorm,
# tied weights, dropout 0.1, ...), so an export writes all of them explicitly.
_LLADA_FIXED = {
    "activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "rope": True, "rope_full_precision": True, "alibi": False, "alibi_bias_max": 8.0, "include_bias": False,
    "include_qkv_bias": False, "bias_for_layer_norm": False, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True, "scale_logits": False, "input_emb_norm": False,
    "weight_tying": False, "block_group_size": 1, "multi_query_attention": None,
    "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
    "flash_attention": False, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "init_cutoff_factor": None, "precision": "amp_bf16", "use_cache": False,
}


def _refusals(c: dict) -> list[str]:
    """What in a LLaDA config.json unmask's Transformer cannot express (empty: importable)."""
    get = c.get
    out = []
    if get("alibi", False):
        out.append("alibi=true (ALiBi attention biases; unmask uses rotary embeddings only)")
    if not get("rope", False) and not get("alibi", False):
        out.append("rope=false (learned absolute position embeddings `wpe`; unmask uses rotary embeddings)")
    if get("include_bias", False):
        out.append("include_bias=true (biases in linear layers; unmask's linears have none)")
    if get("include_qkv_bias", False):
        out.append("include_qkv_bias=true (q/k/v biases; unmask's linears have none)")
    if get("bias_for_layer_norm") or (get("bias_for_layer_norm") is None and get("include_bias", False)):
        out.append("layer-norm biases (bias_for_layer_norm); unmask's RMSNorm has a gain only")
    if get("layer_norm_type", "default") != "rms":
        out.append(f"layer_norm_type={get('layer_norm_type', 'default')!r} (unmask implements RMSNorm, 'rms')")
    if get("attention_layer_norm", False):
        out.append("attention_layer_norm=true (q/k norms; not in unmask's attention)")
    if get("scale_logits", False):
        out.append("scale_logits=true (logits scaled by 1/sqrt(d_model))")
    if get("input_emb_norm", False):
        out.append("input_emb_norm=true (embeddings scaled by sqrt(d_model))")
    block, act = get("block_type", "sequential"), get("activation_type", "swiglu")
    if block == "llama" and act != "silu":
        out.append(f"block_type=llama with activation_type={act!r} (unmask's feed-forward is SwiGLU: "
                   f"silu(ff_proj x) * up_proj x)")
    elif block == "sequential" and act != "swiglu":
        out.append(f"block_type=sequential with activation_type={act!r} (only the SwiGLU feed-forward maps)")
    elif block not in ("llama", "sequential"):
        out.append(f"block_type={block!r} (unmask implements sequential pre-norm blocks: 'llama' or 'sequential')")
    if get("block_group_size", 1) != 1:
        out.append(f"block_group_size={get('block_group_size')} (grouped block names)")
    if get("d_model", 0) % max(get("n_heads", 1), 1):
        out.append("d_model not divisible by n_heads")
    return out


def _kv_heads(c: dict) -> int:
    if c.get("n_kv_heads") is not None:
        return int(c["n_kv_heads"])
    return 1 if c.get("multi_query_attention") else int(c["n_heads"])


def _ffn_dim(c: dict) -> int:
    hidden = c.get("mlp_hidden_size") or c.get("mlp_ratio", 4) * c["d_model"]
    # The sequential block's SwiGLU splits ff_proj's output in two: the down projection reads half of it.
    return int(hidden) // 2 if c.get("block_type", "sequential") == "sequential" else int(hidden)


def llada_model_config(c: dict) -> ModelConfig:
    """unmask's ModelConfig for a LLaDA config.json (as a dict); Unsupported names what cannot be expressed."""
    arch = c.get("architectures") or []
    if c.get("model_type") not in (None, "llada") or (arch and LLADA_ARCH not in arch):
        raise Unsupported(f"config.json describes {arch or c.get('model_type')!r}, not {LLADA_ARCH}")
    missing = [k for k in ("d_model", "n_layers", "n_heads") if k not in c]
    if missing:
        raise Unsupported(f"config.json lacks {', '.join(missing)}: not a LLaDA model config")
    problems = _refusals(c)
    if problems:
        raise Unsupported("this LLaDA-format model uses features unmask's Transformer does not implement: "
                          + "; ".join(problems))
    vocab = c.get("embedding_size") or c.get("vocab_size")
    head_dim = c["d_model"] // c["n_heads"]
    if head_dim % 2:
        raise Unsupported(f"head dim {head_dim} is odd: rotary embeddings need an even head dim")
    mask_id = c.get("mask_token_id")
    return ModelConfig(dim=int(c["d_model"]), n_layers=int(c["n_layers"]), n_heads=int(c["n_heads"]),
                       n_kv_heads=_kv_heads(c), ffn_dim=_ffn_dim(c), vocab_size=int(vocab),
                       mask_id=None if mask_id is None else int(mask_id),
                       max_seq_len=int(c.get("max_sequence_length", 4096)),
                       rope_theta=float(c.get("rope_theta", 10000.0)), norm_eps=float(c.get("rms_norm_eps", 1e-5)))


def llada_config_json(m: ModelConfig, *, eos_id: Optional[int], pad_id: Optional[int], dtype: str = "bfloat16",
                      extra: Optional[dict] = None) -> dict:
    """config.json for an unmask model in LLaDA's layout (the keys LLaDA's loader reads, all explicit)."""
    if m.causal:
        raise Unsupported("model.causal=true (an autoregressive model): LLaDA's attention is bidirectional")
    if getattr(m, "time_conditioning", "none") != "none":
        raise Unsupported(f"model.time_conditioning={m.time_conditioning}: LLaDA's format has no time-conditioning "
                          f"weights (the time embedding and the adaLN modulation of every block and of the final "
                          f"norm), and exporting the other weights alone would silently change the model's "
                          f"predictions; export it in unmask's own format instead (--format safetensors)")
    eos = eos_id  # None for a tokenizer without one (the synthetic language)
    return {
        "architectures": [LLADA_ARCH],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "model_type": "llada",
        "d_model": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.kv_heads,
        "mlp_hidden_size": m.ffn_dim, "mlp_ratio": max(1, m.ffn_dim // m.dim),
        "vocab_size": m.vocab_size, "embedding_size": m.vocab_size,
        "max_sequence_length": m.max_seq_len, "train_max_sequence_length": m.max_seq_len,
        "rope_theta": m.rope_theta, "rms_norm_eps": m.norm_eps,
        "mask_token_id": m.mask_id, "eos_token_id": eos, "pad_token_id": pad_id if pad_id is not None else eos,
        **_LLADA_FIXED,
        "torch_dtype": dtype,
        **(extra or {}),
    }


# ----------------------------------------------------------------------------- LLaDA: weights

def llada_names(m: ModelConfig) -> Iterator[tuple[str, str]]:
    """(unmask name, LLaDA name) for every parameter, in model order ("llama" block layout)."""
    p = LLADA_PREFIX
    yield "tok_embeddings.weight", p + "wte.weight"
    for i in range(m.n_layers):
        b = f"{p}blocks.{i}."
        yield f"layers.{i}.attention_norm.weight", b + "attn_norm.weight"
        yield f"layers.{i}.attention.wq.weight", b + "q_proj.weight"
        yield f"layers.{i}.attention.wk.weight", b + "k_proj.weight"
        yield f"layers.{i}.attention.wv.weight", b + "v_proj.weight"
        yield f"layers.{i}.attention.wo.weight", b + "attn_out.weight"
        yield f"layers.{i}.ffn_norm.weight", b + "ff_norm.weight"
        yield f"layers.{i}.feed_forward.w1.weight", b + "ff_proj.weight"
        yield f"layers.{i}.feed_forward.w3.weight", b + "up_proj.weight"
        yield f"layers.{i}.feed_forward.w2.weight", b + "ff_out.weight"
    yield "norm.weight", p + "ln_f.weight"
    yield "output.weight", p + "ff_out.weight"


def to_llada(name: str, t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """One unmask tensor in LLaDA's layout (q/k rows permuted to the rotate-half order)."""
    if name.endswith(("attention.wq.weight", "attention.wk.weight")):
        return pairs_to_halves(t, m.head_dim)
    return t


def from_llada_tensors(c: dict, m: ModelConfig, keys: set[str],
                       get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(unmask name, tensor) for every parameter, reading LLaDA tensors one at a time through `get(name)`.

    Handles both block types, tied weights and norms without affine gains; any key left unread is an error
    (a tensor unmask's model has no place for)."""
    p, hd = LLADA_PREFIX, m.head_dim
    used: set[str] = set()

    def read(key: str) -> torch.Tensor:
        if key not in keys:
            raise Unsupported(f"the checkpoint has no tensor {key!r} (its config says block_type="
                              f"{c.get('block_type', 'sequential')!r}); is the index complete?")
        used.add(key)
        return get(key)

    def norm(key: str) -> torch.Tensor:
        if key in keys or c.get("layer_norm_with_affine", True):
            return read(key)
        return torch.ones(m.dim)  # norms without affine gains: a gain of one is the same function

    yield "tok_embeddings.weight", read(p + "wte.weight")
    q_dim, kv_dim = m.n_heads * hd, m.kv_heads * hd
    for i in range(m.n_layers):
        b, o = f"{p}blocks.{i}.", f"layers.{i}."
        yield o + "attention_norm.weight", norm(b + "attn_norm.weight")
        if c.get("block_type", "sequential") == "llama":
            yield o + "attention.wq.weight", halves_to_pairs(read(b + "q_proj.weight"), hd)
            yield o + "attention.wk.weight", halves_to_pairs(read(b + "k_proj.weight"), hd)
            yield o + "attention.wv.weight", read(b + "v_proj.weight")
        else:
            q, k, v = read(b + "att_proj.weight").split((q_dim, kv_dim, kv_dim), dim=0)
            yield o + "attention.wq.weight", halves_to_pairs(q, hd)
            yield o + "attention.wk.weight", halves_to_pairs(k, hd)
            yield o + "attention.wv.weight", v.clone()
        yield o + "attention.wo.weight", read(b + "attn_out.weight")
        yield o + "ffn_norm.weight", norm(b + "ff_norm.weight")
        if c.get("block_type", "sequential") == "llama":
            yield o + "feed_forward.w1.weight", read(b + "ff_proj.weight")
            yield o + "feed_forward.w3.weight", read(b + "up_proj.weight")
        else:
            up, gate = read(b + "ff_proj.weight").chunk(2, dim=0)
            yield o + "feed_forward.w1.weight", gate.clone()
            yield o + "feed_forward.w3.weight", up.clone()
        yield o + "feed_forward.w2.weight", read(b + "ff_out.weight")
    yield "norm.weight", norm(p + "ln_f.weight")
    if c.get("weight_tying", False):
        # Tied input/output embedding: unmask keeps an untied head, initialised to the same matrix.
        yield "output.weight", get(p + "wte.weight").clone()
    else:
        yield "output.weight", read(p + "ff_out.weight")
    left = sorted(k for k in keys - used if not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise Unsupported(f"{len(left)} tensors have no counterpart in unmask's Transformer, e.g. {left[:3]}")


# ----------------------------------------------------------------------------- SMDM (lit-gpt TransEncoder)

_SMDM_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")


def smdm_model_config(shapes: dict[str, tuple[int, ...]], n_heads: Optional[int] = None,
                      n_kv_heads: Optional[int] = None, max_seq_len: int = 2048) -> ModelConfig:
    """Shape of an SMDM `TransEncoder` checkpoint from its tensor shapes. The head count is not in the tensors:
    it comes from `n_heads`, else from SMDM's own size grid (layers and width identify the model)."""
    need = ("transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight")
    if any(k not in shapes for k in need):
        raise Unsupported(f"not an SMDM TransEncoder checkpoint: it lacks {[k for k in need if k not in shapes]}")
    if any(".bias" in k for k in shapes):
        raise Unsupported("the checkpoint has bias tensors (lit-gpt bias=true); unmask's linears have none")
    rows, dim = shapes["transformer.wte.weight"]
    n_layers = 1 + max(int(m.group(1)) for k in shapes if (m := _SMDM_LAYER.match(k)))
    if "transformer.h.0.mlp.swiglu.w1.weight" not in shapes:
        raise Unsupported("the blocks have no SwiGLU (mlp.swiglu.w1/w2/w3): only SMDM's LLaMAMLP maps to unmask")
    ffn = shapes["transformer.h.0.mlp.swiglu.w1.weight"][0]
    if n_heads is None:
        match = [h for (layers, h, d) in _SMDM_GRID.values() if layers == n_layers and d == dim]
        if len(match) != 1:
            raise Unsupported(f"cannot tell the head count of a {n_layers}-layer, width-{dim} model: pass --n-heads")
        n_heads = match[0]
    head_dim = dim // n_heads
    qkv_rows = shapes["transformer.h.0.attn.attn.weight"][0]
    groups = n_kv_heads or (qkv_rows // head_dim - n_heads) // 2
    if (n_heads + 2 * groups) * head_dim != qkv_rows:
        raise Unsupported(f"fused qkv has {qkv_rows} rows, which {n_heads} heads of {head_dim} cannot explain")
    if shapes["lm_head.weight"][0] not in (rows, rows - 1):
        raise Unsupported(f"lm_head has {shapes['lm_head.weight'][0]} rows for an embedding of {rows}")
    # SMDM's embedding has one extra row, the mask token (id = padded vocabulary size); its head predicts the
    # padded vocabulary only. unmask's head covers every id, so the mask row of the head is zero-filled:
    # evaluation and sampling set the mask logit to -inf (SUBS), where this is exact.
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=groups, ffn_dim=ffn,
                       vocab_size=rows, mask_id=rows - 1, max_seq_len=max_seq_len, rope_theta=10000.0,
                       norm_eps=1e-5)


def from_smdm_tensors(m: ModelConfig, keys: set[str],
                      get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    hd, per = m.head_dim, m.n_heads // m.kv_heads
    used: set[str] = set()

    def read(key):
        used.add(key)
        return get(key)

    yield "tok_embeddings.weight", read("transformer.wte.weight")
    for i in range(m.n_layers):
        b, o = f"transformer.h.{i}.", f"layers.{i}."
        yield o + "attention_norm.weight", read(b + "norm_1.weight")
        # lit-gpt fuses q/k/v per query group: [q_1 .. q_per, k, v] for each group, head_dim rows each.
        qkv = read(b + "attn.attn.weight").reshape(m.kv_heads, per + 2, hd, m.dim)
        yield o + "attention.wq.weight", halves_to_pairs(qkv[:, :per].reshape(-1, m.dim), hd)
        yield o + "attention.wk.weight", halves_to_pairs(qkv[:, per].reshape(-1, m.dim), hd)
        yield o + "attention.wv.weight", qkv[:, per + 1].reshape(-1, m.dim).clone()
        yield o + "attention.wo.weight", read(b + "attn.proj.weight")
        yield o + "ffn_norm.weight", read(b + "norm_2.weight")
        yield o + "feed_forward.w1.weight", read(b + "mlp.swiglu.w1.weight")  # silu(w1 x) * w2 x, then w3
        yield o + "feed_forward.w3.weight", read(b + "mlp.swiglu.w2.weight")
        yield o + "feed_forward.w2.weight", read(b + "mlp.swiglu.w3.weight")
    yield "norm.weight", read("transformer.ln_f.weight")
    head = read("lm_head.weight")
    if head.shape[0] < m.vocab_size:
        head = torch.cat([head, head.new_zeros(m.vocab_size - head.shape[0], m.dim)])
    yield "output.weight", head
    left = sorted(keys - used)
    if left:
        raise Unsupported(f"{len(left)} tensors have no counterpart in unmask's Transformer, e.g. {left[:3]}")


# ----------------------------------------------------------------------------- families we refuse

def refuse_other_family(config: Optional[dict], keys: set[str]) -> None:
    """Raise Unsupported with what is missing for the masked-diffusion families unmask does not implement."""
    mt = str((config or {}).get("model_type", "")).lower()
    arch = " ".join((config or {}).get("architectures") or []).lower()
    if mt == "mdlm" or "mdlm" in arch or any("adaLN_modulation" in k or "sigma_map" in k for k in keys):
        raise Unsupported(
            "this is MDLM's DiT (diffusion transformer), which unmask does not implement. Missing: timestep "
            "conditioning (sigma_map embedding and per-block adaLN modulation of shift/scale/gate), LayerNorm with "
            "biases (unmask: RMSNorm), a GELU MLP with biases (unmask: SwiGLU without biases), fused qkv with "
            "rotary embeddings applied to the fused tensor, and the adaLN-modulated final layer. Train an "
            "unmask model with diffusion.objective=mdm instead, or evaluate MDLM with its own code.")
    if mt == "dream" or "dream" in arch:
        raise Unsupported(
            "this is Dream (a Qwen2 transformer), which unmask does not implement. Missing: biases on the q/k/v "
            "projections (Qwen2 attention_bias; unmask's linears have none), and Dream's shifted prediction "
            "(the logit at position i predicts token i + 1, inherited from its autoregressive initialisation; "
            "unmask predicts each masked position in place).")
    if mt in ("llama", "qwen2", "mistral") or any(a in arch for a in ("llamaforcausallm", "qwen2forcausallm")):
        raise Unsupported(f"{arch or mt} is an autoregressive Hugging Face model: its weights are not a masked "
                          f"diffusion model, and its layout (model.layers.N.self_attn...) is not imported here")
