"""The Python API: README's five lines run as written on a tiny checkpoint; defaults follow the checkpoint (AR,
diffusion, block diffusion); results equal the samplers and likelihoods they wrap; bad input is one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import llada_scale
import llada_scale.checkpoint as cio
from llada_scale.sampling import diffusion_generate, log_likelihood

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {"ar": tiny_checkpoint(True), "dm": tiny_checkpoint(False),
            "bd": tiny_checkpoint(False, run_config={"objective": {"name": "diffusion", "block_length": 8}})}


def test_readme_five_lines_run(ckpts, capsys):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 5, lines
    path = re.search(r'llada_scale\.load\("([^"]+)"\)', block).group(1)
    exec(block.replace(f'"{path}"', repr(str(ckpts["dm"]))), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 3 and float(printed[-1]) < 0


def test_defaults_follow_the_checkpoint(ckpts):
    ar, dm, bd = (llada_scale.load(ckpts[k]) for k in ("ar", "dm", "bd"))
    assert (ar.causal, ar.estimator) == (True, "ar")
    assert (dm.sampler, dm.estimator, dm.block_length) == ("low_confidence", "full", None)
    assert (bd.sampler, bd.estimator, bd.block_length) == ("block", "block", 8)
    assert dm.device.type == "cpu" and dm.module.model.embed_tokens.weight.dtype == torch.float32
    assert "diffusion" in repr(dm)


def test_generate_equals_the_sampler_and_is_batch_invariant(ckpts):
    dm = llada_scale.load(ckpts["dm"])
    prompts = ["Hello there", "The history of Rome is long"]
    one, = dm.generate(prompts[1], gen_length=16, block_length=8)
    assert isinstance(one, str)
    both = dm.generate(prompts, gen_length=16, block_length=8, batch_size=2)
    assert both[1] == one and dm.generate(prompts, gen_length=16, block_length=8, batch_size=1) == both
    ids = dm.tokenizer.encode(prompts[1])
    ref = diffusion_generate(dm.module, [ids], mask_token_id=dm.mask_token_id, gen_length=16, block_length=8,
                             steps=16, suppress_token_ids=dm.suppress_token_ids)
    from llada_scale.sampling import truncate_at

    assert one == dm.decode(truncate_at(ref.tokens[0], dm.stop_ids))
    for sampler in ("random", "threshold", "block"):
        out = dm.generate("hi", gen_length=8, block_length=8, sampler=sampler)
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert isinstance(dm.generate("hi", gen_length=16, block_length=8, sampler="threshold", cache="dual")[0], str)
    ar = llada_scale.load(ckpts["ar"])
    assert isinstance(ar.chat([{"role": "user", "content": "hi"}], gen_length=8), str)
    steps = []
    dm.generate("hi", gen_length=8, block_length=8, steps=4, callback=lambda s, t, c: steps.append(s))
    assert steps == [0, 1, 2, 3]


def test_log_likelihood_matches_the_estimators(ckpts):
    ar, dm, bd = (llada_scale.load(ckpts[k]) for k in ("ar", "dm", "bd"))
    ctx, cont = ar.encode_pair("The capital of France is", " Paris")
    assert ar.log_likelihood("The capital of France is", " Paris") == pytest.approx(
        log_likelihood(ar.module, ctx, cont, causal=True), abs=1e-6)
    a = dm.log_likelihood("The capital of France is", " Paris", mc_samples=16)
    assert a == dm.log_likelihood("The capital of France is", " Paris", mc_samples=16) and a < 0  # seeded
    full = bd.log_likelihood("Once upon a time there", " was a king", mc_samples=16, estimator="full")
    block = bd.log_likelihood("Once upon a time there", " was a king", mc_samples=16)
    assert full != block
    with pytest.raises(ValueError, match="estimator"):
        ar.log_likelihood("a", " b", estimator="block")


def test_bad_input_is_one_clear_line(ckpts, tmp_path):
    dm = llada_scale.load(ckpts["dm"])
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        dm.generate("hi", sampler="fast")
    with pytest.raises(ValueError, match="max_seq_len 256"):
        dm.generate("word " * 300, gen_length=32)
    out = dm.generate("word " * 300, gen_length=32, allow_extrapolation=True)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    for path in (bad, tmp_path / "missing"):
        with pytest.raises(cio.CheckpointError) as e:
            llada_scale.load(path)
        assert "\n" not in str(e.value)
