"""Diffusion and AR sampling on hand-made models with known logits, plus batch independence."""

import math

import pytest
import torch
from torch import nn

from llada_scale.sampling import (add_gumbel_noise, ar_generate, diffusion_generate, get_num_transfer_tokens,
                                  left_pad, truncate_at)
from llada_scale.model.transformer import ModelConfig, Transformer


V = 16
MASK = 15


class PositionTable(nn.Module):
    """Logits depend only on the position id: logits[b, l] = table[position_ids[b, l]].

    With ``uncond`` given, rows whose position-0 token is the mask token (the CFG unconditional pass)
    use ``uncond`` instead.
    """

    def __init__(self, table, uncond=None):
        super().__init__()
        self.register_buffer("table", table)
        self.register_buffer("uncond", uncond if uncond is not None else table)
        self.calls = 0

    def forward(self, input_ids, position_ids=None, document_ids=None):
        self.calls += 1
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        first = torch.gather(input_ids, 1, (position_ids == 0).float().argmax(1, keepdim=True))
        use_uncond = (first == MASK)[:, :, None]
        return torch.where(use_uncond, self.uncond[position_ids], self.table[position_ids])


def peaked_table(n_pos, tokens, confidences):
    """Table whose position p (p >= offset) predicts tokens[i] with softmax prob exactly confidences[i]."""
    t = torch.zeros(n_pos, V)
    offset = n_pos - len(tokens)
    for i, (tok, c) in enumerate(zip(tokens, confidences)):
        # prob of tok = c, rest uniform over the other V-2 non-mask tokens (mask gets -inf in the sampler).
        rest = (1 - c) / (V - 2)
        row = torch.full((V,), math.log(rest))
        row[tok] = math.log(c)
        row[MASK] = 0.0  # suppressed anyway
        t[offset + i] = row
    return t


def test_num_transfer_tokens_matches_llada():
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[0, :10] = True
    m[1, :7] = True
    out = get_num_transfer_tokens(m, 4)
    assert out.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]
    assert out.sum(1).tolist() == [10, 7]


def test_low_confidence_unmasking_order():
    prompt = [1, 2]
    toks = [3, 4, 5, 6, 7, 8, 9, 10]
    conf = [0.30, 0.90, 0.50, 0.70, 0.95, 0.20, 0.60, 0.40]
    model = PositionTable(peaked_table(len(prompt) + len(toks), toks, conf))
    order = []
    res = diffusion_generate(model, [prompt], mask_token_id=MASK, gen_length=8, block_length=4, steps=8,
                             callback=lambda s, t, c: order.extend(c[0].nonzero()[:, 0].tolist()))
    assert res.tokens == [toks]
    # Block 1 (positions 0-3) by descending confidence, then block 2 (4-7): one token per step.
    assert order == [1, 3, 2, 0, 4, 6, 7, 5]
    assert res.nfe == 8 and res.steps == 8


def test_two_tokens_per_step_and_pads():
    toks = [3, 4, 5, 6]
    conf = [0.3, 0.9, 0.5, 0.7]
    model = PositionTable(peaked_table(1 + 4, toks, conf))
    steps = []
    diffusion_generate(model, [[2]], mask_token_id=MASK, gen_length=4, block_length=4, steps=2,
                       callback=lambda s, t, c: steps.append(sorted(c[0].nonzero()[:, 0].tolist())))
    assert steps == [[1, 3], [0, 2]]


def test_threshold_commits_exactly_tokens_above_threshold():
    toks = [3, 4, 5, 6, 7, 8]
    conf = [0.95, 0.40, 0.85, 0.91, 0.30, 0.60]
    model = PositionTable(peaked_table(1 + 6, toks, conf))
    steps = []
    res = diffusion_generate(model, [[1]], mask_token_id=MASK, gen_length=6, block_length=6, threshold=0.8,
                             callback=lambda s, t, c: steps.append(sorted(c[0].nonzero()[:, 0].tolist())))
    # Step 1: every token above 0.8; the model is context independent so later steps find none above the
    # threshold and commit the single most confident remaining token each.
    assert steps == [[0, 2, 3], [5], [1], [4]]
    assert res.tokens == [toks] and res.nfe == 4


def test_threshold_at_least_one_per_step():
    toks = [3, 4, 5]
    model = PositionTable(peaked_table(4, toks, [0.2, 0.3, 0.25]))
    res = diffusion_generate(model, [[1]], mask_token_id=MASK, gen_length=3, block_length=3, threshold=0.9)
    assert res.nfe == 3 and res.tokens == [toks]


def test_cfg_formula_and_scale_zero():
    toks_c = [3, 4, 5, 6]
    cond = peaked_table(5, toks_c, [0.5, 0.6, 0.7, 0.8])
    uncond = cond.clone()
    # Unconditional pass prefers token 9 at position 1+0 and 10 at 1+2; guidance must push away from them.
    uncond[1, 9] = cond[1, 3] + 0.1
    uncond[3, 10] = cond[3, 5] + 2.0
    model = PositionTable(cond, uncond)
    w = 1.5
    guided = uncond + (w + 1) * (cond - uncond)
    guided[:, MASK] = -math.inf
    expected = guided[1:].argmax(-1).tolist()
    res = diffusion_generate(model, [[2]], mask_token_id=MASK, gen_length=4, block_length=4, steps=4, cfg_scale=w)
    assert res.tokens == [expected] and res.nfe == 8
    plain = diffusion_generate(model, [[2]], mask_token_id=MASK, gen_length=4, block_length=4, steps=4)
    zero = diffusion_generate(model, [[2]], mask_token_id=MASK, gen_length=4, block_length=4, steps=4, cfg_scale=0.0)
    assert zero.tokens == plain.tokens == [toks_c] and zero.nfe == plain.nfe == 4


def test_mask_token_never_generated():
    t = torch.zeros(5, V)
    t[:, MASK] = 10.0  # the model "prefers" the mask token
    t[:, 7] = 5.0
    res = diffusion_generate(PositionTable(t), [[1]], mask_token_id=MASK, gen_length=4, block_length=4, steps=4)
    assert res.tokens == [[7, 7, 7, 7]]


def _random_model(causal, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=128, causal=causal, mask_token_id=None if causal else 63,
                      init_std=0.3)
    return Transformer(cfg).eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_batch_independence(threshold):
    model = _random_model(causal=False)
    kw = dict(mask_token_id=63, gen_length=16, block_length=8, steps=8, threshold=threshold)
    batch = diffusion_generate(model, PROMPTS, **kw).tokens
    assert len({tuple(t) for t in batch}) > 1  # the model is not degenerate
    for i, p in enumerate(PROMPTS):
        assert diffusion_generate(model, [p], **kw).tokens[0] == batch[i]
    # another batch composition / size
    other = diffusion_generate(model, [PROMPTS[3], [40, 41] * 6, PROMPTS[1]], **kw).tokens
    assert other[0] == batch[3] and other[2] == batch[1]


def test_sampling_reproducible_and_valid():
    model = _random_model(causal=False)
    kw = dict(mask_token_id=63, gen_length=8, block_length=4, steps=4, temperature=1.0, remasking="random")
    a = diffusion_generate(model, PROMPTS, generator=torch.Generator().manual_seed(1), **kw).tokens
    b = diffusion_generate(model, PROMPTS, generator=torch.Generator().manual_seed(1), **kw).tokens
    assert a == b and all(63 not in t and len(t) == 8 for t in a)


def test_gumbel_sampling_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(add_gumbel_noise(logits, 1.0, g).argmax(-1), minlength=3).double() / 20000
    assert torch.allclose(counts, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0).double(), atol=0.015)
    assert add_gumbel_noise(logits, 0.0) is logits


class NextPlusOne(nn.Module):
    """Causal toy: the next token is always current + 1 (mod V)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, position_ids=None, document_ids=None):
        return torch.nn.functional.one_hot((input_ids + 1) % V, V).float() * 5.0


def test_ar_greedy_known_model():
    res = ar_generate(NextPlusOne(), [[3], [1, 2, 9, 10]], max_new_tokens=4, eos_token_id=13)
    assert res.tokens == [[4, 5, 6, 7], [11, 12, 13]]
    assert res.nfe == 4
    res = ar_generate(NextPlusOne(), [[3], [10]], max_new_tokens=10, eos_token_id=6)
    assert res.tokens == [[4, 5, 6], [11, 12, 13, 14, 15, 0, 1, 2, 3, 4]]


def test_ar_batch_independence_random_model():
    model = _random_model(causal=True)
    batch = ar_generate(model, PROMPTS, max_new_tokens=6).tokens
    for i, p in enumerate(PROMPTS):
        assert ar_generate(model, [p], max_new_tokens=6).tokens[0] == batch[i]


def test_bad_inputs():
    model = _random_model(causal=False)
    with pytest.raises(ValueError, match="multiple of block_length"):
        diffusion_generate(model, [[1]], mask_token_id=63, gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        diffusion_generate(model, [[1]], mask_token_id=63, gen_length=8, block_length=4, steps=3)
    with pytest.raises(ValueError, match="remasking"):
        diffusion_generate(model, [[1]], mask_token_id=63, gen_length=4, block_length=4, steps=4, remasking="x")
    with pytest.raises(ValueError, match="threshold"):
        diffusion_generate(model, [[1]], mask_token_id=63, gen_length=4, block_length=4, threshold=1.5)
    with pytest.raises(ValueError, match="pad_token_id"):
        diffusion_generate(model, [[1]], mask_token_id=63, gen_length=4, block_length=4, steps=4, pad_token_id=63)
    with pytest.raises(ValueError, match="empty"):
        ar_generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="list of ints"):
        ar_generate(model, [["a"]], max_new_tokens=2)


def test_left_pad_and_truncate():
    x, pos, doc = left_pad([[1, 2], [3]], pad_id=0, extra=2, fill_id=9)
    assert x.tolist() == [[1, 2, 9, 9], [0, 3, 9, 9]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert doc.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert truncate_at([4, 5, 2, 7], 2) == [4, 5] and truncate_at([4, 5, 2], [2], include=True) == [4, 5, 2]



def test_length_batches_groups_by_length_in_input_order():
    from llada_scale.sampling.common import length_batches

    rows = [[1, 2], [3], [4, 5], [], [6, 7], [8]]
    got = [(idx, ids.tolist(), ids.dtype) for idx, ids in length_batches(rows, 2, "cpu")]
    assert got == [([3], [[]], torch.long), ([1, 5], [[3], [8]], torch.long), ([0, 2], [[1, 2], [4, 5]], torch.long),
                   ([4], [[6, 7]], torch.long)]
    assert [idx for idx, _ in length_batches(rows, None, "cpu")] == [[3], [1, 5], [0, 2, 4]]

SYNC_SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, os.environ["REPO"])
torch.distributed.init_process_group("gloo")
from llada_scale.sampling import ar_generate, diffusion_generate, log_likelihood_batch
from llada_scale.model.transformer import ModelConfig, Transformer
rank = torch.distributed.get_rank()
torch.manual_seed(0)
cfg = dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
           max_seq_len=128, init_std=0.3)
dm = Transformer(ModelConfig(**cfg, causal=False, mask_token_id=63)).eval()
ar = Transformer(ModelConfig(**cfg, causal=True)).eval()
prompts = [[5, 6, 7]] if rank == 0 else [[8, 9], [10, 11, 12, 13]]
d = diffusion_generate(dm, prompts, mask_token_id=63, gen_length=16, block_length=8, threshold=0.2, sync_ranks=True)
alone = diffusion_generate(dm, prompts, mask_token_id=63, gen_length=16, block_length=8, threshold=0.2)
a = ar_generate(ar, prompts, max_new_tokens=8, eos_token_id=int(rank == 0) * 7 + 3, sync_ranks=True)
pairs = [([1], [2, 3])] * (1 if rank == 0 else 5)
calls = []
orig = dm.hidden_states
dm.hidden_states = lambda *x, **k: (calls.append(1), orig(*x, **k))[1]
log_likelihood_batch(dm, pairs, causal=False, mask_token_id=63, mc_samples=4, batch_size=4, sync_ranks=True)
out = {"d_nfe": d.nfe, "same_tokens": d.tokens == alone.tokens, "a_nfe": a.nfe, "ll_calls": len(calls)}
print("RESULT" + json.dumps(out), flush=True)
"""


@pytest.mark.distributed
def test_sync_ranks_keeps_forward_counts_equal():
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[2])
    procs = [subprocess.Popen([sys.executable, "-c", SYNC_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "REPO": repo})
             for r in range(2)]
    results = []
    for p in procs:
        out = p.communicate(timeout=120)[0].decode()
        assert p.returncode == 0, out[-2000:]
        results.append(json.loads(out.split("RESULT")[-1]))
    assert results[0]["d_nfe"] == results[1]["d_nfe"]
    assert results[0]["a_nfe"] == results[1]["a_nfe"]
    assert results[0]["ll_calls"] == results[1]["ll_calls"] == 5
    assert results[0]["same_tokens"] and results[1]["same_tokens"]
