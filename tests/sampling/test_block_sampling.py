"""Block sampler for batched evaluation: ``generate_blocks_batch`` is independent of batch size and of the
other prompts, cached == uncached through it, its forward count; the default sampler and block length read from
checkpoint metadata (``tools/eval_diffusion.py`` with block checkpoints: tests/eval/test_eval_cli.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import llada_scale.checkpoint as cio  # noqa: E402
from llada_scale.sampling.block import generate_blocks, generate_blocks_batch  # noqa: E402
from llada_scale.api import default_sampler, trained_block_length  # noqa: E402
from llada_scale.model.transformer import ModelConfig, Transformer  # noqa: E402

VOCAB = 100
MASK = 99
DATA = Path(os.environ.get("LLADA_DATA", REPO.parent / "shared" / "data"))
need_data = pytest.mark.skipif(not (DATA / "eval").is_dir() or not (DATA / "tokenizer" / "minimind").is_dir(),
                               reason="shared eval data not available")


def tiny_model(seed=7):
    """float64 with large weights: confident, varied predictions and no float ties between batch shapes."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=128, causal=False, mask_token_id=MASK,
                      attention_backend="sdpa", init_std=0.3, qk_norm=True)
    return Transformer(cfg).to(torch.float64).eval()


def prompts_of(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK, (n,), generator=g).tolist() for n in lengths]


KW = dict(mask_token_id=MASK, gen_length=10, block_length=4, steps_per_block=2)


def test_batch_size_and_other_prompts_do_not_matter():
    model = tiny_model()
    prompts = prompts_of([3, 5, 3, 0, 7, 5, 3, 8])
    ref = generate_blocks_batch(model, prompts, **KW)
    assert len(ref.tokens) == len(prompts) and all(len(t) == 10 and MASK not in t for t in ref.tokens)
    assert ref.extra["groups"] == 5 and ref.extra["calls"] == 5
    for bs in (1, 2):
        assert generate_blocks_batch(model, prompts, batch_size=bs, **KW).tokens == ref.tokens
    for i, p in enumerate(prompts):  # alone
        assert generate_blocks_batch(model, [p], **KW).tokens == [ref.tokens[i]]
    # in another order, among other prompts
    order = [6, 2, 7, 0]
    others = prompts_of([3, 5, 8], seed=11)
    mixed = generate_blocks_batch(model, others + [prompts[i] for i in order], batch_size=3, **KW)
    assert mixed.tokens[3:] == [ref.tokens[i] for i in order]
    # same as the equal-length entry point
    x = generate_blocks(model, torch.tensor([prompts[0], prompts[2], prompts[6]]), 10, 4, 2, MASK)
    assert x[:, 3:].tolist() == [ref.tokens[0], ref.tokens[2], ref.tokens[6]]


def test_seeded_sampling_does_not_depend_on_batching():
    model = tiny_model()
    prompts = prompts_of([4, 6, 4, 4, 6])
    seeds = [10, 11, 12, 13, 14]
    a = generate_blocks_batch(model, prompts, temperature=1.0, seeds=seeds, **KW)
    b = generate_blocks_batch(model, prompts, temperature=1.0, seeds=seeds, batch_size=1, **KW)
    c = generate_blocks_batch(model, prompts[::-1], temperature=1.0, seeds=seeds[::-1], batch_size=2, **KW)
    assert a.tokens == b.tokens == c.tokens[::-1]
    greedy = generate_blocks_batch(model, prompts, **KW)
    assert a.tokens != greedy.tokens  # temperature 1 on this model really samples
    # one row with a one-element generator list draws exactly what a single generator draws
    one = generate_blocks(model, torch.tensor([prompts[1]]), 10, 4, 2, MASK, temperature=1.0,
                          generator=torch.Generator().manual_seed(11))
    assert one[0, 6:].tolist() == a.tokens[1]


def test_cached_equals_uncached_and_forward_count():
    model = tiny_model()
    prompts = prompts_of([5, 3, 5, 0, 9])
    cached = generate_blocks_batch(model, prompts, batch_size=2, **{**KW, "gen_length": 11})
    plain = generate_blocks_batch(model, prompts, batch_size=2, use_cache=False, **{**KW, "gen_length": 11})
    assert cached.tokens == plain.tokens
    t = generate_blocks_batch(model, prompts, use_cache=False, temperature=1.0, seeds=[1, 2, 3, 4, 5],
                              **{**KW, "gen_length": 11})
    assert t.tokens == generate_blocks_batch(model, prompts, temperature=1.0, seeds=[1, 2, 3, 4, 5],
                                             **{**KW, "gen_length": 11}).tokens
    # P=5, block 4, 11 tokens: 16 positions = blocks 0..3; block 0 holds prompt only (1 prefill forward),
    # blocks 1..3 have 3, 4, 4 masked positions -> 2 steps each; blocks 1 and 2 are appended to the cache.
    one = generate_blocks_batch(model, [prompts[0]], **{**KW, "gen_length": 11})
    assert one.extra == {"prefill": 1, "denoise": 6, "append": 2, "calls": 1, "groups": 1}
    assert one.nfe == 9 and one.steps == 6
    assert generate_blocks_batch(model, [prompts[0]], use_cache=False, **{**KW, "gen_length": 11}).nfe == 6
    # 3 length groups, lengths 5 (two rows: one call with batch_size 2), 3, 0, 9
    assert cached.extra["calls"] == 4 and cached.nfe == sum(cached.extra[k] for k in ("prefill", "denoise", "append"))


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="seeds"):
        generate_blocks_batch(model, [[1, 2]], seeds=[1, 2], **KW)
    with pytest.raises(ValueError, match="batch_size"):
        generate_blocks_batch(model, [[1, 2]], batch_size=0, **KW)
    with pytest.raises(ValueError, match="mask token"):
        generate_blocks_batch(model, [[1, MASK]], **KW)
    with pytest.raises(ValueError, match="non-empty"):
        generate_blocks_batch(model, [], **KW)
    # suppressed ids are never generated
    res = generate_blocks_batch(model, prompts_of([4, 4]), suppress_token_ids=range(50, 99), **KW)
    assert all(t < 50 for row in res.tokens for t in row)


def test_default_sampler_and_block_length_from_meta():
    assert default_sampler(None) == default_sampler({"config": None}) == "llada"
    assert default_sampler({"config": {"objective": {"block_length": 0, "block_schedule": []}}}) == "llada"
    assert default_sampler({"config": {"objective": {"block_length": 16}}}) == "block"
    wsd = {"objective": {"block_schedule": [[4, 10], ["full", 10], [32, 10]]}}
    assert default_sampler({"config": wsd}) == "block"
    assert trained_block_length({"config": {"objective": {"block_length": 16}}}) == 16
    assert trained_block_length({"config": wsd, "step": None}) == 32
    assert trained_block_length({"config": wsd, "step": 5}) == 4
    assert trained_block_length({"config": wsd, "step": 15}) is None  # "full"
    assert trained_block_length({"config": None}) is None
