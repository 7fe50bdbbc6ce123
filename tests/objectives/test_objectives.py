"""Numerics of llada_scale.objectives.losses against direct per-token python loops, on fixed logits (cheap)."""

import math

import pytest
import torch
import torch.nn.functional as F

from llada_scale.objectives.config import NUM_T_BUCKETS, ObjectiveConfig
from llada_scale.objectives.losses import compute_loss, diffusion_loss
from llada_scale.objectives.noise import forward_process, loss_weight, mask_probability

V = 11
MASK = 10


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits do not depend on the input; records every input it is called with.

    For the block-diffusion 2L layout it returns the table twice (only the noisy half is used)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.inputs = []
        self.documents = []

    def forward(self, input_ids, position_ids=None, document_ids=None, attention_mask=None, labels=None):
        self.inputs.append(input_ids.clone())
        self.documents.append(None if document_ids is None else document_ids.clone())
        lg = self.logits
        while lg.shape[1] < input_ids.shape[1]:
            lg = torch.cat([lg, self.logits], 1)
        lg = lg[: input_ids.shape[0], : input_ids.shape[1]]
        if labels is None:
            return lg
        return F.cross_entropy(lg.transpose(1, 2).float(), labels, reduction="none")  # the Transformer contract


def make_batch(b, l, prompt_len=0, seed=0, docs=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (b, l), generator=g)
    prompt = torch.zeros(b, l, dtype=torch.bool)
    prompt[:, :prompt_len] = True
    doc = torch.zeros(b, l, dtype=torch.long) if docs is None else docs
    pos = torch.zeros(b, l, dtype=torch.long)
    for r in range(b):
        for i in range(l):
            pos[r, i] = 0 if i == 0 or doc[r, i] != doc[r, i - 1] else pos[r, i - 1] + 1
    return {"input_ids": ids, "position_ids": pos, "document_ids": doc, "prompt_mask": prompt,
            "padding_mask": torch.zeros(b, l, dtype=torch.bool)}


def ce_loop(logits_row, target):
    vals = [float(v) for v in logits_row]
    m = max(vals)
    return m + math.log(sum(math.exp(v - m) for v in vals)) - vals[target]


@pytest.mark.parametrize("weighting", ["inverse_t", "none"])
@pytest.mark.parametrize("prompt_len", [0, 4])
def test_masking_and_loss_equal_python_loop(weighting, prompt_len):
    b, l, eps, seed = 3, 12, 1e-3, 7
    batch = make_batch(b, l, prompt_len)
    logits = torch.randn(b, l, V, generator=torch.Generator().manual_seed(1))
    model = FixedLogits(logits)
    cfg = ObjectiveConfig(name="sft" if prompt_len else "diffusion", random_length_prob=0.0, eps=eps,
                          loss_weighting=weighting)
    loss, _ = compute_loss(model, batch, cfg, causal=False, mask_token_id=MASK,
                           generator=torch.Generator().manual_seed(seed))
    # replay the documented draws: rand(B) for t, then rand(B, L) for the masks
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(b, generator=g).tolist()
    r = torch.rand(b, l, generator=g).tolist()
    ids = batch["input_ids"].tolist()
    seen = model.inputs[0].tolist()
    total_w, total_ce, n_masked = 0.0, 0.0, 0
    for row in range(b):
        t = (1 - eps) * u[row] + eps
        answer_len = l - prompt_len
        for i in range(l):
            masked = i >= prompt_len and r[row][i] < t
            assert seen[row][i] == (MASK if masked else ids[row][i])
            if masked:
                ce = ce_loop(logits[row, i], ids[row][i])
                total_w += ce / t / answer_len
                total_ce += ce
                n_masked += 1
    expected = total_w / b if weighting == "inverse_t" else total_ce / max(n_masked, 1)
    assert n_masked > 0
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_sft_prompt_never_masked_and_carries_no_loss():
    b, l, p = 4, 16, 6
    batch = make_batch(b, l, prompt_len=p, seed=3)
    logits = torch.randn(b, l, V, generator=torch.Generator().manual_seed(2))
    cfg = ObjectiveConfig(name="sft")
    losses = []
    for scale in (1.0, 100.0):
        lg = logits.clone()
        lg[:, :p] *= scale  # only the prompt positions change
        lg[:, :p] += scale
        model = FixedLogits(lg)
        for seed in range(5):
            loss, _ = compute_loss(model, batch, cfg, causal=False, mask_token_id=MASK,
                                   generator=torch.Generator().manual_seed(seed))
            losses.append(float(loss))
        for x in model.inputs:
            assert torch.equal(x[:, :p], batch["input_ids"][:, :p])
    assert losses[:5] == pytest.approx(losses[5:], rel=0, abs=0)


def _expected_over_t_grid(logits, ids, cfg, grid=20000):
    """(1/B) sum_b (1/L) sum_i E_mask[1{masked} w(t)] CE_bi averaged over a fine midpoint grid in u."""
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), ids.flatten(), reduction="none").mean()
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    t = (1 - cfg.eps) * u + cfg.eps
    pw = mask_probability(t, cfg.noise_schedule) * loss_weight(t, cfg.loss_weighting)
    return float(ce * pw.mean())


@pytest.mark.parametrize("schedule,weighting,block", [("linear", "inverse_t", 0), ("cosine", "cosine", 0),
                                                      ("linear", "inverse_t", 4), ("cosine", "cosine", 4)])
def test_diffusion_loss_is_unbiased(schedule, weighting, block):
    """Mean over many random t (one big batch of identical rows) == t-grid average of the expected loss."""
    b, l = 20000, 16
    row = make_batch(1, l, seed=5)
    batch = {k: v.expand(b, l).contiguous() for k, v in row.items()}
    logits = torch.randn(1, l, V, generator=torch.Generator().manual_seed(4)).expand(b, l, V)
    cfg = ObjectiveConfig(random_length_prob=0.0, noise_schedule=schedule, loss_weighting=weighting,
                          block_length=block)
    loss, stats = compute_loss(FixedLogits(logits), batch, cfg, causal=False, mask_token_id=MASK,
                               generator=torch.Generator().manual_seed(0))
    expected = _expected_over_t_grid(logits[:1], row["input_ids"], cfg)
    assert float(loss) == pytest.approx(expected, rel=0.02)  # MC std ~0.5%
    if block:
        assert float(stats["block_length"]) == block


def test_ar_loss_ignores_cross_document_targets():
    l = 8
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    batch = make_batch(1, l, docs=docs)
    logits = torch.randn(1, l, V, generator=torch.Generator().manual_seed(0))
    cfg = ObjectiveConfig(name="ar")
    loss, _ = compute_loss(FixedLogits(logits), batch, cfg, causal=True, mask_token_id=None)
    ids = batch["input_ids"][0].tolist()
    ces = [ce_loop(logits[0, i], ids[i + 1]) for i in range(l - 1) if docs[0, i] == docs[0, i + 1]]
    assert float(loss) == pytest.approx(sum(ces) / len(ces), rel=1e-5)
    lg = logits.clone()
    lg[0, 2] += 50 * torch.randn(V)  # position 2 would predict doc 1's first token
    lg[0, 6] += 50 * torch.randn(V)  # position 6 would predict doc 2's first token
    loss2, _ = compute_loss(FixedLogits(lg), batch, cfg, causal=True, mask_token_id=None)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize("block", [0, 3])
def test_t_bucket_stats_sum_to_masked_count(block):
    b, l = 6, 20
    batch = make_batch(b, l, seed=9)
    logits = torch.randn(b, l, V, generator=torch.Generator().manual_seed(3))
    model = FixedLogits(logits)
    cfg = ObjectiveConfig(random_length_prob=0.0, block_length=block)
    _, stats = compute_loss(model, batch, cfg, causal=False, mask_token_id=MASK,
                            generator=torch.Generator().manual_seed(1))
    noisy = model.inputs[0][:, :l]
    masked = noisy == MASK
    assert stats["t_bucket_count"].shape == (NUM_T_BUCKETS,)
    assert float(stats["t_bucket_count"].sum()) == int(masked.sum()) > 0
    ce = torch.nn.functional.cross_entropy(logits[masked], batch["input_ids"][masked], reduction="sum")
    assert float(stats["t_bucket_ce_sum"].sum()) == pytest.approx(float(ce), rel=1e-5)
    for v in stats.values():
        assert v.dtype == torch.float32


def test_random_length_cut_probability():
    l, n, prob = 64, 800, 0.3
    batch = make_batch(1, l)
    model = FixedLogits(torch.zeros(1, l, V))
    cfg = ObjectiveConfig(random_length_prob=prob)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        compute_loss(model, batch, cfg, causal=False, mask_token_id=MASK, generator=g)
    cut = sum(bool((d == -1).any()) for d in model.documents) / n  # the cut-off tail is document -1
    assert cut == pytest.approx(prob * (l - 1) / l, abs=0.05)  # U{1..L} keeps L w.p. 1/L; MC std 0.016
    assert all(x.shape == (1, l) for x in model.inputs)  # static shapes: the row keeps its length
    assert all(not bool((d[:, 0] == -1).any()) for d in model.documents)  # l' >= 1


def test_forward_process_schedules():
    ids = torch.zeros(4, 20000, dtype=torch.long)
    eligible = torch.ones_like(ids, dtype=torch.bool)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    for schedule, p_expected in (("linear", t), ("cosine", 1 - torch.cos(math.pi * t / 2))):
        noisy, masked, p, t_out = forward_process(ids, eligible, MASK, schedule=schedule, t=t, return_t=True,
                                                  generator=torch.Generator().manual_seed(0))
        assert torch.equal(t_out, t)
        assert torch.allclose(p, p_expected, atol=1e-6)
        assert torch.allclose(masked.float().mean(1), p_expected, atol=0.015)
        assert torch.equal(noisy == MASK, masked)
    # default draw stays LLaDA's p = (1 - eps) u + eps with u = rand(B)
    _, _, p = forward_process(ids[:, :5], eligible[:, :5], MASK, eps=0.01, generator=torch.Generator().manual_seed(3))
    u = torch.rand(4, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(p, 0.99 * u + 0.01)


def test_diffusion_loss_per_token_times():
    """t given per token ([B, L]) weights each token by its own t."""
    logits = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(1))
    masked = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    t = torch.tensor([[0.2, 0.2, 0.5, 0.5, 0.5], [0.9, 0.9, 0.3, 0.3, 0.3]])
    token_ce = F.cross_entropy(logits.transpose(1, 2), torch.where(masked, ids, -100), reduction="none")
    loss = diffusion_loss(token_ce, masked, t, torch.tensor([5, 5]))
    exp = sum(ce_loop(logits[b, i], int(ids[b, i])) / float(t[b, i]) / 5
              for b in range(2) for i in range(5) if masked[b, i]) / 2
    assert float(loss) == pytest.approx(exp, rel=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="noise_schedule"):
        ObjectiveConfig(loss_weighting="cosine")  # cosine weight with the linear schedule
    with pytest.raises(ValueError, match="noise_schedule"):
        ObjectiveConfig(noise_schedule="cosine")  # default inverse_t with the cosine schedule
    ObjectiveConfig(noise_schedule="cosine", loss_weighting="none")
    with pytest.raises(ValueError, match="cfg_prob"):
        ObjectiveConfig(name="diffusion", cfg_prob=0.1)
    with pytest.raises(ValueError, match="both"):
        ObjectiveConfig(block_length=4, block_schedule=[[4, 10]])
    with pytest.raises(ValueError, match="block_schedule"):
        ObjectiveConfig(block_schedule=[[0, 10]])
    with pytest.raises(ValueError, match="bidirectional"):
        compute_loss(FixedLogits(torch.zeros(1, 4, V)), make_batch(1, 4), ObjectiveConfig(name="sft", block_length=2),
                     causal=True, mask_token_id=MASK)
