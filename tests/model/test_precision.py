"""bf16 numerics of the training path (issue 21): RoPE rotates in float32 as LLaDA's modeling code does, and the
chunked head sums its weight gradient over chunks in float32."""

import torch

from llada_scale.model.head import linear_cross_entropy
from llada_scale.model.rope import rotary_cos_sin
from llada_scale.model.transformer import ModelConfig, Transformer


def test_bf16_rope_rotates_in_float32():
    """Finding 4: q and k of a bf16 model equal the rotation of the bf16 projections computed in float32 with
    float32 tables, then cast to bf16 (LLaDA modeling_llada.py and our llada_remote code: ``rotate(q.float(),
    cos, sin).to(dtype)``). Same float32 operations in the same order, so equal bit for bit; rotating in bf16
    with bf16 tables rounds three more times."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = Transformer(cfg).to(torch.bfloat16)
    attn = model.model.layers[0].self_attn
    seen = []  # the (x, cos, sin) the model's own forward hands to the attention
    attn.register_forward_pre_hook(lambda mod, args: seen.append(args[:3]))
    pos = torch.arange(1000, 1048).expand(2, 48)  # large angles: where bf16 tables are coarsest
    model(torch.randint(0, 64, (2, 48)), position_ids=pos)
    x, model_cos, model_sin = seen[0]
    q, k, _ = attn.qkv(x, model_cos, model_sin)
    cos, sin = rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)

    def rotate(t):  # per-pair rotation, float32
        t = t.float()
        half = t.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        return torch.cat([t[..., :half] * c - t[..., half:] * s, t[..., half:] * c + t[..., :half] * s], -1)

    b, n = 2, 48
    q_ref = rotate(attn.q_proj(x).view(b, n, 4, 16).transpose(1, 2)).bfloat16()
    k_ref = rotate(attn.k_proj(x).view(b, n, 2, 16).transpose(1, 2)).bfloat16()
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def test_chunked_head_weight_gradient_bf16_error_is_that_of_one_chunk():
    """Finding 5: with bf16 weights and 64 chunks, the head-weight gradient's error against a float64 reference
    stays within 1.25x that of a single chunk (a bf16 running sum grows it with the number of chunks)."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 2048, 64, 512
    hidden = torch.randn(n, d, generator=g).bfloat16()
    weight = (torch.randn(v, d, generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, v, (n,), generator=g)

    def grad(h, w, chunk):
        w = w.clone().requires_grad_()
        linear_cross_entropy(h, w, labels, chunk_size=chunk).sum().backward()
        return w.grad

    ref = grad(hidden.double(), weight.double(), n)
    err = {c: float((grad(hidden, weight, c).double() - ref).norm() / ref.norm()) for c in (n, 32)}
    assert grad(hidden, weight, 32).dtype == torch.bfloat16
    assert err[32] <= 1.25 * err[n], err
