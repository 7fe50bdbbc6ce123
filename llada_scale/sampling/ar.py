"""Autoregressive decoding for causal models: greedy or temperature sampling, batched with left padding, with an
exact KV cache (:mod:`llada_scale.sampling.kv_cache`) on our Transformer."""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from llada_scale.sampling.common import (GenerationResult, add_gumbel_noise, any_global, apply_repetition_penalty,
                                         check_length, check_prompts, fast_path, left_pad, mask_kwargs, model_device,
                                         our_config, selected_logits)
from llada_scale.sampling.kv_cache import KVCache, cached_hidden, key_mask, lm_head, rope_tables

__all__ = ["ar_generate"]


@torch.no_grad()
def ar_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_token_id: int | None = None,
                temperature: float = 0.0, generator: torch.Generator | None = None, pad_token_id: int = 0,
                suppress_token_ids: Sequence[int] = (), sync_ranks: bool = False, use_cache: bool | None = None,
                repetition_penalty: float = 1.0, allow_extrapolation: bool = False) -> GenerationResult:
    """Greedy (temperature 0) or sampled autoregressive decoding for a batch of prompts.

    Each step appends ``argmax(logits_last / T + Gumbel)`` (:func:`add_gumbel_noise`, float64). With the KV
    cache one forward over the (left-padded) prompts fills every layer's keys and values, and each step then
    runs only the new token against them (exact: a causal model's earlier keys never change); without it
    every step recomputes the whole sequence. Rows that produced ``eos_token_id`` stop (their later tokens
    are discarded); the loop ends when every row stopped or after ``max_new_tokens`` steps.

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
        use_cache: KV cache on/off; None (default) = on for our (not ZeRO-partitioned) causal Transformer.
        repetition_penalty: HF-style penalty (> 0; 1 = off, the default) on every prompt and generated token
            (:func:`llada_scale.sampling.common.apply_repetition_penalty`).
        allow_extrapolation: run even when the longest prompt + ``max_new_tokens`` exceeds ``max_seq_len``.

    Returns:
        :class:`GenerationResult`; ``tokens[i]`` ends with eos when it was generated.

    Raises:
        ValueError: empty prompt, max_new_tokens < 1, negative temperature, repetition_penalty <= 0, a cache
            on a bidirectional or foreign model, prompt + max_new_tokens beyond ``max_seq_len`` without
            ``allow_extrapolation``.
    """
    prompts = check_prompts(prompts, allow_empty=False)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    cfg = our_config(model)
    if use_cache is None:
        use_cache = fast_path(model) and cfg.causal
    elif use_cache and (cfg is None or not cfg.causal):
        raise ValueError("the AR KV cache needs our causal Transformer (config.causal=True)")
    t0 = time.perf_counter()
    device = model_device(model)
    x, pos, doc = left_pad(prompts, pad_token_id, device=device)
    b, p = x.shape
    check_length(model, p + max_new_tokens, allow_extrapolation,
                 f"the longest prompt ({p} tokens) + max_new_tokens {max_new_tokens}")
    kv = KVCache.for_model(model, b, p + max_new_tokens) if use_cache else None
    if kv is not None:  # RoPE tables of every position this call can reach, computed once
        future = pos[:, -1:] + torch.arange(1, max_new_tokens + 1, device=device)
        cos, sin = rope_tables(model, torch.cat([pos, future], 1))
        # keys a new token may attend to: padding never changes and generated positions are document 1
        keys_ok = key_mask(torch.cat([doc, torch.ones_like(future, dtype=doc.dtype)], 1))
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    banned = torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)
    nfe = 0
    for t in range(max_new_tokens):
        cur = x.shape[1] - 1  # the newest position
        if kv is None:
            logits = selected_logits(model, x, pos, doc, rows, torch.full((b,), cur, device=device))
        elif t == 0:  # prefill: the prompts' keys/values
            prefill_mask = mask_kwargs(model, doc)["attention_mask"]
            h = cached_hidden(model, x, pos, kv, 0, mask=prefill_mask, store=True, kv_len=p,
                              rope=(cos[:, :, :p], sin[:, :, :p]))
            logits = lm_head(model, h[:, -1])
        else:  # the newest token against the cache
            h = cached_hidden(model, x[:, cur:], pos[:, cur:], kv, cur, store=True, kv_len=cur + 1,
                              mask=None if keys_ok is None else keys_ok[..., :cur + 1],
                              rope=(cos[:, :, cur:cur + 1], sin[:, :, cur:cur + 1]))
            logits = lm_head(model, h[:, 0])
        nfe += 1
        logits = apply_repetition_penalty(logits, x, repetition_penalty, doc == 1)
        if banned.numel():
            logits[:, banned] = -math.inf
        nxt = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)
        for j, tok in enumerate(nxt.tolist()):
            if not done[j]:
                out[j].append(tok)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        x = torch.cat([x, nxt[:, None]], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
        doc = torch.cat([doc, torch.ones_like(doc[:, -1:])], dim=1)
        if not any_global(not bool(done.all()), sync_ranks, device):
            break
    return GenerationResult(tokens=out, nfe=nfe, seconds=time.perf_counter() - t0, steps=nfe)
