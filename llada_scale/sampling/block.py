"""Semi-autoregressive sampling for block-diffusion models, with an exact KV cache of finished blocks.

The sequence ``[prompt ; gen_length masks]`` is cut into blocks of ``block_length`` positions counted from
position 0 (the same blocks as training, :func:`llada_scale.model.block_attention.block_ids`), so the first block
that is decoded may hold the prompt's tail. Blocks are decoded left to right; within a block,
``steps_per_block`` denoising steps each commit the most confident predictions among the block's masked
positions (LLaDA low-confidence remasking, GUIDELINES.md / ML-GSAI/LLaDA ``generate.py``; block-wise semi-AR
decoding as in BD3-LM, Arriola et al. 2025, Sec. 3, and LLaDA 2.0).

Why the cache is exact: under the block-diffusion training mask a noisy block attends to itself and to the
*clean* tokens of earlier blocks, and clean tokens attend only block-causally to clean tokens. So the keys and
values of a finished block, computed once from its clean tokens attending to the cache plus the whole block,
never change afterwards, and a noisy block only needs them plus its own tokens: full (unmasked) attention over
``[cache ; block]``. The uncached path recomputes everything with
:func:`llada_scale.model.block_attention.block_diffusion_logits` on ``[x ; x]`` every step; the tests check both give
identical tokens.

Prompts of different lengths: :func:`generate_blocks_batch` groups them by length (no padding, so every row is
decoded exactly as if alone) and returns a :class:`llada_scale.sampling.common.GenerationResult` with an honest
forward count; this is what ``tools/eval_diffusion.py --sampler block`` uses.

The model has no cache API; the cached forward is :func:`llada_scale.sampling.kv_cache.cached_hidden` (shared
with the prefix/dual caches of the LLaDA sampler and with AR decoding).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from llada_scale.model import block_attention as ba
from llada_scale.sampling.common import (GenerationResult, apply_repetition_penalty, check_generator, check_length,
                                         check_prompts, length_batches, model_device)
from llada_scale.sampling.kv_cache import KVCache, cached_hidden, core_of, lm_head


@torch.no_grad()
def cached_block_logits(model, block_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                        append: bool = False) -> torch.Tensor | None:
    """Logits of one block attending to the cached finished blocks and to the whole block (no mask).

    Args:
        model: :class:`llada_scale.model.transformer.Transformer` (or a wrapper with ``.module``).
        block_ids: int64 [B, l] tokens of the block (may contain mask tokens); position_ids: int64 [B, l].
        cache: finished blocks so far.
        append: store this block's keys/values in ``cache`` (call once the block is fully decoded, with its
            clean tokens); the head is then skipped.
    Returns:
        float32 logits [B, l, V]; None with ``append``.
    Raises:
        TypeError: ``model`` is not a llada_scale Transformer (or a wrapper of one).
    """
    core = core_of(model)
    end = cache.length + block_ids.shape[1]
    x = cached_hidden(core, block_ids, position_ids, cache, cache.length, store=append, kv_len=end)
    if append:
        cache.length = end
        return None
    return lm_head(core, x)  # a module call (ZeRO-3 gathers the head)


def num_transfer_tokens(num_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each of ``steps`` steps: ``num_masked`` split as evenly as possible, the remainder
    on the first steps (ML-GSAI/LLaDA ``generate.py::get_num_transfer_tokens``). Zeros are dropped, so fewer
    steps are returned when ``steps > num_masked``."""
    steps = max(1, steps)
    base, rem = divmod(num_masked, steps)
    return [n for n in (base + (1 if s < rem else 0) for s in range(steps)) if n > 0]


def _commit(x: torch.Tensor, logits: torch.Tensor, start: int, n: int, mask_token_id: int, banned: torch.Tensor,
            temperature: float, generator, repetition_penalty: float = 1.0) -> torch.Tensor:
    """Commit the ``n`` most confident predictions among the masked positions of ``x[:, start:]`` in place.

    Confidence is the softmax probability of the chosen token (low-confidence remasking, LLaDA). With
    ``temperature > 0`` the choice is argmax of Gumbel-perturbed logits (LLaDA ``add_gumbel_noise``, float64),
    the uniform draws taken from ``generator`` (one generator for the batch, or a sequence of one generator per
    row: row i then draws only from its own generator). The ids in ``banned`` (the mask token, plus any
    suppressed ids) are never predicted; ``repetition_penalty`` (:func:`~llada_scale.sampling.common.
    apply_repetition_penalty`) counts every token of ``x`` that is not the mask token. Returns bool [B, l]: the
    positions committed now.
    """
    logits = apply_repetition_penalty(logits.double(), x, repetition_penalty, x != mask_token_id)
    logits[..., banned] = -torch.inf
    if temperature > 0:
        if isinstance(generator, (list, tuple)):
            u = torch.stack([torch.rand(logits.shape[1:], dtype=torch.float64, device=logits.device, generator=g)
                             for g in generator])
        else:
            u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
        choice = (logits.exp() / (-torch.log(u.clamp_min(1e-300))) ** temperature).argmax(-1)
    else:
        choice = logits.argmax(-1)
    conf = torch.softmax(logits, -1).gather(-1, choice[..., None])[..., 0]
    block = x[:, start:start + logits.shape[1]]
    is_masked = block == mask_token_id
    conf = torch.where(is_masked, conf, torch.full_like(conf, -torch.inf))
    idx = conf.topk(n, dim=1).indices
    block.scatter_(1, idx, choice.gather(1, idx))
    committed = torch.zeros_like(is_masked)
    committed.scatter_(1, idx, True)
    return committed


def _decode(model, prompt_ids: torch.Tensor, gen_length: int, block_length: int, steps_per_block: int,
            mask_token_id: int, temperature: float, use_cache: bool, generator, suppress_token_ids: Sequence[int],
            callback, repetition_penalty: float = 1.0, allow_extrapolation: bool = False
            ) -> tuple[torch.Tensor, dict]:
    """The body of :func:`generate_blocks`; also returns the forward-pass counts ``{"prefill", "denoise",
    "append"}`` (each one model forward over the whole batch)."""
    if gen_length < 1 or block_length < 1 or steps_per_block < 1:
        raise ValueError("gen_length, block_length and steps_per_block must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if bool((prompt_ids == mask_token_id).any()):
        raise ValueError("the prompt contains the mask token")
    b, p = prompt_ids.shape
    if isinstance(generator, (list, tuple)) and len(generator) != b:
        raise ValueError(f"{len(generator)} generators for {b} rows")
    total = p + gen_length
    check_length(model, total, allow_extrapolation, f"prompt ({p} tokens) + gen_length {gen_length}")
    device = prompt_ids.device
    check_generator(generator, device)
    x = torch.cat([prompt_ids, torch.full((b, gen_length), mask_token_id, dtype=torch.long, device=device)], 1)
    positions = torch.arange(total, device=device).expand(b, total)
    banned = torch.tensor(sorted({mask_token_id, *suppress_token_ids}), dtype=torch.long, device=device)
    counts = {"prefill": 0, "denoise": 0, "append": 0}
    first = p // block_length  # first block that holds a generated position
    num_blocks = -(-total // block_length)
    cache = None
    if use_cache:
        cache = KVCache.for_model(model, b, total)
        for k in range(first):  # prefill: the prompt's complete blocks, one block at a time
            s, e = k * block_length, (k + 1) * block_length
            cached_block_logits(model, x[:, s:e], positions[:, s:e], cache, append=True)
            counts["prefill"] += 1
    for k in range(first, num_blocks):
        s, e = k * block_length, min((k + 1) * block_length, total)
        num_masked = int((x[0, s:e] == mask_token_id).sum())
        for n in num_transfer_tokens(num_masked, steps_per_block):
            if use_cache:
                logits = cached_block_logits(model, x[:, s:e], positions[:, s:e], cache)
            else:
                # dense SDPA mask: a new length per call would recompile flex until dynamo's limit, then run
                # eager flex, which materialises the [B, H, 2L, 2L] scores (issue 21)
                logits = ba.block_diffusion_logits(model, x, x, positions, None, block_length, backend="sdpa")[:, s:e]
            committed = _commit(x, logits, s, n, mask_token_id, banned, temperature, generator, repetition_penalty)
            if callback is not None:
                full = torch.zeros_like(x, dtype=torch.bool)
                full[:, s:e] = committed
                callback(counts["denoise"], x[:, p:].clone(), full[:, p:])
            counts["denoise"] += 1
        if use_cache and k + 1 < num_blocks:
            cached_block_logits(model, x[:, s:e], positions[:, s:e], cache, append=True)
            counts["append"] += 1
    return x, counts


@torch.no_grad()
def generate_blocks(model, prompt_ids: torch.Tensor, gen_length: int, block_length: int, steps_per_block: int,
                    mask_token_id: int, temperature: float = 0.0, use_cache: bool = True,
                    generator: torch.Generator | Sequence[torch.Generator] | None = None, *,
                    suppress_token_ids: Sequence[int] = (),
                    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                    repetition_penalty: float = 1.0, allow_extrapolation: bool = False) -> torch.Tensor:
    """Block-by-block (semi-autoregressive) masked-diffusion decoding for a block-diffusion model.

    Args:
        model: :class:`llada_scale.model.transformer.Transformer` trained with block diffusion (any ``causal`` flag: the
            masks used here do not depend on it).
        prompt_ids: int64 [B, P], equal-length prompts (P >= 0), without mask tokens. (Prompts of different
            lengths: :func:`generate_blocks_batch`.)
        gen_length: tokens to generate (>= 1).
        block_length: tokens per block (>= 1), counted from position 0 as in training.
        steps_per_block: denoising steps per block; each commits ~(masked tokens in block)/steps tokens (a
            block with fewer masked positions than steps - e.g. the first one, holding the prompt's tail -
            takes one step per masked position).
        mask_token_id: the mask token.
        temperature: 0 = greedy (deterministic); > 0 = Gumbel-max sampling with ``generator``.
        use_cache: True = exact KV cache of finished blocks (:func:`cached_block_logits`); False = recompute
            ``[x ; x]`` with the training mask (:func:`llada_scale.model.block_attention.block_diffusion_logits`)
            every step (reference, O(L^2) per step).
        generator: one ``torch.Generator`` for the batch, or B generators (row i draws from the i-th only,
            so its tokens do not depend on the other rows), on the model's device.
        suppress_token_ids: ids never generated besides the mask token (e.g. vocabulary padding rows).
        callback: called after every denoising step as ``callback(step, tokens, committed)`` with the
            generated part ``[B, gen_length]`` (mask tokens where still masked) and a bool ``[B, gen_length]``
            of the positions committed at this step (the signature of
            :func:`llada_scale.sampling.diffusion.diffusion_generate`'s callback).
        repetition_penalty: HF-style penalty (> 0; 1 = off, the default) on every token already in the row
            (prompt and committed tokens), :func:`llada_scale.sampling.common.apply_repetition_penalty`.
        allow_extrapolation: run even when ``P + gen_length`` exceeds the model's ``max_seq_len``.
    Returns:
        int64 [B, P + gen_length]: the prompt followed by the generated tokens (no mask tokens left).
    Raises:
        ValueError: bad lengths, negative temperature, wrong number of generators, the prompt contains
            the mask token, or ``P + gen_length > max_seq_len`` without ``allow_extrapolation``.
        TypeError: ``use_cache`` with a model that is not a llada_scale Transformer.
    """
    return _decode(model, prompt_ids, gen_length, block_length, steps_per_block, mask_token_id, temperature,
                   use_cache, generator, suppress_token_ids, callback, repetition_penalty, allow_extrapolation)[0]


@torch.no_grad()
def generate_blocks_batch(model, prompts: Sequence[Sequence[int]], *, mask_token_id: int, gen_length: int,
                          block_length: int, steps_per_block: int, temperature: float = 0.0,
                          generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
                          batch_size: int | None = None, use_cache: bool = True,
                          suppress_token_ids: Sequence[int] = (),
                          callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                          progress: Callable[[int], None] | None = None, repetition_penalty: float = 1.0,
                          allow_extrapolation: bool = False) -> GenerationResult:
    """:func:`generate_blocks` for prompts of different lengths, in batches.

    Prompts are grouped by length, and each group (split into chunks of at most ``batch_size`` rows) goes
    through one :func:`generate_blocks` call. Equal lengths need no padding, and the block grid counted from
    position 0 is the same for every row of a call, so every row is decoded exactly as if alone: at
    temperature 0, or with ``seeds``, a prompt's tokens do not depend on ``batch_size`` nor on which other
    prompts share the call (up to floating-point differences between batched kernels of different sizes). Only
    prompts of the same length share forwards, so many distinct lengths mean many small calls.

    Args:
        model: :class:`llada_scale.model.transformer.Transformer` trained with block diffusion.
        prompts: token-id lists (may differ in length; may be empty; no mask tokens).
        mask_token_id, gen_length, block_length, steps_per_block, temperature, use_cache, suppress_token_ids,
            repetition_penalty, allow_extrapolation: as in :func:`generate_blocks`.
        generator: one ``torch.Generator`` (on the model's device) shared by every call, used when ``seeds``
            is None; the draws then depend on the grouping (temperature > 0 only).
        seeds: one seed per prompt: prompt i samples from its own ``torch.Generator`` seeded with ``seeds[i]``
            on the model's device, so its tokens do not depend on the batching at any temperature.
        batch_size: rows per call at most (None = a whole length group per call).
        callback: passed to each :func:`generate_blocks` call (its ``step`` and rows are those of the call).
        progress: called with the number of prompts finished after every call.
    Returns:
        :class:`llada_scale.sampling.common.GenerationResult`: ``tokens[i]`` = the ``gen_length`` generated ids of
        ``prompts[i]`` (input order, prompt excluded; use :func:`llada_scale.sampling.common.truncate_at` to cut at
        eos); ``nfe`` = model forwards over all calls - with the cache one per denoising step, plus one per
        complete prompt block (prefill) and one per finished block but the last (appending it to the cache),
        each over one block of positions; without the cache one per denoising step over ``2 (P +
        gen_length)`` positions; ``steps`` = denoising steps over all calls; ``extra`` = ``{"prefill",
        "denoise", "append"}`` forward counts, ``"calls"`` and ``"groups"`` (distinct prompt lengths).
    Raises:
        ValueError: empty prompt list, a prompt that is not a list of ints, ``seeds`` of the wrong length,
            ``batch_size < 1``, or anything :func:`generate_blocks` rejects.
    """
    t0 = time.perf_counter()
    rows = check_prompts(prompts)
    if seeds is not None and len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} seeds for {len(rows)} prompts")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    out: list[list[int] | None] = [None] * len(rows)
    totals = {"prefill": 0, "denoise": 0, "append": 0}
    calls = 0
    for chunk, ids in length_batches(rows, batch_size, device):
        gen = generator if seeds is None else [torch.Generator(device=device).manual_seed(int(seeds[i]))
                                               for i in chunk]
        x, counts = _decode(model, ids, gen_length, block_length, steps_per_block, mask_token_id, temperature,
                            use_cache, gen, suppress_token_ids, callback, repetition_penalty, allow_extrapolation)
        for j, i in enumerate(x[:, ids.shape[1]:].tolist()):
            out[chunk[j]] = i
        for k in totals:
            totals[k] += counts[k]
        calls += 1
        if progress is not None:
            progress(len(chunk))
    groups = len({len(r) for r in rows})
    return GenerationResult(tokens=out, nfe=sum(totals.values()), seconds=time.perf_counter() - t0,
                            steps=totals["denoise"], extra={**totals, "calls": calls, "groups": groups})
