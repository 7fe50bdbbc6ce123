"""Autoregressive decoding for causal models: greedy or temperature sampling, batched with left padding."""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from llada_scale.sampling.common import (GenerationResult, add_gumbel_noise, any_global, check_prompts, left_pad,
                                         model_device, selected_logits)

__all__ = ["ar_generate"]


@torch.no_grad()
def ar_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_token_id: int | None = None,
                temperature: float = 0.0, generator: torch.Generator | None = None, pad_token_id: int = 0,
                suppress_token_ids: Sequence[int] = (), sync_ranks: bool = False) -> GenerationResult:
    """Greedy (temperature 0) or sampled autoregressive decoding for a batch of prompts.

    Each step recomputes the whole (left-padded) sequence - no KV cache - and appends
    ``argmax(logits_last / T + Gumbel)`` (:func:`add_gumbel_noise`, float64). Rows that produced
    ``eos_token_id`` stop (their later tokens are discarded); the loop ends when every row stopped or after
    ``max_new_tokens`` steps.

    ZeRO-3: with ``eos_token_id`` the number of forwards depends on the data - pass ``sync_ranks=True`` (or
    ``eos_token_id=None``) so that every rank runs the same number.

    Args:
        model: a causal model (``cfg.causal=True``) called as ``model(ids, position_ids=, document_ids=)``.
        prompts: B non-empty token-id lists.
        max_new_tokens: >= 1.
        eos_token_id: stop id or None (always run ``max_new_tokens`` steps).
        temperature: >= 0.
        generator: torch.Generator for sampling.
        pad_token_id: id of left padding (isolated by document ids; any id works).
        suppress_token_ids: ids never generated (e.g. the mask token of a converted model).
        sync_ranks: OR the "still running" flag over ranks every step (needed under ZeRO-3 with eos).

    Returns:
        :class:`GenerationResult`; ``tokens[i]`` ends with eos when it was generated.

    Raises:
        ValueError: empty prompt, max_new_tokens < 1, negative temperature.
    """
    prompts = check_prompts(prompts, allow_empty=False)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    t0 = time.perf_counter()
    device = model_device(model)
    x, pos, doc = left_pad(prompts, pad_token_id, device=device)
    b = x.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    banned = torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)
    nfe = 0
    for _ in range(max_new_tokens):
        last = torch.full((b,), x.shape[1] - 1, device=device)
        logits = selected_logits(model, x, pos, doc, rows, last)
        nfe += 1
        if banned.numel():
            logits[:, banned] = -math.inf
        nxt = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)
        for j, t in enumerate(nxt.tolist()):
            if not done[j]:
                out[j].append(t)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        x = torch.cat([x, nxt[:, None]], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
        doc = torch.cat([doc, torch.ones_like(doc[:, -1:])], dim=1)
        if not any_global(not bool(done.all()), sync_ranks, device):
            break
    return GenerationResult(tokens=out, nfe=nfe, seconds=time.perf_counter() - t0, steps=nfe)
