"""LLaDA2's default sampler: ``llada_scale.load`` on an imported tiny LLaDA2 checkpoint, and at temperature 0
``Model.generate_ids(gen_length=N, block_length=B, steps=S*N//B, threshold=t)`` equals a reference written here
from the release's ``generate()`` loop (no cache: the whole block-causal prefix recomputed every step)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))

import llada_scale  # noqa: E402
from llada_scale.sampling.llada2 import release_schedule  # noqa: E402
from tests.checkpoint.test_convert import convert  # noqa: E402
from tests.checkpoint.test_llada2 import make_llada2_dir  # noqa: E402


def release_generate(module, prompt, gen_length, block_length, steps, threshold, mask_id, eos_id, branches=None):
    """The release's generate() at temperature 0, batch 1: returns the answer up to and including the first eos;
    appends "threshold" / "topk" to ``branches`` for every step, by the rule that committed."""
    steps = min(steps, gen_length)
    p = len(prompt)
    num_blocks = (p + gen_length + block_length - 1) // block_length
    total = num_blocks * block_length
    blocks = torch.arange(total) // block_length
    causal = (blocks[None, :] <= blocks[:, None])[None, None]  # block-causal, [1, 1, total, total]
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[0, :p] = torch.tensor(prompt)
    base, rem = divmod(block_length, steps)
    schedule = [base + (1 if s < rem else 0) for s in range(steps)]
    for nb in range(p // block_length, num_blocks):
        end = (nb + 1) * block_length
        cur = x[:, :end]
        for n in schedule:
            active = cur[:, -block_length:] == mask_id
            if active.sum() == 0:
                break
            logits = module(cur, position_ids=torch.arange(end)[None], attention_mask=causal[:, :, :end, :end]).float()
            probs = torch.softmax(logits[:, -block_length:], -1)
            x0 = probs.argmax(-1)
            x0_p = probs.gather(-1, x0[..., None])[..., 0]
            conf = torch.where(active, x0_p, -torch.inf)
            high = conf[0] > threshold
            take = torch.zeros_like(x0, dtype=torch.bool)
            if high.sum() >= n:
                take[0] = high
                branches is not None and branches.append("threshold")
            else:
                branches is not None and branches.append("topk")
                take[0, torch.topk(conf[0], k=min(n, int(active.sum()))).indices] = True
            cur[:, -block_length:][take] = x0[take]
        x[:, :end] = cur
        if (x[0, p:end] == eos_id).any():
            break
    ans = x[0, p:p + gen_length].tolist()
    return ans[:ans.index(eos_id) + 1] if eos_id in ans else ans


@pytest.fixture(scope="module")
def llada2_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llada2")
    make_llada2_dir(tmp / "rel", vocab_size=106)
    assert convert("import-llada2", tmp / "rel", tmp / "ours", "--dtype", "fp32", "--quiet") == 0
    return tmp / "ours"


@pytest.fixture(scope="module")
def llada2_model(llada2_dir):
    return llada_scale.load(str(llada2_dir))


def test_lm_eval_harness_generates_with_the_llada2_sampler(llada2_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llada_scale.eval import harness

    lm = harness.LladaScaleLM(pretrained=str(llada2_dir), gen_length=16)
    assert lm.m.sampler == "llada2"
    req = Instance(request_type="generate_until", doc={}, arguments=("hello world", {"until": ["zzzz"]}), idx=0)
    out = lm.generate_until([req])
    ids = lm.m.generate_ids([lm.m.encode_prompt("hello world")], gen_length=16).tokens[0]
    assert out == [lm.m.decode(ids)]


def test_load_gives_llada2_defaults(llada2_model):
    m = llada2_model
    assert m.sampler == "llada2" and m.block_length == 32 and m.estimator == "block"
    assert m.mask_token_id == 105 and type(m.module).__name__ == "LLaDA2MoeModel"
    assert m.log_likelihood("hello world", " what is", mc_samples=4) < 0


@pytest.mark.parametrize("threshold, head_scale", [(0.95, 1.0), (0.3, 4.0)], ids=["topk-path", "threshold-path"])
@pytest.mark.parametrize("prompt_len", [5, 8])
def test_generate_ids_equals_release_loop(llada2_model, threshold, head_scale, prompt_len):
    m = llada2_model
    with torch.no_grad():
        m.module.lm_head.weight.mul_(head_scale)  # peaked predictions so that some pass the threshold
    try:
        prompts = [torch.randint(0, 100, (prompt_len,), generator=torch.Generator().manual_seed(s)).tolist()
                   for s in range(2)]
        n, b, s = 24, 8, 4  # 3+ blocks, the prompt in the first, 4 steps per block of 8
        ours = m.generate_ids(prompts, gen_length=n, block_length=b, steps=s * n // b, threshold=threshold)
        eos = m.stop_ids[0]
        branches = []
        for prompt, got in zip(prompts, ours.tokens):
            ref = release_generate(m.module, prompt, n, b, s, threshold, m.mask_token_id, eos, branches)
            assert got == (ref[:-1] if ref and ref[-1] == eos else ref)
        assert ("threshold" in branches) == (head_scale > 1) and "topk" in branches, branches
    finally:
        with torch.no_grad():
            m.module.lm_head.weight.div_(head_scale)


def test_release_schedule():
    assert release_schedule(32, 32) == [1] * 32
    assert release_schedule(10, 4) == [3, 3, 2, 2]
    assert release_schedule(4, 8) == [1, 1, 1, 1, 0, 0, 0, 0]
