"""The LLaDA 2.1 editing decoder (:mod:`llada_scale.sampling.edit`) against a reference: a straightforward
batch-size-1 transcription of the release's ``generate()`` loop (LLaDA2.1 ``modeling_llada21_moe.py``) written
here, on a tiny random dense model; batching with left padding, the KV cache, NFE / edit counts, presets."""

from __future__ import annotations

import pytest
import torch

from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.sampling.edit import PRESETS, edit_generate, preset, sample_tokens

VOCAB, MASK, EOS = 64, 63, 0


def tiny_model(seed=5, std=0.35):
    """float64 with large weights: confident, varied predictions (some pass a threshold), no float ties."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_seq_len=128, causal=False, mask_token_id=MASK,
                      attention_backend="sdpa", init_std=std)
    return Transformer(cfg).to(torch.float64).eval()


def prompts_of(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, MASK, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def release_generate(model, prompt, gen_length, block_length, threshold, editing_threshold, max_post_steps):
    """The release's loop for one prompt at temperature 0, transcribed: full forward of the window with the
    block-causal mask every step. One deviation, kept in both: the mask token is never predicted (a trained
    model never does; a random one might). Returns (generated tokens, forwards, edits)."""
    p = len(prompt)
    num_blocks = (p + gen_length + block_length - 1) // block_length
    total = num_blocks * block_length
    blk = torch.tril(torch.ones(num_blocks, num_blocks, dtype=torch.bool))
    attn = blk.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None]
    x = torch.full((1, total), MASK, dtype=torch.long)
    x[0, :p] = torch.tensor(prompt, dtype=torch.long)
    forwards = edits = 0
    for nb in range(p // block_length, num_blocks):
        end = (nb + 1) * block_length
        cur = x[:, :end]
        start = nb * block_length
        prompt_in_block = torch.zeros(block_length, dtype=torch.bool)
        if start < p:
            prompt_in_block[:min(p - start, block_length)] = True
        post_steps = 0
        while True:
            old = cur[:, -block_length:].clone()
            active = cur[:, -block_length:] == MASK
            if not bool(active.any()):
                if editing_threshold is None:  # ours: editing off = plain threshold decoding, no post steps
                    break
                post_steps += 1
            if post_steps > max_post_steps:
                break
            logits = model(cur, position_ids=torch.arange(end)[None], attention_mask=attn[:, :, :end, :end])
            logits = logits[:, -block_length:].float()
            logits[..., MASK] = -torch.inf
            x0 = logits.argmax(-1)
            x0_p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            forwards += 1
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if int(active.sum()) > 0:
                conf = torch.where(active, x0_p, -torch.inf)
                high = (conf[0] > threshold) & active[0]
                if int(high.sum()) >= 1:
                    transfer[0] = high
                else:
                    transfer[0, torch.topk(conf[0], k=1).indices] = True
            editable = ~active & ~prompt_in_block[None]
            edit = torch.zeros_like(transfer)
            if editing_threshold is not None:
                edit = (torch.where(editable, x0_p, -torch.inf) > editing_threshold) & editable & (x0 != old)
            final = transfer | edit
            edits += int(edit.sum())
            if bool(final.any()):
                cur[:, -block_length:][final] = x0[final]
            if int(active.sum()) == 0 and not bool(edit.any()):
                break
    return x[0, p:p + gen_length].tolist(), forwards, edits


SETTINGS = [(0.7, 0.5, 16), (0.5, 0.0, 16), (0.3, 0.1, 2), (0.9, None, 16), (0.2, 0.0, 0)]


@pytest.mark.parametrize("threshold, editing_threshold, max_post", SETTINGS)
def test_equals_release_loop_batched_with_left_padding(threshold, editing_threshold, max_post):
    model = tiny_model()
    prompts = prompts_of([3, 9, 4, 12, 1])
    kw = dict(mask_token_id=MASK, gen_length=11, block_length=4, threshold=threshold,
              editing_threshold=editing_threshold, max_post_steps=max_post)
    refs = [release_generate(model, p, 11, 4, threshold, editing_threshold, max_post) for p in prompts]
    for use_cache in (True, False):
        res = edit_generate(model, prompts, use_cache=use_cache, **kw)
        assert res.tokens == [r[0] for r in refs]
        assert res.extra["row_edits"] == [r[2] for r in refs]
        assert res.extra["row_steps"] == [r[1] for r in refs]
    if editing_threshold is None:
        assert res.extra["edits"] == 0
    alone = [edit_generate(model, [p], **kw) for p in prompts]
    assert [a.tokens[0] for a in alone] == [r[0] for r in refs]
    # batch size 1: every forward of the release is one step here, plus the cache's prefill and appends
    for a, r, p in zip(alone, refs, prompts):
        blocks = -(-(len(p) + 11) // 4) - len(p) // 4
        assert a.extra["denoise"] == r[1]
        assert a.nfe == r[1] + (1 if len(p) >= 4 else 0) + blocks - 1


def test_edits_happen_and_are_counted():
    model = tiny_model(seed=2)
    prompts = prompts_of([5, 6, 7, 8], seed=4)
    res = edit_generate(model, prompts, mask_token_id=MASK, gen_length=12, block_length=4, **PRESETS["speed"])
    off = edit_generate(model, prompts, mask_token_id=MASK, gen_length=12, block_length=4, threshold=0.5,
                        editing_threshold=None, max_post_steps=16)
    assert res.extra["edits"] > 0 and off.extra["edits"] == 0
    assert res.extra["edits_per_token"] == pytest.approx(res.extra["edits"] / 48)
    assert sum(res.extra["row_edits"]) == res.extra["edits"]
    assert res.nfe == res.extra["prefill"] + res.extra["denoise"] + res.extra["append"]


def test_sampling_with_seeds_independent_of_batching():
    model = tiny_model()
    prompts = prompts_of([3, 7, 5])
    kw = dict(mask_token_id=MASK, gen_length=8, block_length=4, threshold=0.6, editing_threshold=0.3,
              temperature=0.8, top_k=20, top_p=0.9)
    a = edit_generate(model, prompts, seeds=[1, 2, 3], **kw)
    b = edit_generate(model, prompts, seeds=[1, 2, 3], batch_size=1, **kw)
    c = edit_generate(model, prompts, seeds=[4, 5, 6], **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert all(MASK not in t for t in a.tokens)


def test_sample_tokens_filters():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    tok, p = sample_tokens(logits)
    assert tok.tolist() == [[0]] and float(p) == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_tokens(logits, 1.0, top_k=2, generator=g)[0]) for _ in range(200)}
    assert seen == {0, 1}
    seen = {int(sample_tokens(logits, 1.0, top_p=0.7, generator=g)[0]) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 keeps the second token too; 0.8 >= 0.7 drops the rest
    tok, p = sample_tokens(logits, 1.0, top_k=1, generator=g)
    assert tok.tolist() == [[0]] and float(p) == pytest.approx(1.0)


def test_eos_early_stop_and_validation():
    model = tiny_model()
    prompts = prompts_of([3])
    res = edit_generate(model, prompts, mask_token_id=MASK, gen_length=12, block_length=4, threshold=0.5,
                        editing_threshold=0.0, eos_token_id=EOS, eos_early_stop=True, suppress_token_ids=[])
    assert len(res.tokens[0]) == 12 and MASK not in res.tokens[0]
    assert preset("quality") == {"threshold": 0.7, "editing_threshold": 0.5, "max_post_steps": 16}
    assert preset("speed") == {"threshold": 0.5, "editing_threshold": 0.0, "max_post_steps": 16}
    with pytest.raises(ValueError, match="preset"):
        preset("fast")
    with pytest.raises(ValueError, match="editing_threshold"):
        edit_generate(model, prompts, mask_token_id=MASK, gen_length=4, editing_threshold=1.5)
    with pytest.raises(ValueError, match="mask token"):
        edit_generate(model, [[MASK]], mask_token_id=MASK, gen_length=4)
