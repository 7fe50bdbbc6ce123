"""LLaDA2.x's own decoding loop (the released ``LLaDA2MoeModelLM.generate``), on our exact KV cache of finished
blocks: the default sampler of LLaDA2 checkpoints.

Semantics of the release (inclusionAI LLaDA2.0/2.1 ``modeling_llada2_moe.py``, ``generate``):

* the sequence ``[prompt ; masks]`` is padded with masks to whole blocks of ``block_length`` counted from
  position 0 (the prompt fills the start of its last block); attention is block-causal (a block sees itself and
  every earlier block);
* every block runs the same step schedule: ``block_length`` split over ``steps`` steps as evenly as possible,
  the remainder on the first steps (``_get_num_transfer_tokens(block_length, steps)``), whatever the number of
  masked positions in the block; ``steps`` is first capped at ``gen_length // minimal_topk``;
* at step s the model predicts every position of the block (greedy argmax of the softmax at temperature 0,
  else a multinomial draw from softmax(logits / temperature)); among the still-masked positions, all whose
  predicted token's probability exceeds ``threshold`` are committed if they are at least the scheduled
  number n_s, else the min(n_s, masked) most confident ones; a block ends when no mask is left or its steps
  are used up (masks may then remain, as in the release);
* decoding stops after a block in which ``eos_token_id`` appeared in the generated part.

The finished blocks' keys and values never change under a block-causal mask, so caching them
(:func:`llada_scale.sampling.block.cached_block_logits`) gives the release's tokens with one block of positions
per forward instead of the whole prefix.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from llada_scale.sampling.block import cached_block_logits
from llada_scale.sampling.common import (GenerationResult, check_length, check_prompts, length_batches,
                                         model_device)
from llada_scale.sampling.kv_cache import KVCache

__all__ = ["release_schedule", "generate_llada2"]


def release_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens to commit at each of ``steps`` steps of a block: ``block_length`` split evenly, remainder first
    (the release's ``_get_num_transfer_tokens``; zeros kept, as there)."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if s < rem else 0) for s in range(steps)]


def _decode_group(model, prompt: torch.Tensor, gen_length: int, block_length: int, steps: int, threshold: float,
                  mask_token_id: int, eos_token_id: int | None, temperature: float, generator, banned: torch.Tensor,
                  allow_extrapolation: bool) -> tuple[torch.Tensor, int]:
    b, p = prompt.shape
    num_blocks = -(-(p + gen_length) // block_length)
    total = num_blocks * block_length
    check_length(model, total, allow_extrapolation, f"prompt ({p} tokens) + gen_length {gen_length} in whole blocks")
    device = prompt.device
    x = torch.full((b, total), mask_token_id, dtype=torch.long, device=device)
    x[:, :p] = prompt
    pos = torch.arange(total, device=device).expand(b, total)
    cache = KVCache.for_model(model, b, total)
    schedule = release_schedule(block_length, steps)
    nfe = 0
    for k in range(num_blocks):
        s, e = k * block_length, (k + 1) * block_length
        if k >= p // block_length:
            for n in schedule:
                active = x[:, s:e] == mask_token_id
                if not bool(active.any()):
                    break
                logits = cached_block_logits(model, x[:, s:e], pos[:, s:e], cache)
                nfe += 1
                logits[..., banned] = -torch.inf
                probs = torch.softmax(logits if temperature == 0 else logits / temperature, -1)
                if temperature == 0:
                    tok = probs.argmax(-1)
                else:
                    tok = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(b, -1)
                conf = torch.where(active, probs.gather(-1, tok[..., None])[..., 0], -torch.inf)
                for r in range(b):
                    high = conf[r] > threshold
                    if int(high.sum()) >= n:
                        take = high
                    else:
                        take = torch.zeros_like(high)
                        take[conf[r].topk(min(n, int(active[r].sum()))).indices] = True
                    x[r, s:e][take] = tok[r][take]
        if k + 1 < num_blocks:
            cached_block_logits(model, x[:, s:e], pos[:, s:e], cache, append=True)
            nfe += 1
        if eos_token_id is not None and k >= p // block_length and \
                bool((x[:, p:e] == eos_token_id).any(1).all()):
            break
    return x[:, p:p + gen_length], nfe


@torch.no_grad()
def generate_llada2(model, prompts: Sequence[Sequence[int]], *, mask_token_id: int, gen_length: int,
                    block_length: int = 32, steps: int = 32, threshold: float = 0.95, temperature: float = 0.0,
                    eos_token_id: int | None = None, minimal_topk: int = 1, suppress_token_ids: Sequence[int] = (),
                    seed: int = 0, batch_size: int | None = None,
                    allow_extrapolation: bool = False) -> GenerationResult:
    """Decode ``prompts`` as the LLaDA2 release's ``generate`` (module docstring), prompts grouped by length.

    Args:
        model: a llada_scale backbone (LLaDA2 MoE or dense) or a wrapper with ``.module``.
        prompts: token-id lists (no mask tokens); gen_length: tokens per answer (>= 1).
        block_length: tokens per block (default 32); steps: denoising steps *per block* (default 32), capped at
            ``gen_length // minimal_topk``; threshold: commit confidence (default 0.95, the release's).
        temperature: 0 = greedy (default); > 0 multinomial draws seeded by ``seed`` (per length group).
        eos_token_id: stop after a block in which every row produced it (None = never stop early).
        suppress_token_ids: ids never generated (e.g. vocabulary padding rows). The mask token itself is not
            suppressed, as in the release: a predicted mask leaves the position masked.
    Returns:
        :class:`GenerationResult`: ``tokens[i]`` = the ``gen_length`` positions after prompt i (mask ids where
        the release would leave masks, e.g. after an early stop; cut with ``truncate_at``), ``nfe`` = forwards,
        each over one block of positions (denoising steps plus one per finished block appended to the cache).
    Raises:
        ValueError: bad lengths/steps/threshold, a prompt with the mask token, a too long sequence.
    """
    t0 = time.perf_counter()
    rows = check_prompts(prompts)
    if gen_length < 1 or block_length < 1 or steps < 1 or minimal_topk < 1:
        raise ValueError("gen_length, block_length, steps and minimal_topk must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if any(mask_token_id in r for r in rows):
        raise ValueError("a prompt contains the mask token")
    steps = min(steps, gen_length // minimal_topk) or 1
    device = model_device(model)
    banned = torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=device)
    out: list = [None] * len(rows)
    nfe = 0
    for chunk, ids in length_batches(rows, batch_size, device):
        gen = torch.Generator(device=device).manual_seed(seed + chunk[0])
        toks, n = _decode_group(model, ids, gen_length, block_length, steps, threshold, mask_token_id,
                                eos_token_id, temperature, gen, banned, allow_extrapolation)
        nfe += n
        for j, t in enumerate(toks.tolist()):
            out[chunk[j]] = t
    return GenerationResult(tokens=out, nfe=nfe, seconds=time.perf_counter() - t0, steps=nfe)
