"""LLaDA2 MoE backbone: logits against a straightforward per-token reference written here, router choices on a
hand-made example, the lean-head loss and the KV-cache walk, refusals of shapes outside the release."""

import math

import pytest
import torch
import torch.nn.functional as F

from llada_scale.model.llada2_moe import LLaDA2Config, LLaDA2MoeModel
from llada_scale.model.moe import MoEBlock, route

TINY = dict(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
            intermediate_size=48, max_seq_len=64, rope_theta=600000.0, norm_eps=1e-6, partial_rotary_factor=0.5,
            first_k_dense_replace=1, moe_intermediate_size=8, num_experts=8, num_shared_experts=1,
            num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, mask_token_id=95)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LLaDA2MoeModel(LLaDA2Config(**{**TINY, **overrides}))
    with torch.no_grad():  # make the selection bias matter
        for _, block in model.moe_layers():
            block.gate.expert_bias.copy_(torch.randn(block.gate.expert_bias.shape) * 0.05)
    return model.eval()


# ---- independent reference: one token at a time, python loops over heads, experts and groups --------------

def ref_rms(x, w, eps):
    return w * (x / math.sqrt(float((x * x).mean()) + eps))


def ref_rotate(v, pos, rot, theta):
    """Rotate dims (i, i + rot/2) of v by angle pos * theta^(-2i/rot), i < rot/2; other dims unchanged."""
    out = v.clone()
    half = rot // 2
    for i in range(half):
        a = pos * theta ** (-2 * i / rot)
        c, s = math.cos(a), math.sin(a)
        out[i] = v[i] * c - v[i + half] * s
        out[i + half] = v[i + half] * c + v[i] * s
    return out


def ref_swiglu(x, g, u, d):
    return d @ (F.silu(g @ x) * (u @ x))


def ref_moe_token(x, sd, p, cfg):
    scores = torch.sigmoid(sd[p + "gate.weight"] @ x)
    biased = scores + sd[p + "gate.expert_bias"]
    size = cfg.num_experts // cfg.n_group
    group_score = [sum(sorted(biased[g * size:(g + 1) * size].tolist(), reverse=True)[:2]) for g in range(cfg.n_group)]
    groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
    eligible = [e for e in range(cfg.num_experts) if e // size in groups]
    chosen = sorted(eligible, key=lambda e: -float(biased[e]))[:cfg.num_experts_per_tok]
    w = torch.stack([scores[e] for e in chosen])
    w = w / w.sum() * cfg.routed_scaling_factor
    y = sum(w[j] * ref_swiglu(x, sd[p + "experts.gate_proj"][e], sd[p + "experts.up_proj"][e],
                               sd[p + "experts.down_proj"][e]) for j, e in enumerate(chosen))
    return y + ref_swiglu(x, sd[p + "shared_experts.gate_proj.weight"], sd[p + "shared_experts.up_proj.weight"],
                          sd[p + "shared_experts.down_proj.weight"])


def reference_logits(model, ids, allowed=None, positions=None, state=None):
    """[L, V] logits of one row; ``allowed[q][k]`` = query q may attend key k (default all); RoPE positions
    default 0..L-1; ``state``: weights under our names (default the model's)."""
    positions = list(range(len(ids))) if positions is None else positions
    cfg = model.config
    sd = {k: v.double() for k, v in (model.state_dict() if state is None else state).items()}
    n, hd, nh, nkv = len(ids), cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    xs = [sd["model.embed_tokens.weight"][t] for t in ids]
    for li in range(cfg.num_layers):
        p = f"model.layers.{li}."
        qs, ks, vs = [], [], []
        for x, pos in zip(xs, positions):
            h = ref_rms(x, sd[p + "input_layernorm.weight"], cfg.norm_eps)
            qkv = sd[p + "self_attn.qkv_proj.weight"] @ h
            heads = [qkv[j * hd:(j + 1) * hd] for j in range(nh + 2 * nkv)]
            qs.append([ref_rotate(ref_rms(heads[j], sd[p + "self_attn.q_norm.weight"], cfg.norm_eps), pos,
                                  cfg.rotary_dim, cfg.rope_theta) for j in range(nh)])
            ks.append([ref_rotate(ref_rms(heads[nh + j], sd[p + "self_attn.k_norm.weight"], cfg.norm_eps), pos,
                                  cfg.rotary_dim, cfg.rope_theta) for j in range(nkv)])
            vs.append(heads[nh + nkv:])
        new = []
        for qpos, x in enumerate(xs):
            keys = [k for k in range(n) if allowed is None or allowed[qpos][k]]
            outs = []
            for j in range(nh):
                kv = j // (nh // nkv)
                logits = torch.stack([qs[qpos][j] @ ks[k][kv] for k in keys]) / math.sqrt(hd)
                a = torch.softmax(logits, 0)
                outs.append(sum(a[i] * vs[k][kv] for i, k in enumerate(keys)))
            x = x + sd[p + "self_attn.o_proj.weight"] @ torch.cat(outs)
            h = ref_rms(x, sd[p + "post_attention_layernorm.weight"], cfg.norm_eps)
            if cfg.is_moe_layer(li):
                x = x + ref_moe_token(h, sd, p + "mlp.", cfg)
            else:
                x = x + ref_swiglu(h, sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"],
                                   sd[p + "mlp.down_proj.weight"])
            new.append(x)
        xs = new
    return torch.stack([sd["lm_head.weight"] @ ref_rms(x, sd["model.norm.weight"], cfg.norm_eps) for x in xs])


def test_logits_match_per_token_reference():
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
    for b in range(2):
        ref = reference_logits(model, ids[b].tolist())
        torch.testing.assert_close(logits[b].double(), ref, rtol=1e-5, atol=1e-5)


def test_block_diffusion_mask_matches_reference():
    """Document mask through document_ids: token q sees only keys of its own document."""
    model = tiny_model(seed=3)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        logits = model(ids, document_ids=doc)
    allowed = [[doc[0, q] == doc[0, k] for k in range(6)] for q in range(6)]
    torch.testing.assert_close(logits[0].double(), reference_logits(model, ids[0].tolist(), allowed),
                               rtol=1e-5, atol=1e-5)


def test_router_group_limit_and_bias_change_choice_not_weights():
    # 8 experts in 4 groups of 2; choose 2 experts from the best 2 groups.
    p = torch.tensor([[0.90, 0.10, 0.80, 0.70, 0.85, 0.05, 0.30, 0.20]])
    logits = torch.log(p / (1 - p))  # sigmoid(logits) == p
    zero = torch.zeros(8)
    idx, w, _ = route(logits, zero, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    # group scores (sum of best two): g0 1.00, g1 1.50, g2 0.90, g3 0.50 -> groups 1 and 0; expert 4 (0.85,
    # group 2) is the second best score overall but its group is not eligible
    assert idx.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.90, 0.80]]) / 1.70 * 2.0)
    # a bias of 0.3 on expert 5 lifts group 2 to 0.85 + 0.35 = 1.20 > g0's 1.00: groups 1 and 2 are eligible, so
    # expert 0 (the best score) is dropped and experts 4 (0.85) and 2 (0.80) are chosen; expert 5 itself (0.35
    # biased) is not. The weights are the unbiased scores of the chosen experts.
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0])
    idx, w, _ = route(logits, bias, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    assert idx.tolist() == [[4, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.85, 0.80]]) / 1.65 * 2.0)
    # one expert per token: no normalisation, the weight is scaling x score
    idx, w, _ = route(logits, zero, top_k=1, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    assert idx.tolist() == [[0]]
    torch.testing.assert_close(w, torch.tensor([[0.90 * 2.0]]))


def test_grouped_path_equals_dense_loop_with_gradients():
    model = tiny_model(seed=5).train()
    block = model.moe_layers()[0][1]
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = block(x)
    flat = x.reshape(-1, 32)
    idx, w, _ = block.gate(flat)
    ref = torch.zeros_like(flat)
    for e in range(8):  # naive masked per-expert loop
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if len(rows):
            h = flat[rows]
            out = F.linear(F.silu(F.linear(h, block.experts.gate_proj[e])) * F.linear(h, block.experts.up_proj[e]),
                           block.experts.down_proj[e])
            ref = ref.index_add(0, rows, out * w[rows, slot, None])
    ref = ref.view(3, 5, 32) + block.shared_experts(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(y.square().sum(), [x, block.experts.up_proj])
    g2 = torch.autograd.grad(ref.square().sum(), [x, block.experts.up_proj])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert block.gate.last_load.sum() == 15 * 3


def test_labels_give_per_position_cross_entropy():
    model = tiny_model(seed=2)
    ids = torch.randint(0, 96, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 2:4] = ids[:, 2:4]
    ce = model(ids, labels=labels)
    ref = F.cross_entropy(model(ids).transpose(1, 2).float(), labels, reduction="none")
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-6)


def test_kv_cache_walk_matches_forward():
    from llada_scale.sampling.kv_cache import KVCache, cached_hidden, lm_head, rope_tables

    model = tiny_model(seed=4)
    ids = torch.randint(0, 96, (1, 8))
    pos = torch.arange(8)[None]
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        h = cached_hidden(model, ids, pos, cache, 0, store=True, rope=rope_tables(model, pos))
        torch.testing.assert_close(lm_head(model, h), model(ids).float(), rtol=1e-5, atol=1e-5)
        # block 2 recomputed against the cached keys of block 1 equals the full forward's block 2
        h2 = cached_hidden(model, ids[:, 4:], pos[:, 4:], cache, 4)
        torch.testing.assert_close(lm_head(model, h2), model(ids).float()[:, 4:], rtol=1e-5, atol=1e-5)


def test_block_diffusion_prebuilt_mask_matches_reference():
    """The [x_t ; x_0] layout with the block-diffusion mask, same positions for both halves."""
    from llada_scale.model.block_attention import block_diffusion_mask, block_ids

    model = tiny_model(seed=6)
    clean = torch.randint(0, 95, (1, 6), generator=torch.Generator().manual_seed(7))
    noisy = clean.clone()
    noisy[0, [1, 4, 5]] = 95
    pos = torch.arange(6)[None]
    mask = block_diffusion_mask(block_ids(pos, None, 2), None, backend="sdpa")  # [1, 1, 12, 12]
    ids2, pos2 = torch.cat([noisy, clean], 1), torch.cat([pos, pos], 1)
    with torch.no_grad():
        logits = model(ids2, position_ids=pos2, attention_mask=mask)
    allowed = mask[0, 0].tolist()
    ref = reference_logits(model, ids2[0].tolist(), allowed, pos2[0].tolist())
    torch.testing.assert_close(logits[0].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, word", [
    (dict(num_experts=6), "n_group"),
    (dict(n_group=8), "two best"),
    (dict(topk_group=5), "topk_group"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(partial_rotary_factor=0.1), "rotary_dim"),
    (dict(num_shared_experts=0), "num_shared_experts"),
    (dict(causal=True), "bidirectional"),
])
def test_refuses_shapes_outside_the_release(bad, word):
    with pytest.raises(ValueError, match=word):
        LLaDA2Config(**{**TINY, **bad})


def test_expert_bias_stays_float32_in_bf16():
    model = tiny_model().to(torch.bfloat16)
    block = model.moe_layers()[0][1]
    assert block.gate.expert_bias.dtype == torch.float32 and block.gate.weight.dtype == torch.bfloat16
    assert isinstance(block, MoEBlock)


def test_active_params_count_top_k_and_shared_experts_only():
    model = tiny_model()
    cfg = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("norm.weight")
                 and n != "model.embed_tokens.weight")
    unchosen = (cfg.num_layers - cfg.first_k_dense_replace) * (cfg.num_experts - cfg.num_experts_per_tok) * \
        3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert cfg.active_params_per_token() == matmul - unchosen
    assert cfg.active_params_per_token() < model.num_params(exclude_embeddings=True)
