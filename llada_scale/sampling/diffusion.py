"""LLaDA reverse-process sampling: semi-autoregressive blocks with low-confidence / random remasking,
Gumbel-max temperature sampling and classifier-free guidance (ML-GSAI/LLaDA ``generate.py``), and Fast-dLLM
confidence-threshold parallel decoding (NVlabs/Fast-dLLM ``generate.py``, ``get_transfer_index`` with
``threshold``) and its approximate prefix / dual KV caches (Fast-dLLM v1, arXiv:2505.22618 Sec. 3.2;
``generate_with_prefix_cache`` / ``generate_with_dual_cache``).

KV caches (``cache=``): a masked-diffusion model attends bidirectionally, so the keys and values of *every*
position change whenever any token is unmasked - no cache is exact. Fast-dLLM's observation is that within a
block they change little. At the first step of each block one full forward computes every position (exactly
as without a cache) and stores all keys/values; the following steps of that block recompute only

* ``"prefix"``: the current block and everything after it, attending to the stored keys/values of the
  prefix (prompt + finished blocks);
* ``"dual"``: the current block only, attending to the stored prefix *and* suffix (the still-masked later
  blocks).

What is approximated: the prefix (and, for ``dual``, the suffix) keys/values are those of the block's first
step, so they do not see the tokens committed in the current block since then. The first step of every block
is exact, and so is every step of a block decoded in one step. The default ``cache=None`` recomputes the
whole sequence every step (LLaDA's reference).

ZeRO-3: fixed-step sampling runs ``steps`` forwards per call (x2 with CFG, as one batched call) whatever the
prompts, so it is safe when every rank uses the same settings; threshold decoding needs ``sync_ranks=True``
(see :mod:`llada_scale.sampling.common`).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

from llada_scale.sampling.common import (GenerationResult, add_gumbel_noise, any_global, apply_repetition_penalty,
                                         check_generator, check_length, check_prompts, left_pad, model_device,
                                         pad_id_for, range_logits)
from llada_scale.sampling.kv_cache import KVCache, cached_hidden, key_mask, lm_head, rope_tables

CACHES = (None, "prefix", "dual")

__all__ = ["CACHES", "diffusion_generate", "get_num_transfer_tokens"]


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens to unmask at each of ``steps`` steps (LLaDA ``generate.py: get_num_transfer_tokens``).

    The linear noise schedule of LLaDA (eq. 8 / Appendix B.2) unmasks the same expected number per step:
    ``n // steps`` each, the first ``n % steps`` steps one more.

    Args:
        mask_index: bool [B, L], True where still masked (one block).
        steps: int >= 1.
    Returns:
        int64 [B, steps]; each row sums to the row's mask count.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = mask_index.sum(dim=1, keepdim=True)
    base = n // steps
    rem = n % steps
    out = base.expand(-1, steps).clone()
    out += (torch.arange(steps, device=mask_index.device)[None, :] < rem).long()
    return out


@torch.no_grad()
def diffusion_generate(model, prompts: list[list[int]], *, mask_token_id: int, gen_length: int = 64,
                       block_length: int = 32, steps: int = 32, temperature: float = 0.0,
                       remasking: str = "low_confidence", threshold: float | None = None, cfg_scale: float = 0.0,
                       generator: torch.Generator | None = None, pad_token_id: int | None = None,
                       suppress_token_ids: Sequence[int] = (),
                       callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                       sync_ranks: bool = False, cache: str | None = None, repetition_penalty: float = 1.0,
                       allow_extrapolation: bool = False) -> GenerationResult:
    """LLaDA reverse-process sampling for a batch of prompts (semi-autoregressive blocks).

    The answer area (``gen_length`` mask tokens after each prompt) is split into
    ``gen_length / block_length`` blocks decoded left to right (LLaDA paper Appendix B.3, "semi-autoregressive
    remasking"; reference ``generate.py: generate``). Fixed-step mode gives every block
    ``steps / num_blocks`` steps and unmasks :func:`get_num_transfer_tokens` tokens per step: at each step
    the model predicts every masked position (``x0 = argmax`` of Gumbel-perturbed logits when
    ``temperature > 0``), and the masked positions of the current block with the highest confidence
    (``remasking="low_confidence"``: softmax probability of the predicted token; ``"random"``: uniform
    random scores) are committed; the rest stay masked. Threshold mode (``threshold`` set, Fast-dLLM
    "confidence-aware parallel decoding", arXiv:2505.22618 Sec. 3.3) commits every masked token of the
    current block whose confidence is strictly above ``threshold`` and at least the single most
    confident one, until the block is done - so each block takes between 1 and ``block_length`` steps and
    ``steps`` is ignored (total steps <= ``gen_length``).

    Classifier-free guidance (LLaDA Appendix B.3 / eq. 16; reference ``generate.py``): with
    ``cfg_scale > 0`` the prompt tokens are replaced by mask tokens for an unconditional pass (one batched
    forward of 2B rows) and ``logits = uncond + (cfg_scale + 1) * (cond - uncond)``.

    The mask token and ``suppress_token_ids`` are never predicted (their logits are set to -inf).

    ZeRO-3: every rank must call this with the same ``gen_length``/``block_length``/``steps``/``cfg_scale``
    (fixed mode then runs exactly ``steps`` forwards whatever the prompts); threshold mode needs
    ``sync_ranks=True``.

    Args:
        model: our ``Transformer`` with ``causal=False`` (or anything with the same call signature).
        prompts: B lists of token ids (may differ in length; may be empty for unconditional samples).
            Mask tokens inside a prompt stay masked (only the generation area is decoded).
        mask_token_id: the mask token id.
        gen_length: tokens to generate per prompt; a multiple of ``block_length``.
        block_length: block size; ``steps`` must be a multiple of ``gen_length / block_length`` unless
            ``threshold`` is set.
        steps: total denoising steps (fixed mode).
        temperature: 0 = greedy argmax; > 0 Gumbel-max sampling in float64 (:func:`add_gumbel_noise`).
        remasking: ``"low_confidence"`` or ``"random"``.
        threshold: confidence in (0, 1) for threshold decoding, or None.
        cfg_scale: classifier-free guidance strength w >= 0 (0 = off, no extra forward).
        generator: torch.Generator for the Gumbel noise and random remasking.
        pad_token_id: id written into left padding (default 0, or 1 when the mask id is 0); never attended.
        suppress_token_ids: extra ids that must never be generated (e.g. vocab padding rows).
        callback: called after every step as ``callback(step, tokens, committed)`` with ``step`` the
            0-based global step, ``tokens`` int64 [B, gen_length] (mask id where still masked) and
            ``committed`` bool [B, gen_length] (positions unmasked at this step).
        sync_ranks: keep ranks in lockstep in threshold mode (all-reduce per step; needed under ZeRO-3).
        cache: None (exact, default), ``"prefix"`` or ``"dual"`` (Fast-dLLM's approximate KV caches, see the
            module docstring; our Transformer only). Usually combined with ``threshold``.
        repetition_penalty: HF-style penalty (> 0; 1 = off, the default) on every token already in the row:
            prompt and committed tokens (:func:`llada_scale.sampling.common.apply_repetition_penalty`).
        allow_extrapolation: run even when the longest prompt + ``gen_length`` exceeds the model's
            ``max_seq_len`` (otherwise refused).

    Returns:
        :class:`GenerationResult` with ``tokens`` = B lists of ``gen_length`` ids (no masks remain), nfe and
        wall time; ``extra = {"full_forwards", "cached_forwards"}`` (forwards over the whole sequence / over
        the block, or the block and suffix, with a cache). At temperature 0 with low-confidence remasking the
        tokens of a prompt do not depend on the other prompts in the batch or on the batch size (exactly in
        fp32, with or without a cache; in bf16 batched kernels of other shapes can round differently and flip
        a near-tie).

    Raises:
        ValueError: bad prompts, non-divisible lengths/steps, unknown remasking or cache, threshold outside
            (0, 1), negative temperature or cfg_scale, repetition_penalty <= 0, pad id equal to the mask id,
            prompt + gen_length beyond ``max_seq_len`` without ``allow_extrapolation``.
        TypeError: a cache with a model that is not our Transformer.
    """
    prompts = check_prompts(prompts)
    if gen_length < 1 or block_length < 1:
        raise ValueError(f"gen_length and block_length must be >= 1 (got {gen_length}, {block_length})")
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if threshold is None:
        if steps < num_blocks or steps % num_blocks:
            raise ValueError(f"steps {steps} must be a positive multiple of the number of blocks {num_blocks} "
                             f"(gen_length {gen_length} / block_length {block_length})")
    elif not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', not {remasking!r}")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature and cfg_scale must be >= 0 (got {temperature}, {cfg_scale})")
    if cache not in CACHES:
        raise ValueError(f"cache must be None, 'prefix' or 'dual', not {cache!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    t0 = time.perf_counter()
    device = model_device(model)
    check_generator(generator, device)
    pad = pad_id_for(mask_token_id, pad_token_id)
    x, pos, doc = left_pad(prompts, pad, extra=gen_length, fill_id=mask_token_id, device=device)
    b, total = x.shape
    p = total - gen_length
    check_length(model, total, allow_extrapolation, f"the longest prompt ({p} tokens) + gen_length {gen_length}")
    prompt_real = torch.zeros_like(x, dtype=torch.bool)
    prompt_real[:, :p] = doc[:, :p] == 1
    banned = torch.tensor(sorted({mask_token_id, *suppress_token_ids}), dtype=torch.long, device=device)
    un_x, pos_in, doc_in = None, pos, doc
    if cfg_scale > 0:
        un_x = x.clone()
        un_x[prompt_real] = mask_token_id
        pos_in, doc_in = torch.cat([pos, pos]), torch.cat([doc, doc])
    kv = None
    if cache is not None:
        kv = KVCache.for_model(model, doc_in.shape[0], total)
        keys_ok = key_mask(doc_in)
        cos, sin = rope_tables(model, pos_in)
    counts = {"full_forwards": 0, "cached_forwards": 0}
    nfe = 0
    step = 0
    steps_per_block = steps // num_blocks if threshold is None else block_length
    neg_inf = torch.tensor(-math.inf, device=device)

    for nb in range(num_blocks):
        s, e = p + nb * block_length, p + (nb + 1) * block_length
        if threshold is None:
            n_transfer = get_num_transfer_tokens(x[:, s:e] == mask_token_id, steps_per_block)
        i = 0
        while True:
            block_masked = x[:, s:e] == mask_token_id
            if threshold is None:
                if i >= steps_per_block:
                    break
            elif not any_global(bool(block_masked.any()), sync_ranks, device):
                break
            # Only the current block can be unmasked (LLaDA sets the confidence elsewhere to -inf), so only its
            # logits are needed; mask tokens inside a prompt stay masked.
            if un_x is not None:
                un_x[:, p:] = x[:, p:]
            x_in = x if un_x is None else torch.cat([x, un_x])
            if kv is None:
                logits = range_logits(model, x_in, pos_in, doc_in, s, e)
            elif i == 0:  # block start: one exact forward over everything refreshes the whole cache
                h = cached_hidden(model, x_in, pos_in, kv, 0, mask=keys_ok, store=True, rope=(cos, sin))
                logits = lm_head(model, h[:, s:e])
            else:  # the block (prefix: and the suffix) against the cached rest
                stop = total if cache == "prefix" else e
                h = cached_hidden(model, x_in[:, s:stop], pos_in[:, s:stop], kv, s, mask=keys_ok,
                                  rope=(cos[:, :, s:stop], sin[:, :, s:stop]))
                logits = lm_head(model, h[:, :e - s])
            counts["full_forwards" if kv is None or i == 0 else "cached_forwards"] += 1
            if un_x is not None:
                cond, uncond = logits[:b], logits[b:]
                logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
            nfe += 2 if un_x is not None else 1
            logits = apply_repetition_penalty(logits, x, repetition_penalty, (x != mask_token_id) & (doc == 1))
            logits[..., banned] = -math.inf
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)  # [B, block]
            if remasking == "low_confidence":
                probs = torch.softmax(logits, dim=-1)
                conf = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                conf = torch.rand(x0.shape, device=device, generator=generator, dtype=torch.float32)
            blk = x[:, s:e]
            x0 = torch.where(block_masked, x0, blk)
            conf = torch.where(block_masked, conf, neg_inf)
            if threshold is None:
                t_blk = torch.zeros_like(block_masked)
                for j in range(b):
                    k = int(n_transfer[j, i])
                    if k:
                        t_blk[j, torch.topk(conf[j], k=k).indices] = True
            else:
                t_blk = block_masked & (conf > threshold)
                need = block_masked.any(dim=1) & ~t_blk.any(dim=1)
                if need.any():
                    best = conf.argmax(dim=1)
                    t_blk[need.nonzero(as_tuple=True)[0], best[need]] = True
            x[:, s:e] = torch.where(t_blk, x0, blk)
            if callback is not None:
                transfer = torch.zeros_like(x, dtype=torch.bool)
                transfer[:, s:e] = t_blk
                callback(step, x[:, p:].clone(), transfer[:, p:].clone())
            step += 1
            i += 1
    tokens = x[:, p:].tolist()
    return GenerationResult(tokens=tokens, nfe=nfe, seconds=time.perf_counter() - t0, steps=step, extra=counts)
