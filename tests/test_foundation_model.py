"""Model shapes, parameter counts, attention masks."""
import pytest
import torch

from model import PRESETS, ModelConfig, Transformer, count_params, get_preset
from model.attention import attention


def meta_counts(name):
    cfg = get_preset(name)
    cfg.vocab_size = cfg.vocab_size or 256
    with torch.device("meta"):
        return cfg, count_params(Transformer(cfg))


def test_llada_8b_parameter_count_on_meta_device():
    cfg, c = meta_counts("llada-8b")
    assert round(c["total"] / 1e9, 2) == 8.02
    assert round(c["non_embedding"] / 1e9, 2) == 6.98
    assert c["embedding"] == 2 * 126464 * 4096
    assert cfg.mask_id == 126336


def test_smdm_grid_sizes_match_their_names():
    # science.md: 20 * 16 * 1792^2 + norms = 1,027,677,952 for '1028M'
    assert meta_counts("1028M")[1]["non_embedding"] == 1_027_677_952
    for name in [n for n in PRESETS if n.endswith("M") and n[:-1].isdigit()]:
        nonemb = meta_counts(name)[1]["non_embedding"]
        assert abs(nonemb / 1e6 - int(name[:-1])) <= 1, (name, nonemb)


def test_tiny_is_under_one_million():
    assert meta_counts("tiny")[1]["total"] < 1_000_000


def _model(causal, **kw):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=20, mask_id=19,
                                max_seq_len=64, causal=causal, **kw))
    m.init_weights(seed=0)
    return m.eval()


@pytest.mark.parametrize("kv", [None, 2])
def test_future_token_changes_past_output_only_in_mdm_mode(kv):
    x = torch.randint(0, 19, (1, 12), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 9] = (x[0, 9] + 1) % 19  # change a "future" token
    with torch.no_grad():
        for causal, should_change in [(False, True), (True, False)]:
            m = _model(causal, n_kv_heads=kv)
            past_a, past_b = m(x)[0, :9], m(y)[0, :9]
            assert (not torch.allclose(past_a, past_b, atol=1e-6)) == should_change


def test_document_mask_blocks_attention_across_documents():
    m = _model(False)
    x = torch.randint(0, 19, (1, 10), generator=torch.Generator().manual_seed(2))
    doc = torch.tensor([[0] * 4 + [1] * 6])
    y = x.clone()
    y[0, 7] = (x[0, 7] + 3) % 19  # change a token in document 1
    with torch.no_grad():
        a, b = m(x, doc_ids=doc), m(y, doc_ids=doc)
        assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)  # document 0 cannot see it
        assert not torch.allclose(a[0, 4:], b[0, 4:], atol=1e-6)
        # Each document alone gives the same outputs as inside the packed row.
        # (RoPE is relative, so document 1 alone at positions 0.. matches positions 4.. in the pack.)
        alone = m(x[:, 4:])
        assert torch.allclose(alone[0], a[0, 4:], atol=1e-5)


def test_key_padding_hides_padded_tokens():
    m = _model(False)
    x = torch.randint(0, 19, (1, 8), generator=torch.Generator().manual_seed(3))
    pad = torch.tensor([[True] * 6 + [False] * 2])
    y = x.clone()
    y[0, 6:] = 0
    with torch.no_grad():
        assert torch.allclose(m(x, key_padding=pad)[0, :6], m(y, key_padding=pad)[0, :6], atol=1e-6)
        assert torch.allclose(m(x, key_padding=pad)[0, :6], m(x[:, :6])[0], atol=1e-5)


def test_logits_at_matches_full_head():
    m = _model(False)
    x = torch.randint(0, 19, (2, 8))
    at = torch.rand(2, 8) < 0.5
    with torch.no_grad():
        assert torch.allclose(m(x, logits_at=at), m(x)[at], atol=1e-6)


def test_flash_backend_without_cuda_says_what_to_do():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="attn_backend=sdpa"):
        attention(q, q, q, causal=False, backend="flash")


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        Transformer(ModelConfig(dim=30, n_heads=4, vocab_size=10))
    with pytest.raises(ValueError, match="multiple"):
        Transformer(ModelConfig(dim=32, n_heads=4, n_kv_heads=3, vocab_size=10))
