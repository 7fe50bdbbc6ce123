"""KV caches: the cached forward equals the model's forward; AR with a cache equals AR without; Fast-dLLM's prefix
and dual caches are exact at each block's first step, batch invariant in fp32 with left padding, and cheaper;
the repetition penalty changes exactly the choice it should in every sampler; lengths beyond max_seq_len are
refused unless extrapolation is allowed."""

import pytest
import torch

from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.sampling import ar_generate, diffusion_generate, generate_blocks_batch, left_pad
from llada_scale.sampling.common import mask_kwargs
from llada_scale.sampling.kv_cache import KVCache, cached_hidden, key_mask, lm_head
from llada_scale.sampling.likelihood import log_likelihood_batch
from llada_scale.testing import assert_close_to_scale

V, MASK = 64, 63


def random_model(causal=False, seed=0, std=0.3, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      max_seq_len=96, causal=causal, mask_token_id=None if causal else MASK, init_std=std,
                      attention_backend="sdpa", **kw)
    return Transformer(cfg).eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, MASK - 1, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("causal,extra", [(False, {"qk_norm": True}), (True, {"qk_norm": True}),
                                          (False, {"attention_bias": True, "head_dim": 24})])
def test_cached_hidden_equals_forward_and_recomputing_a_slice(causal, extra):
    """Also with q/k/v biases and a head_dim independent of hidden_size / num_heads (Qwen-style imports)."""
    model = random_model(causal, **extra)
    if extra.get("attention_bias"):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(std=0.5)
                layer.self_attn.k_proj.bias.normal_(std=0.5)
    x, pos, doc = left_pad(prompts_of([7, 12, 3]), 0, extra=5, fill_id=MASK)
    real = doc == 1
    ref = model(x, position_ids=pos, **mask_kwargs(model, doc))
    cache = KVCache.for_model(model, 3, x.shape[1])
    full = lm_head(model, cached_hidden(model, x, pos, cache, 0, mask=mask_kwargs(model, doc)["attention_mask"],
                                        store=True))
    assert_close_to_scale(full[real], ref[real])
    if causal:  # one new position at a time against the cache (AR decoding)
        h = cached_hidden(model, x[:, 14:15], pos[:, 14:15], cache, 14, mask=key_mask(doc, 15), kv_len=15)
    else:  # a middle slice against the cached rest (the dual cache with unchanged tokens)
        h = cached_hidden(model, x[:, 12:15], pos[:, 12:15], cache, 12, mask=key_mask(doc))
    part = lm_head(model, h)
    assert_close_to_scale(part, ref[:, 12:15] if not causal else ref[:, 14:15])


def test_ar_kv_cache_equals_recompute():
    model = random_model(causal=True)
    prompts = prompts_of([3, 9, 6])
    for temp in (0.0, 1.0):
        a = ar_generate(model, prompts, max_new_tokens=12, temperature=temp, use_cache=True,
                        generator=torch.Generator().manual_seed(5))
        b = ar_generate(model, prompts, max_new_tokens=12, temperature=temp, use_cache=False,
                        generator=torch.Generator().manual_seed(5))
        assert a.tokens == b.tokens and a.nfe == b.nfe == 12
    with pytest.raises(ValueError, match="causal"):
        ar_generate(random_model(causal=False), prompts, max_new_tokens=2, use_cache=True)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_exact_when_each_block_takes_one_step(cache):
    """One step per block: every step is a block's first (a full forward), so the cache changes nothing."""
    model = random_model()
    prompts = prompts_of([5, 9])
    kw = dict(mask_token_id=MASK, gen_length=16, block_length=4, steps=4)
    ref = diffusion_generate(model, prompts, **kw)
    got = diffusion_generate(model, prompts, cache=cache, **kw)
    assert got.tokens == ref.tokens
    assert got.extra == {"full_forwards": 4, "cached_forwards": 0}


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_batch_invariant_fp32_left_padding_and_cheaper(cache):
    model = random_model(std=0.5)
    prompts = prompts_of([4, 11, 7])
    kw = dict(mask_token_id=MASK, gen_length=24, block_length=8, threshold=0.3, cache=cache)
    batched = diffusion_generate(model, prompts, **kw)
    alone = [diffusion_generate(model, [p], **kw).tokens[0] for p in prompts]
    assert batched.tokens == alone
    assert batched.extra["full_forwards"] == 3 and batched.extra["cached_forwards"] == batched.nfe - 3
    # with CFG the cache holds the unconditional rows too
    kw_cfg = dict(kw, cfg_scale=1.0, threshold=None, steps=24)
    assert diffusion_generate(model, prompts, **kw_cfg).tokens == [
        diffusion_generate(model, [p], **kw_cfg).tokens[0] for p in prompts]


def test_cache_first_step_exact_later_steps_approximate():
    """Several steps per block: each block's first step (a full forward) commits what the exact sampler commits;
    later steps read stale prefix/suffix keys, so on this chaotic random model the final tokens differ (the
    cache is really used)."""
    model = random_model(std=0.3)
    prompts = prompts_of([6, 10])
    kw = dict(mask_token_id=MASK, gen_length=24, block_length=8, steps=24)

    def run(cache):
        first = []
        res = diffusion_generate(model, prompts, cache=cache, callback=lambda s, t, c: first.append(t) if s == 0
                                 else None, **kw)
        return first[0], res.tokens

    ref_first, ref = run(None)
    for cache in ("prefix", "dual"):
        got_first, got = run(cache)
        assert torch.equal(got_first, ref_first) and got != ref, cache
    with pytest.raises(ValueError, match="cache"):
        diffusion_generate(model, prompts, cache="triple", **kw)


def head_model(causal: bool) -> Transformer:
    """Hand-made: attention and MLP outputs are zero and every embedding row is e0, so every position's logits
    are [2, 1.5, 0, ...] * sqrt(d) at tokens (5, 6): the model always prefers 5, then 6."""
    cfg = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=16,
                      max_seq_len=32, causal=causal, mask_token_id=None if causal else 15)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.model.embed_tokens.weight[:, 0] = 1.0
        m.model.norm.weight.fill_(1.0)
        for layer in m.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        m.lm_head.weight[5, 0], m.lm_head.weight[6, 0] = 2.0, 1.5
    return m


@pytest.mark.parametrize("sampler", ["llada", "llada_dual", "block", "block_uncached", "ar", "ar_uncached"])
def test_repetition_penalty_changes_the_choice_it_should(sampler):
    """Prompt [1, 5]: token 5 was seen. Penalty 2 halves its (positive) logit 2 -> 1 < 1.5, so 6 wins; penalty
    1 (off) keeps 5; a prompt without 5 keeps 5 whatever the penalty."""
    model = head_model(causal=sampler.startswith("ar"))

    def first(prompt, penalty):
        kw = dict(repetition_penalty=penalty)
        if sampler.startswith("ar"):
            return ar_generate(model, [prompt], max_new_tokens=1, use_cache=sampler == "ar", **kw).tokens[0][0]
        if sampler.startswith("block"):
            return generate_blocks_batch(model, [prompt], mask_token_id=15, gen_length=2, block_length=2,
                                         steps_per_block=2, use_cache=sampler == "block", **kw).tokens[0][0]
        cache = "dual" if sampler == "llada_dual" else None
        return diffusion_generate(model, [prompt], mask_token_id=15, gen_length=1, block_length=1, steps=1,
                                  cache=cache, **kw).tokens[0][0]

    assert first([1, 5], 1.0) == 5
    assert first([1, 5], 2.0) == 6
    assert first([1, 2], 2.0) == 5
    with pytest.raises(ValueError, match="repetition_penalty"):
        first([1, 5], 0.0)


def test_lengths_beyond_max_seq_len_are_refused_unless_allowed():
    dm, ar = random_model(), random_model(causal=True)
    long = prompts_of([90])
    with pytest.raises(ValueError, match="max_seq_len 96"):
        diffusion_generate(dm, long, mask_token_id=MASK, gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match="allow_extrapolation"):
        generate_blocks_batch(dm, long, mask_token_id=MASK, gen_length=8, block_length=8, steps_per_block=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        ar_generate(ar, long, max_new_tokens=7)
    with pytest.raises(ValueError, match="max_seq_len"):
        log_likelihood_batch(dm, [(long[0], [1] * 7)], causal=False, mask_token_id=MASK, mc_samples=2)
    res = diffusion_generate(dm, long, mask_token_id=MASK, gen_length=8, block_length=8, steps=8,
                             allow_extrapolation=True)
    assert len(res.tokens[0]) == 8
    assert len(ar_generate(ar, long, max_new_tokens=7, allow_extrapolation=True).tokens[0]) == 7
