"""Model numerics against references computed another way, and document-mask isolation."""

import math

import pytest
import torch

from llada_scale.model.attention import build_mask, mask_from_mod
from llada_scale.model.rope import apply_rotary, rope_inv_freq, rotary_cos_sin
from llada_scale.model.transformer import ModelConfig, Transformer, load_weights, preset, resize_vocab


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
    mscale = 1.0
    if cfg.rope_scaling is not None:
        inv = torch.tensor(yarn_inv_freq_reference(hd, cfg.rope_theta, cfg.rope_scaling), dtype=torch.float32)
        mscale = cfg.rope_scaling["attention_factor"]
    ang = torch.arange(l).float()[:, None] * inv  # [L, D/2]

    def rope(v):  # v [L, D], rotate pairs (i, i + D/2) as complex numbers (scaled by YaRN's mscale)
        z = torch.complex(v[:, : hd // 2], v[:, hd // 2:]) * torch.polar(torch.full_like(ang, mscale), ang)
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


def yarn_inv_freq_reference(head_dim, theta, rs):
    """YaRN inverse frequencies in float64 Python, one index at a time, written from minimind's
    precompute_freqs_cis (jingyaogong/minimind model/model_minimind.py): the NTK-by-parts ramp of
    Peng et al. 2023 (arXiv:2309.00071, Sec. 3.2) taken linear in the index between the rounded
    indices where the original context holds beta_fast resp. beta_slow rotations."""
    half = head_dim // 2
    orig, s = rs["original_max_position_embeddings"], rs["factor"]

    def index_of(rotations):  # solve L / (2 pi theta^(2d/D)) = rotations for d
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(index_of(rs["beta_fast"])), 0)
    high = min(math.ceil(index_of(rs["beta_slow"])), half - 1)
    out = []
    for d in range(half):
        ramp = min(max((d - low) / max(high - low, 0.001), 0.0), 1.0)
        out.append(theta ** (-2 * d / head_dim) * ((1 - ramp) + ramp / s))
    return out


YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
        "attention_factor": 1.25}


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


@pytest.mark.parametrize("causal", [True, False])
def test_yarn_forward_matches_naive_reference(causal):
    torch.manual_seed(0)
    model = Transformer(small(causal=causal, rope_scaling=YARN)).double()
    ids = torch.randint(0, 128, (1, 40))
    allowed = torch.ones(40, 40, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    ours = model(ids)
    torch.testing.assert_close(ours, naive_forward(model, ids, allowed), rtol=1e-5, atol=1e-6)
    plain = Transformer(small(causal=causal)).double()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(ids), ours, atol=1e-3)  # the scaling changes the output


def test_rope_scaling_none_is_bit_identical():
    """rope_scaling=None (and omitting it) gives exactly the plain-RoPE tables computed before YaRN existed."""
    pos = torch.arange(300).reshape(3, 100)
    for hd, theta in ((16, 10000.0), (64, 5e5)):
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        emb = torch.cat([pos.float()[..., None] * inv] * 2, dim=-1)[:, None]
        for dtype in (torch.float32, torch.bfloat16):
            for cos, sin in (rotary_cos_sin(pos, hd, theta, dtype), rotary_cos_sin(pos, hd, theta, dtype, None)):
                assert torch.equal(cos, emb.cos().to(dtype)) and torch.equal(sin, emb.sin().to(dtype))
    assert ModelConfig().rope_scaling is None


@pytest.mark.parametrize("head_dim,theta,orig,factor", [(16, 10000.0, 32, 8.0), (64, 1e6, 2048, 16.0),
                                                        (128, 5e5, 4096, 4.0), (16, 100.0, 2048, 16.0)])
def test_yarn_inv_freq_matches_formula(head_dim, theta, orig, factor):
    rs = ModelConfig(hidden_size=head_dim * 2, num_heads=2, num_kv_heads=2, rope_theta=theta,
                     rope_scaling={"type": "yarn", "factor": factor,
                                   "original_max_position_embeddings": orig}).rope_scaling
    assert rs == {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig, "beta_fast": 32.0,
                  "beta_slow": 1.0, "attention_factor": 1.0}  # minimind's defaults filled in
    inv, mscale = rope_inv_freq(head_dim, theta, rs)
    ref = torch.tensor(yarn_inv_freq_reference(head_dim, theta, rs), dtype=torch.float64)
    torch.testing.assert_close(inv.double(), ref, rtol=2e-6, atol=0)
    assert mscale == 1.0
    # the paper's limits: dimensions with >= beta_fast rotations inside L keep theta_d, < beta_slow get theta_d / s
    plain, _ = rope_inv_freq(head_dim, theta)
    rotations = orig * plain.double() / (2 * math.pi)
    keep, interp = rotations >= 32, rotations <= 1
    assert keep.any() or interp.any()
    assert torch.equal(inv[keep], plain[keep])
    torch.testing.assert_close(inv[interp].double(), plain[interp].double() / factor, rtol=1e-6, atol=0)
    # cos/sin carry attention_factor
    pos = torch.arange(50)[None]
    cos, sin = rotary_cos_sin(pos, head_dim, theta, torch.float32, {**rs, "attention_factor": 1.5})
    ang = pos.float()[..., None] * inv
    torch.testing.assert_close(cos[0, 0], 1.5 * torch.cat([ang.cos(), ang.cos()], -1)[0])
    torch.testing.assert_close(sin[0, 0], 1.5 * torch.cat([ang.sin(), ang.sin()], -1)[0])


def test_rope_scaling_validation():
    ok = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64}
    cfg = ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64})
    assert cfg.rope_scaling["type"] == "yarn"
    assert ModelConfig(**cfg.to_dict()) == cfg  # normalised dict round-trips through config.json
    for bad, msg in ((["yarn"], "must be a dict"), ({**ok, "type": "linear"}, "not supported"),
                     ({**ok, "mscale": 1.0}, "unsupported key"), ({"type": "yarn", "factor": 4}, "needs"),
                     ({**ok, "factor": 0.5}, ">= 1"),
                     ({**ok, "beta_fast": 1, "beta_slow": 2}, "beta_fast > beta_slow"),
                     ({**ok, "original_max_position_embeddings": 10.5}, "positive integer"),
                     ({**ok, "attention_factor": 0}, "> 0"), ({**ok, "factor": "4"}, "finite number"),
                     ({**ok, "rope_type": "linear"}, "conflicting")):
        with pytest.raises(ValueError, match=msg):
            ModelConfig(rope_scaling=bad)


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
