"""Batched sampling and likelihoods for masked-diffusion (LLaDA) and autoregressive models.

* :func:`diffusion_generate` - LLaDA's semi-autoregressive block sampler with low-confidence / random
  remasking, Gumbel-max temperature sampling, classifier-free guidance (ML-GSAI/LLaDA ``generate.py``) and
  Fast-dLLM confidence-threshold parallel decoding (NVlabs/Fast-dLLM ``generate.py``,
  ``get_transfer_index`` with ``threshold``).
* :func:`ar_generate` - greedy / temperature sampling for causal models (full recompute, no KV cache).
* :func:`log_likelihood` / :func:`log_likelihood_batch` - exact chain rule for AR models and LLaDA's
  Monte Carlo estimate (LLaDA paper eq. 6 and Appendix B.5; ML-GSAI/LLaDA ``get_log_likelihood.py``) for
  diffusion models.

Batching: prompts of different lengths are **left padded**. Pad positions get document id 0 and the real
tokens id 1, and position ids start at 0 at the first real token, so (with our ``Transformer``'s document
masks) pads never influence real tokens and every row's result is independent of the other rows and of
the batch size. Our ``Transformer`` (or a DeepSpeed engine wrapping it) is called with a dense SDPA mask built
from those document ids (``attention_mask=``; avoids FlexAttention recompiling for every new length on CUDA);
any other model is called as ``model(input_ids, position_ids=..., document_ids=...)``. It must return logits
``[B, L, V]`` (or an object with ``.logits``).

ZeRO-3: every rank must run the same number of forward passes (each forward gathers parameters with
collectives). Fixed-step diffusion sampling runs ``steps`` forwards per call (x2 with CFG, as one batched
call) whatever the prompts, so it is safe when every rank uses the same settings. Data-dependent loops -
threshold decoding, AR early stop at eos, and likelihoods over different numbers of rows - must pass
``sync_ranks=True`` (an all-reduce per step keeps ranks in lockstep; likelihood functions pad the number
of batches to the maximum over ranks).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "GenerationResult", "diffusion_generate", "ar_generate", "log_likelihood", "log_likelihood_batch",
    "get_num_transfer_tokens", "add_gumbel_noise", "left_pad", "truncate_at",
]


@dataclass
class GenerationResult:
    """Output of :func:`diffusion_generate` / :func:`ar_generate`.

    Attributes:
        tokens: per prompt, the generated token ids only (prompt excluded). Diffusion: exactly
            ``gen_length`` ids (use :func:`truncate_at` to cut at eos). AR: up to ``max_new_tokens`` ids,
            ending with ``eos_token_id`` when it was produced.
        nfe: number of network function evaluations (model forward calls over the whole batch; a CFG
            step counts 2: conditional + unconditional).
        seconds: wall-clock time of the call.
        steps: number of denoising / decoding iterations.
    """

    tokens: list[list[int]]
    nfe: int
    seconds: float
    steps: int = 0
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ helpers
def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _our_config(model):
    """The ModelConfig of our Transformer (or of a DeepSpeed engine wrapping one), else None."""
    from llada_scale.model import ModelConfig

    for m in (model, getattr(model, "module", None)):
        cfg = getattr(m, "config", None)
        if isinstance(cfg, ModelConfig):
            return cfg
    return None


def _mask_kwargs(model, doc: torch.Tensor) -> dict:
    """Attention arguments for a left-padded batch.

    For our Transformer a dense SDPA mask is built here (``attention.build_mask(..., backend="sdpa")``): with
    the CUDA default (FlexAttention) every new sequence length would otherwise trigger a recompilation, and
    generation changes lengths constantly. Other models get ``document_ids``.
    """
    cfg = _our_config(model)
    if cfg is None:
        return {"document_ids": doc}
    from llada_scale import attention

    b, l = doc.shape
    return {"attention_mask": attention.build_mask(doc, causal=cfg.causal, q_len=l, kv_len=l, batch_size=b,
                                                   device=doc.device, backend="sdpa")}


def _call(model, x: torch.Tensor, pos: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    out = model(x, position_ids=pos, **_mask_kwargs(model, doc))
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def _fast_path(model) -> bool:
    """Our plain Transformer with ordinary (not ZeRO-partitioned) weights: project only needed rows."""
    from llada_scale.model import Transformer

    if type(model) is not Transformer:
        return False
    p = next(model.parameters(), None)
    return p is not None and not hasattr(p, "ds_id")


def _selected_logits(model, x, pos, doc, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """float32 logits [N, V] at (rows[i], cols[i]) only (saves the [B, L, V] tensor on our Transformer)."""
    if _fast_path(model):
        h = model.hidden_states(x, position_ids=pos, **_mask_kwargs(model, doc))
        return F.linear(h[rows, cols], model.output_weight()).float()
    return _call(model, x, pos, doc)[rows, cols].float()


def _range_logits(model, x, pos, doc, start: int, end: int) -> torch.Tensor:
    """float32 logits [B, end - start, V] of positions start..end-1 only (our Transformer: the head is
    applied to those rows only)."""
    if _fast_path(model):
        h = model.hidden_states(x, position_ids=pos, **_mask_kwargs(model, doc))
        return F.linear(h[:, start:end], model.output_weight()).float()
    return _call(model, x, pos, doc)[:, start:end].float()


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _any_global(flag: bool, sync: bool, device) -> bool:
    """``flag`` OR-ed over all ranks when ``sync`` (one all-reduce), else ``flag``."""
    if not (sync and _dist_ready()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _max_global(n: int, sync: bool, device) -> int:
    if not (sync and _dist_ready()):
        return n
    t = torch.tensor([n], device=device, dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _check_prompts(prompts, name="prompts", allow_empty=True) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name} must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if torch.is_tensor(p):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ValueError(f"{name}[{i}] must be a list of ints")
        if not allow_empty and not p:
            raise ValueError(f"{name}[{i}] is empty; AR decoding needs at least one context token (e.g. bos)")
        out.append(list(p))
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, extra: int = 0, fill_id: int | None = None,
             device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad ``seqs`` to a common length and append ``extra`` positions filled with ``fill_id``.

    Args:
        seqs: B token-id lists (may be empty).
        pad_id: id written into pad positions (never attended to by real tokens).
        extra: number of positions appended after every sequence (e.g. the masked generation area).
        fill_id: id of the appended positions (required when ``extra > 0``).

    Returns:
        ``(input_ids, position_ids, document_ids)``, each int64 [B, P + extra] with P the longest
        sequence: pads have document id 0 and position 0, real and appended positions document id 1 and
        positions 0, 1, 2, ... counted from the row's first real token.
    """
    b = len(seqs)
    p = max((len(s) for s in seqs), default=0)
    total = p + extra
    x = torch.full((b, total), pad_id, dtype=torch.long)
    doc = torch.zeros((b, total), dtype=torch.long)
    pos = torch.zeros((b, total), dtype=torch.long)
    for i, s in enumerate(seqs):
        start = p - len(s)
        if s:
            x[i, start:p] = torch.tensor(list(s), dtype=torch.long)
        if extra:
            x[i, p:] = fill_id
        doc[i, start:] = 1
        pos[i, start:] = torch.arange(total - start)
    return x.to(device), pos.to(device), doc.to(device)


def truncate_at(tokens: Sequence[int], stop_ids: int | Sequence[int] | None, include: bool = False) -> list[int]:
    """``tokens`` cut at the first id in ``stop_ids`` (kept when ``include``); unchanged if none occurs."""
    if stop_ids is None:
        return list(tokens)
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return list(tokens[: i + 1 if include else i])
    return list(tokens)


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


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Gumbel-max perturbation in float64 so that ``argmax`` samples ``softmax(logits / temperature)``.

    LLaDA ``generate.py: add_gumbel_noise`` computes ``exp(logits) / (-log u)^T`` in float64 (low precision
    Gumbel noise hurts generation quality, LLaDA issue notes); we return its logarithm divided by T,
    ``logits / T - log(-log u)``, which has the same argmax and cannot overflow.

    Args:
        logits: [..., V] any float dtype.
        temperature: 0 returns ``logits`` unchanged (greedy).
        generator: torch.Generator on the logits' device, for reproducible noise.
    Returns:
        float64 tensor shaped like ``logits`` (or ``logits`` itself when temperature == 0).
    """
    if temperature == 0:
        return logits
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.to(torch.float64) / temperature - torch.log(-torch.log(u))


def _pad_id(mask_token_id: int, pad_token_id: int | None) -> int:
    if pad_token_id is None:
        return 0 if mask_token_id != 0 else 1
    if pad_token_id == mask_token_id:
        raise ValueError(f"pad_token_id must differ from mask_token_id ({mask_token_id})")
    return pad_token_id


# ------------------------------------------------------------------------------------------ diffusion
@torch.no_grad()
def diffusion_generate(model, prompts: list[list[int]], *, mask_token_id: int, gen_length: int = 64,
                       block_length: int = 32, steps: int = 32, temperature: float = 0.0,
                       remasking: str = "low_confidence", threshold: float | None = None, cfg_scale: float = 0.0,
                       generator: torch.Generator | None = None, pad_token_id: int | None = None,
                       suppress_token_ids: Sequence[int] = (),
                       callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                       sync_ranks: bool = False) -> GenerationResult:
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

    Returns:
        :class:`GenerationResult` with ``tokens`` = B lists of ``gen_length`` ids (no masks remain), nfe and
        wall time. At temperature 0 with low-confidence remasking the tokens of a prompt do not depend on
        the other prompts in the batch or on the batch size.

    Raises:
        ValueError: bad prompts, non-divisible lengths/steps, unknown remasking, threshold outside (0, 1),
            negative temperature or cfg_scale, pad id equal to the mask id.
    """
    prompts = _check_prompts(prompts)
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
    t0 = time.perf_counter()
    device = _device(model)
    pad = _pad_id(mask_token_id, pad_token_id)
    x, pos, doc = left_pad(prompts, pad, extra=gen_length, fill_id=mask_token_id, device=device)
    b, total = x.shape
    p = total - gen_length
    prompt_real = torch.zeros_like(x, dtype=torch.bool)
    prompt_real[:, :p] = doc[:, :p] == 1
    banned = torch.tensor(sorted({mask_token_id, *suppress_token_ids}), dtype=torch.long, device=device)
    if cfg_scale > 0:
        un_x = x.clone()
        un_x[prompt_real] = mask_token_id
        pos2, doc2 = torch.cat([pos, pos]), torch.cat([doc, doc])
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
            elif not _any_global(bool(block_masked.any()), sync_ranks, device):
                break
            # Only the current block can be unmasked (LLaDA sets the confidence elsewhere to -inf), so only its
            # logits are needed; mask tokens inside a prompt stay masked.
            if cfg_scale > 0:
                un_x[:, p:] = x[:, p:]
                logits = _range_logits(model, torch.cat([x, un_x]), pos2, doc2, s, e)
                cond, uncond = logits[:b], logits[b:]
                logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
                nfe += 2
            else:
                logits = _range_logits(model, x, pos, doc, s, e)
                nfe += 1
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
            transfer = torch.zeros_like(x, dtype=torch.bool)
            transfer[:, s:e] = t_blk
            if callback is not None:
                callback(step, x[:, p:].clone(), transfer[:, p:].clone())
            step += 1
            i += 1
    tokens = x[:, p:].tolist()
    return GenerationResult(tokens=tokens, nfe=nfe, seconds=time.perf_counter() - t0, steps=step)


# ------------------------------------------------------------------------------------------ autoregressive
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
    prompts = _check_prompts(prompts, allow_empty=False)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    t0 = time.perf_counter()
    device = _device(model)
    x, pos, doc = left_pad(prompts, pad_token_id, device=device)
    b = x.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    banned = torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)
    nfe = 0
    for _ in range(max_new_tokens):
        last = torch.full((b,), x.shape[1] - 1, device=device)
        logits = _selected_logits(model, x, pos, doc, rows, last)
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
        if not _any_global(not bool(done.all()), sync_ranks, device):
            break
    return GenerationResult(tokens=out, nfe=nfe, seconds=time.perf_counter() - t0, steps=nfe)


# ------------------------------------------------------------------------------------------ likelihood
def _check_pairs(pairs) -> list[tuple[list[int], list[int]]]:
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("pairs must be a non-empty list of (prompt, answer) token-id lists")
    out = []
    for i, pa in enumerate(pairs):
        if not isinstance(pa, (list, tuple)) or len(pa) != 2:
            raise ValueError(f"pairs[{i}] must be a (prompt, answer) pair")
        prompt, answer = _check_prompts([pa[0]], f"pairs[{i}].prompt")[0], _check_prompts([pa[1]], f"pairs[{i}].answer")[0]
        if not answer:
            raise ValueError(f"pairs[{i}] has an empty answer")
        out.append((prompt, answer))
    return out


def _stratified_counts(n: int, length: int, generator: torch.Generator | None) -> list[int]:
    """n mask counts in 1..length, stratified: l_i = floor((i + u) * length / n) + 1 with one u ~ U[0, 1).

    Each l is drawn equally often up to rounding, and the average of any f(l_i) is an unbiased estimate
    of mean_l f(l) (LLaDA ``get_log_likelihood.py: forward_process`` spreads the counts of a batch the same
    way with ``linspace``).
    """
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return [min(length, int((i + u) * length / n) + 1) for i in range(n)]


@torch.no_grad()
def log_likelihood_batch(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, causal: bool,
                         mask_token_id: int | None = None, mc_samples: int = 128, batch_size: int = 32,
                         generator: torch.Generator | None = None, pad_token_id: int | None = None,
                         progress: bool = False, sync_ranks: bool = False,
                         pair_seeds: Sequence[int] | None = None) -> list[float]:
    """log p(answer | prompt) in nats for many (prompt, answer) pairs - exact (AR) or a Monte Carlo bound
    (diffusion).

    AR (``causal=True``): the chain rule ``sum_i log p(a_i | prompt, a_<i)`` from one forward of
    ``prompt + answer`` per pair (``batch_size`` pairs per forward). The prompt must be non-empty.

    Diffusion (``causal=False``): LLaDA's estimator (paper eq. 6 / Appendix B.5; reference
    ``get_log_likelihood.py``). For each of ``mc_samples`` samples a number l of answer tokens (1..L,
    L = len(answer)) is drawn uniformly - stratified over the samples (:func:`_stratified_counts`) - l
    answer positions chosen uniformly without replacement are replaced by the mask token (prompt kept),
    and the sample's value is ``(L / l) * sum_{masked i} log p_theta(a_i | masked sequence)``. The
    estimate is the mean over samples: an unbiased estimate of the ELBO, a lower bound on
    log p(answer | prompt). Rows of all pairs are packed into forwards of ``batch_size`` rows.

    ZeRO-3: the number of forwards is ``ceil(rows / batch_size)``, which differs between ranks holding
    different data - pass ``sync_ranks=True``.

    Args:
        model: the model (logits float32-cast before log_softmax).
        pairs: (prompt ids, answer ids); answers non-empty.
        causal: True for AR models, False for mask predictors.
        mask_token_id: required when ``causal`` is False.
        mc_samples: Monte Carlo samples per pair (diffusion), >= 1.
        batch_size: rows per forward, >= 1.
        generator: torch.Generator (CPU) for masks and counts, for reproducibility.
        pad_token_id: left-padding id (default 0 / 1 if the mask id is 0).
        progress: tqdm bar over forwards.
        sync_ranks: pad the number of forwards to the maximum over ranks (ZeRO-3; extra forwards are
            discarded).
        pair_seeds: one seed per pair; pair j then draws its counts and masks from its own
            ``torch.Generator().manual_seed(pair_seeds[j])`` (ignoring ``generator``), so its estimate does not
            depend on which other pairs share the call (e.g. how examples are sharded over ranks).

    Returns:
        One float per pair (nats; <= 0 for AR).

    Raises:
        ValueError: bad pairs, empty prompt with ``causal``, missing mask id, mc_samples/batch_size < 1.
    """
    from tqdm.auto import tqdm

    pairs = _check_pairs(pairs)
    if batch_size < 1 or mc_samples < 1:
        raise ValueError(f"batch_size and mc_samples must be >= 1 (got {batch_size}, {mc_samples})")
    device = _device(model)
    # rows: (pair index, token ids, positions to score (index into ids), weight)
    rows: list[tuple[int, list[int], list[int], list[int], float]] = []
    if causal:
        for j, (prompt, answer) in enumerate(pairs):
            if not prompt:
                raise ValueError(f"pairs[{j}] has an empty prompt; AR scoring needs a context token (e.g. bos)")
            ids = prompt + answer
            cols = list(range(len(prompt) - 1, len(ids) - 1))
            rows.append((j, ids, cols, answer, 1.0))
        pad = 0 if pad_token_id is None else pad_token_id
    else:
        if mask_token_id is None:
            raise ValueError("mask_token_id is required for diffusion (causal=False) likelihoods")
        pad = _pad_id(mask_token_id, pad_token_id)
        if pair_seeds is not None and len(pair_seeds) != len(pairs):
            raise ValueError(f"pair_seeds has {len(pair_seeds)} entries for {len(pairs)} pairs")
        for j, (prompt, answer) in enumerate(pairs):
            n = len(answer)
            g = torch.Generator().manual_seed(int(pair_seeds[j])) if pair_seeds is not None else generator
            for l in _stratified_counts(mc_samples, n, g):
                chosen = torch.randperm(n, generator=g)[:l].sort().values.tolist()
                ids = prompt + answer
                for c in chosen:
                    ids[len(prompt) + c] = mask_token_id
                rows.append((j, ids, [len(prompt) + c for c in chosen], [answer[c] for c in chosen], n / l))
    totals = [0.0] * len(pairs)
    n_batches = math.ceil(len(rows) / batch_size)
    n_run = _max_global(n_batches, sync_ranks, device)
    for bi in tqdm(range(n_run), desc="log-likelihood", unit="fwd", disable=not progress, leave=False):
        chunk = rows[bi * batch_size:(bi + 1) * batch_size]
        if not chunk:  # padding forward so every rank runs the same number (ZeRO-3)
            chunk, dummy = rows[:1] or [(0, [pad], [0], [pad], 0.0)], True
        else:
            dummy = False
        x, pos, doc = left_pad([r[1] for r in chunk], pad, device=device)
        width = x.shape[1]
        rr, cc, tt = [], [], []
        for i, (_, ids, cols, targets, _) in enumerate(chunk):
            off = width - len(ids)
            rr += [i] * len(cols)
            cc += [off + c for c in cols]
            tt += targets
        rr_t = torch.tensor(rr, device=device)
        logits = _selected_logits(model, x, pos, doc, rr_t, torch.tensor(cc, device=device))
        lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, torch.tensor(tt, device=device)[:, None])[:, 0]
        if dummy:
            continue
        per_row = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, rr_t, lp).tolist()
        for i, (j, _, _, _, w) in enumerate(chunk):
            totals[j] += w * per_row[i]
    if not causal:
        totals = [t / mc_samples for t in totals]
    return totals


def log_likelihood(model, prompt: list[int], answer: list[int], *, mask_token_id: int | None = None,
                   causal: bool, mc_samples: int = 128, batch_size: int = 32,
                   generator: torch.Generator | None = None, pad_token_id: int | None = None,
                   sync_ranks: bool = False) -> float:
    """log p(answer | prompt) in nats for one pair: exact chain rule (AR) or LLaDA's Monte Carlo ELBO
    estimate (diffusion, LLaDA eq. 6; ``get_log_likelihood.py``). See :func:`log_likelihood_batch` for the
    estimator, arguments and errors; here ``batch_size`` rows of the ``mc_samples`` Monte Carlo samples
    go through each forward (``ceil(mc_samples / batch_size)`` forwards; AR: one forward).
    """
    return log_likelihood_batch(model, [(prompt, answer)], causal=causal, mask_token_id=mask_token_id,
                                mc_samples=mc_samples, batch_size=batch_size, generator=generator,
                                pad_token_id=pad_token_id, sync_ranks=sync_ranks)[0]
