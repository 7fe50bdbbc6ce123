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
        assert log_likelihood(model, p, a, causal=True) == pytest.approx(direct_ar(model, p, a), abs=1e-4)
    batched = log_likelihood_batch(model, pairs, causal=True, batch_size=2)
    for (p, a), b in zip(pairs, batched):
        assert b == pytest.approx(direct_ar(model, p, a), abs=1e-4)


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
