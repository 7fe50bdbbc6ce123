"""Model numerics against references computed another way, and document-mask isolation."""

import math

import pytest
import torch

from llada_scale.attention import build_mask, mask_from_mod
from llada_scale.model import ModelConfig, Transformer, apply_rotary, load_weights, preset, resize_vocab, rotary_cos_sin


def small(**kw):
    base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def naive_forward(model: Transformer, ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Reference forward with explicit per-head loops, repeat-kv GQA and complex-number RoPE."""
    cfg = model.config
    sd = model.state_dict()
    x = sd["model.embed_tokens.weight"][ids]
    l = ids.shape[1]
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(l).float()[:, None] * inv  # [L, D/2]

    def rope(v):  # v [L, D], rotate pairs (i, i + D/2) as complex numbers
        z = torch.complex(v[:, : hd // 2], v[:, hd // 2:]) * torch.polar(torch.ones_like(ang), ang)
        return torch.cat([z.real, z.imag], -1)

    def norm(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * w

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])[0]
        q = h @ sd[p + "self_attn.q_proj.weight"].T
        k = h @ sd[p + "self_attn.k_proj.weight"].T
        v = h @ sd[p + "self_attn.v_proj.weight"].T
        outs = []
        for head in range(cfg.num_heads):
            kv = head // (cfg.num_heads // cfg.num_kv_heads)
            qh = rope(q[:, head * hd:(head + 1) * hd])
            kh = rope(k[:, kv * hd:(kv + 1) * hd])
            s = qh @ kh.T / math.sqrt(hd)
            s = s.masked_fill(~allowed, float("-inf"))
            outs.append(torch.softmax(s, -1) @ v[:, kv * hd:(kv + 1) * hd])
        x = x + (torch.cat(outs, -1) @ sd[p + "self_attn.o_proj.weight"].T)[None]
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
    x = norm(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("causal", [True, False])
def test_forward_matches_naive_reference(causal):
    torch.manual_seed(0)
    model = Transformer(small(causal=causal)).double()
    ids = torch.randint(0, 128, (1, 12))
    allowed = torch.ones(12, 12, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    ours = model(ids)
    ref = naive_forward(model, ids, allowed)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # RoPE tables are float32


def test_rotary_is_relative():
    """q.k after RoPE depends only on the position difference (RoFormer sec. 3.4.2)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rotary_cos_sin(torch.tensor([[pq]]), 16, 10000.0, torch.float32)
        ck, sk = rotary_cos_sin(torch.tensor([[pk]]), 16, 10000.0, torch.float32)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_document_isolation(causal, backend):
    """Changing one document's tokens leaves every other document's outputs in the packed row unchanged,
    and each document's outputs equal running it alone (positions restart per document)."""
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    model = Transformer(small(causal=causal, attention_backend=backend)).eval()
    lengths = [5, 7, 4]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, 128, (1, sum(lengths)))
    with torch.no_grad():
        out = model(ids, position_ids=pos, document_ids=doc)
        ids2 = ids.clone()
        ids2[0, 5:12] = torch.randint(0, 128, (7,))  # rewrite document 1
        out2 = model(ids2, position_ids=pos, document_ids=doc)
        keep = doc[0] != 1
        torch.testing.assert_close(out[0, keep], out2[0, keep], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[0, ~keep], out2[0, ~keep])
        start = 0
        for n in lengths:  # each document alone
            alone = model(ids[:, start:start + n])
            torch.testing.assert_close(out[:, start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


def test_dense_mask_matches_flex_mask_definition():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    dense = build_mask(doc, causal=True, q_len=6, kv_len=6, batch_size=1, device="cpu", backend="sdpa")
    brute = torch.tensor([[doc[0, i] == doc[0, j] and j <= i for j in range(6)] for i in range(6)])
    assert torch.equal(dense[0, 0], brute)
    full = mask_from_mod(lambda b, h, q, kv: kv >= 0, 1, 3, 5, "cpu", "sdpa")
    assert full.shape == (1, 1, 3, 5) and bool(full.all())


def test_presets_and_llada8b_shape():
    cfg = preset("llada-8b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size) == \
        (32, 4096, 32, 12288, 126464)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("nope")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=100, num_heads=3)


def test_hf_llama_module_names():
    names = set(Transformer(small()).state_dict())
    for n in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.norm.weight", "lm_head.weight"):
        assert n in names
    assert "lm_head.weight" not in Transformer(small(tie_embeddings=True)).state_dict()


def test_resize_vocab_and_shape_errors():
    model = Transformer(small())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    grown = resize_vocab(sd, 192)
    assert grown["model.embed_tokens.weight"].shape == (192, 64)
    torch.testing.assert_close(grown["lm_head.weight"][:128], sd["lm_head.weight"])
    torch.testing.assert_close(grown["lm_head.weight"][150], sd["lm_head.weight"].mean(0))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight: ckpt \[192, 64\] vs model \[128, 64\]"):
        load_weights(model, grown, source="ckpt")
    bad = dict(sd)
    del bad["model.norm.weight"]
    with pytest.raises(ValueError, match="missing keys"):
        load_weights(model, bad)
