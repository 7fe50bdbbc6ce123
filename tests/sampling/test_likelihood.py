"""Likelihoods: LLaDA's Monte Carlo estimate converges to the exact value; AR chain rule is exact."""

import math

import pytest
import torch
from torch import nn

from llada_scale.sampling.likelihood import _stratified_counts, log_likelihood, log_likelihood_batch
from llada_scale.model.transformer import ModelConfig, Transformer


V = 12
MASK = 11


class ContextFree(nn.Module):
    """Predictions depend only on the position id, never on the tokens: then the masked-diffusion ELBO is
    tight and log p(answer | prompt) = sum_i log softmax(table[pos_i])[a_i] exactly."""

    def __init__(self, n_pos=32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(n_pos, V, generator=g) * 2.0)

    def forward(self, input_ids, position_ids=None, document_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.table[position_ids]


def exact_context_free(model, prompt, answer):
    lp = torch.log_softmax(model.table.double(), -1)
    return sum(float(lp[len(prompt) + i, a]) for i, a in enumerate(answer))


def test_stratified_counts_cover_range():
    counts = _stratified_counts(100, 7, torch.Generator().manual_seed(0))
    assert min(counts) == 1 and max(counts) == 7
    hist = [counts.count(l) for l in range(1, 8)]
    assert max(hist) - min(hist) <= 1


def test_mc_estimate_converges_to_exact():
    model = ContextFree()
    prompt, answer = [1, 2, 3], [4, 7, 0, 9, 2, 5]
    exact = exact_context_free(model, prompt, answer)
    est = log_likelihood(model, prompt, answer, mask_token_id=MASK, causal=False, mc_samples=4096, batch_size=512,
                         generator=torch.Generator().manual_seed(0))
    assert est == pytest.approx(exact, abs=0.02 * abs(exact))
    # every single sample is unbiased for this model, so even few samples are close on average
    ests = [log_likelihood(model, prompt, answer, mask_token_id=MASK, causal=False, mc_samples=8,
                           generator=torch.Generator().manual_seed(s)) for s in range(50)]
    assert sum(ests) / len(ests) == pytest.approx(exact, abs=0.05 * abs(exact))


def test_mc_full_answer_mask_counts_weighting():
    # a single-token answer: l is always 1, weight 1, estimate exact for any model and any sample count
    model = ContextFree()
    est = log_likelihood(model, [1], [3], mask_token_id=MASK, causal=False, mc_samples=3)
    assert est == pytest.approx(exact_context_free(model, [1], [3]), abs=1e-9)


def test_mc_batched_pairs_match_singles_on_deterministic_model():
    model = ContextFree()
    pairs = [([1, 2], [3, 4, 5]), ([6], [7, 8]), ([], [9])]
    batched = log_likelihood_batch(model, pairs, causal=False, mask_token_id=MASK, mc_samples=2048, batch_size=300,
                                   generator=torch.Generator().manual_seed(0))
    for (p, a), b in zip(pairs, batched):
        assert b == pytest.approx(exact_context_free(model, p, a), abs=0.03 * abs(b) + 1e-6)


def _ar_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      max_seq_len=64, causal=True, init_std=0.3)
    return Transformer(cfg).eval()


def direct_ar(model, prompt, answer):
    total = 0.0
    with torch.no_grad():
        for i, a in enumerate(answer):
            ids = torch.tensor([prompt + answer[:i]])
            total += float(torch.log_softmax(model(ids)[0, -1].double(), -1)[a])
    return total


def test_ar_chain_rule_equals_direct_computation():
    model = _ar_model()
    pairs = [([1, 2, 3], [4, 5, 6, 7]), ([8], [9, 10]), ([2, 2, 2, 2, 2, 2], [0])]
    for p, a in pairs:
        assert log_likelihood(model, p, a, causal=True) == pytest.approx(direct_ar(model, p, a), rel=1e-5)
    batched = log_likelihood_batch(model, pairs, causal=True, batch_size=2)
    for (p, a), b in zip(pairs, batched):
        assert b == pytest.approx(direct_ar(model, p, a), rel=1e-5)


def test_ar_probabilities_sum_to_one():
    model = _ar_model()
    total = sum(math.exp(log_likelihood(model, [1, 2], [a, b], causal=True)) for a in range(V) for b in range(V))
    assert total == pytest.approx(1.0, abs=1e-5)


def test_likelihood_errors():
    model = ContextFree()
    with pytest.raises(ValueError, match="mask_token_id"):
        log_likelihood(model, [1], [2], causal=False)
    with pytest.raises(ValueError, match="empty prompt"):
        log_likelihood(model, [], [2], causal=True)
    with pytest.raises(ValueError, match="empty answer"):
        log_likelihood(model, [1], [], causal=True)
    with pytest.raises(ValueError, match="mc_samples"):
        log_likelihood(model, [1], [2], causal=False, mask_token_id=MASK, mc_samples=0)


def _chaotic(causal=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      max_seq_len=64, causal=causal, mask_token_id=None if causal else MASK, init_std=0.4,
                      attention_backend="sdpa")
    return Transformer(cfg).to(torch.float64).eval()


def test_block_nelbo_matches_exact_enumeration_through_the_kv_cache():
    """Prompt 3 tokens, answer 5, blocks of 4 from position 0: block 0 holds 1 answer token, block 1 four. The
    exact block NELBO enumerates every mask count and subset per block, each block scored with the KV cache of
    the clean earlier blocks (another code path than the [x_t ; x_0] mask); the MC estimate must converge to
    it, and LLaDA's full-attention estimate must not."""
    from itertools import combinations

    from llada_scale.sampling.block import KVCache, cached_block_logits

    model = _chaotic()
    prompt, answer, bl = [1, 2, 3], [4, 5, 6, 7, 8], 4
    x = torch.tensor([prompt + answer])
    pos = torch.arange(8)[None]
    exact = 0.0
    for b, answer_pos in ((0, [3]), (1, [4, 5, 6, 7])):
        n = len(answer_pos)
        for k in range(1, n + 1):
            subsets = list(combinations(answer_pos, k))
            for sub in subsets:
                cache = KVCache(2, 1, 2, 8, 8, torch.float64, "cpu")
                for c in range(b):
                    cached_block_logits(model, x[:, 4 * c:4 * c + 4], pos[:, 4 * c:4 * c + 4], cache, append=True)
                noisy = x[:, 4 * b:4 * b + 4].clone()
                noisy[0, [i - 4 * b for i in sub]] = MASK
                lp = torch.log_softmax(cached_block_logits(model, noisy, pos[:, 4 * b:4 * b + 4], cache)[0], -1)
                exact += (1 / n) * (n / k) / len(subsets) * sum(float(lp[i - 4 * b, x[0, i]]) for i in sub)
    est = log_likelihood(model, prompt, answer, causal=False, mask_token_id=MASK, mc_samples=2048, batch_size=512,
                         generator=torch.Generator().manual_seed(0), block_length=bl)
    full = log_likelihood(model, prompt, answer, causal=False, mask_token_id=MASK, mc_samples=2048, batch_size=512,
                          generator=torch.Generator().manual_seed(0))
    assert abs(est - exact) < 0.01 * abs(exact), (est, exact)
    assert abs(full - exact) > 0.05 * abs(exact), (full, exact)


def test_likelihood_cfg_formula():
    """One answer token and one MC sample: the only noise masks it, so the estimate is the guided log-prob."""
    model = _chaotic()
    prompt, answer, w = [1, 2, 3], [7], 1.5
    with torch.no_grad():
        cond = model(torch.tensor([prompt + [MASK]]))[0, -1]
        uncond = model(torch.tensor([[MASK] * 4]))[0, -1]
    expected = float(torch.log_softmax(uncond + (w + 1) * (cond - uncond), -1)[7])
    got = log_likelihood(model, prompt, answer, causal=False, mask_token_id=MASK, mc_samples=1, cfg_scale=w)
    assert got == pytest.approx(expected, rel=1e-6)  # logits pass through float32
    with pytest.raises(ValueError, match="cfg_scale"):
        log_likelihood(_chaotic(causal=True), prompt, answer, causal=True, cfg_scale=1.0)


def test_ar_greedy_flags():
    model = _chaotic(causal=True)
    prompt = [1, 2, 3]
    ids = list(prompt)
    for _ in range(4):  # the greedy continuation
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    greedy_answer = ids[3:]
    other = [(t + 1) % (V - 1) for t in greedy_answer]
    out = log_likelihood_batch(model, [(prompt, greedy_answer), (prompt, other)], causal=True, return_greedy=True)
    assert [g for _, g in out] == [True, False]
    assert out[0][0] == pytest.approx(log_likelihood(model, prompt, greedy_answer, causal=True))
