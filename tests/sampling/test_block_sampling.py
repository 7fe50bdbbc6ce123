"""Block sampler in the batched evaluator: ``generate_blocks_batch`` is independent of batch size and of the
other prompts, cached == uncached through it, its forward count, and ``tools/eval_diffusion.py --sampler
block`` end to end on tiny random checkpoints (the sampler is recorded in the JSON)."""

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
from llada_scale.eval.tasks import EvalConfig, EvalError, default_sampler, trained_block_length  # noqa: E402
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
    cfg = EvalConfig(gen_length=10, block_length=4, steps=10)
    cfg.validate("block")  # no divisibility needed by the block sampler
    with pytest.raises(EvalError):
        cfg.validate("llada")
    with pytest.raises(EvalError, match="threshold"):
        EvalConfig(threshold=0.9).validate("block")
    assert EvalConfig(gen_length=128, block_length=32, steps=64).steps_per_block() == 16


# ------------------------------------------------------------------------------------------------ CLI
SMALL = ["--limit", "2", "--batch_size", "2", "--gen_length", "8", "--steps", "8", "--poem_gen_length", "8",
         "--no_progress"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from llada_scale.data.tokenizer import Tokenizer

    tok = Tokenizer.load(str(DATA / "tokenizer" / "minimind"))
    root = tmp_path_factory.mktemp("bd_models")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.padded_vocab_size(), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_seq_len=512, causal=False, mask_token_id=tok.mask_token_id)
    sd = Transformer(cfg).state_dict()
    out = {}
    for name, run_config in (("bd", {"objective": {"name": "diffusion", "block_length": 4}}), ("dm", None)):
        meta = {"format": "llada_scale", "model": cfg.to_dict(), "tokenizer": tok.identity()}
        if run_config:
            meta["run_config"] = run_config
        cio.save_safetensors(sd, str(root / name), meta, dtype="fp32", progress=False)
        out[name] = root / name
    return out


def evaluate(*argv) -> int:
    import eval_diffusion

    return eval_diffusion.main([str(a) for a in argv])


@need_data
def test_eval_block_sampler_default_from_checkpoint(checkpoints, tmp_path, capsys):
    out = tmp_path / "bd.json"
    assert evaluate("--checkpoint", checkpoints["bd"], "--tasks", "gsm8k,lambada,poem,piqa", "--mc_samples", "4",
                    "--output", out, *SMALL) == 0
    assert "sampler block (checkpoint), block_length 4 (checkpoint (diffusion)), 4 steps per block" \
        in capsys.readouterr().out
    res = json.loads(out.read_text())
    s = res["settings"]
    assert s["sampler"] == "block" and s["sampler_source"] == "checkpoint" and s["samplers"] == {"diffusion": "block"}
    assert s["block_length"] == 4 == s["eval_config"]["block_length"] and s["steps_per_block"] == 4
    assert res["models"]["diffusion"]["sampler"] == "block"
    assert (s["likelihood"], s["likelihood_source"]) == ("block", "checkpoint")  # the block NELBO by default
    for task in ("gsm8k", "lambada", "poem", "piqa"):
        m = res["results"][task]["diffusion"]
        assert m["n"] == 2 and m["nfe"] > 0 and len(res["records"][task]["diffusion"]) == 2
    # the block sampler seeds every prompt: another batch size gives the same outputs, also when sampling
    out1, out2 = tmp_path / "bs1.json", tmp_path / "bs2.json"
    args = ["--checkpoint", checkpoints["bd"], "--tasks", "gsm8k", "--temperature", "1", *SMALL]
    assert evaluate(*args, "--output", out1) == 0
    assert evaluate(*args, "--batch_size", "1", "--output", out2) == 0
    r1, r2 = (json.loads(p.read_text())["records"]["gsm8k"]["diffusion"] for p in (out1, out2))
    assert [r["output"] for r in r1] == [r["output"] for r in r2]


@need_data
def test_eval_sampler_flag_and_watch(checkpoints, tmp_path, capsys):
    out = tmp_path / "dm.json"
    assert evaluate("--checkpoint", checkpoints["dm"], "--sampler", "block", "--block_length", "8", "--tasks", "poem",
                    "--output", out, *SMALL) == 0
    s = json.loads(out.read_text())["settings"]
    assert (s["sampler"], s["sampler_source"], s["block_length"], s["block_length_source"]) == \
        ("block", "flag", 8, "flag")
    # a plain diffusion checkpoint defaults to the LLaDA sampler; --sampler llada overrides a block model's default
    assert evaluate("--checkpoint", checkpoints["dm"], "--tasks", "poem", "--block_length", "8", "--output", out,
                    *SMALL) == 0
    s = json.loads(out.read_text())["settings"]
    assert (s["sampler"], s["sampler_source"], s["steps_per_block"]) == ("llada", "checkpoint", None)
    assert evaluate("--checkpoint", checkpoints["bd"], "--sampler", "llada", "--tasks", "poem", "--block_length", "8",
                    "--output", out, *SMALL) == 0
    assert json.loads(out.read_text())["models"]["diffusion"]["sampler"] == "llada"
    # the block sampler has no threshold / CFG
    capsys.readouterr()
    assert evaluate("--checkpoint", checkpoints["bd"], "--threshold", "0.5", *SMALL) == 2
    assert "block sampler does not support --threshold" in capsys.readouterr().err
    # live view through the block sampler: 8 tokens, one per step (block 4, steps_per_block 4)
    wout = tmp_path / "watch.json"
    assert evaluate("--checkpoint", checkpoints["bd"], "--watch", "--prompt", "hi", "--gen_length", "8",
                    "--steps", "8", "--mask_symbol", "#", "--output", wout) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[step")]
    assert len(lines) == 8 and "#" in lines[0]
    w = json.loads(wout.read_text())
    assert w["settings"]["sampler"] == "block" and w["watch"]["steps"] == 8
