"""Shared pieces of every sampler: left padding of prompt batches, model calls that build the right attention
mask and project only the rows that are needed, rank lockstep for ZeRO-3, Gumbel-max sampling, the result type.

Batching: prompts of different lengths are **left padded**. Pad positions get document id 0 and the real
tokens id 1, and position ids start at 0 at the first real token, so (with our ``Transformer``'s document
masks) pads never influence real tokens and every row's result is independent of the other rows and of
the batch size. Our ``Transformer`` (or a DeepSpeed engine wrapping it) is called with a dense SDPA mask built
from those document ids (``attention_mask=``; avoids FlexAttention recompiling for every new length on CUDA);
any other model is called as ``model(input_ids, position_ids=..., document_ids=...)``. It must return logits
``[B, L, V]`` (or an object with ``.logits``).

ZeRO-3: every rank must run the same number of forward passes (each forward gathers parameters with
collectives). Data-dependent loops (threshold decoding, AR early stop at eos, likelihoods over different
numbers of rows) pass ``sync_ranks=True``: :func:`any_global` / :func:`max_global` keep ranks in lockstep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["GenerationResult", "left_pad", "truncate_at", "add_gumbel_noise", "apply_repetition_penalty", "call_model",
           "selected_logits", "range_logits", "any_global", "max_global", "check_prompts", "check_length",
           "check_generator", "model_device", "pad_id_for", "length_batches"]


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


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def our_config(model):
    """The ModelConfig of our Transformer (or of a DeepSpeed engine wrapping one), else None."""
    from llada_scale.model.transformer import ModelConfig

    for m in (model, getattr(model, "module", None)):
        cfg = getattr(m, "config", None)
        if isinstance(cfg, ModelConfig):
            return cfg
    return None


def mask_kwargs(model, doc: torch.Tensor) -> dict:
    """Attention arguments for a left-padded batch.

    For our Transformer a dense SDPA mask is built here (``attention.build_mask(..., backend="sdpa")``): with
    the CUDA default (FlexAttention) every new sequence length would otherwise trigger a recompilation, and
    generation changes lengths constantly. Other models get ``document_ids``.
    """
    cfg = our_config(model)
    if cfg is None:
        return {"document_ids": doc}
    from llada_scale.model import attention

    b, l = doc.shape
    return {"attention_mask": attention.build_mask(doc, causal=cfg.causal, q_len=l, kv_len=l, batch_size=b,
                                                   device=doc.device, backend="sdpa")}


def call_model(model, x: torch.Tensor, pos: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    out = model(x, position_ids=pos, **mask_kwargs(model, doc))
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def fast_path(model) -> bool:
    """Our plain Transformer with ordinary (not ZeRO-partitioned) weights: project only needed rows."""
    from llada_scale.model.transformer import Transformer

    if type(model) is not Transformer:
        return False
    p = next(model.parameters(), None)
    return p is not None and not hasattr(p, "ds_id")


def selected_logits(model, x, pos, doc, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """float32 logits [N, V] at (rows[i], cols[i]) only (saves the [B, L, V] tensor on our Transformer)."""
    if fast_path(model):
        h = model.hidden_states(x, position_ids=pos, **mask_kwargs(model, doc))
        return F.linear(h[rows, cols], model.output_weight()).float()
    return call_model(model, x, pos, doc)[rows, cols].float()


def range_logits(model, x, pos, doc, start: int, end: int) -> torch.Tensor:
    """float32 logits [B, end - start, V] of positions start..end-1 only (our Transformer: the head is
    applied to those rows only)."""
    if fast_path(model):
        h = model.hidden_states(x, position_ids=pos, **mask_kwargs(model, doc))
        return F.linear(h[:, start:end], model.output_weight()).float()
    return call_model(model, x, pos, doc)[:, start:end].float()


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def any_global(flag: bool, sync: bool, device) -> bool:
    """``flag`` OR-ed over all ranks when ``sync`` (one all-reduce), else ``flag``."""
    if not (sync and dist_ready()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def max_global(n: int, sync: bool, device) -> int:
    if not (sync and dist_ready()):
        return n
    t = torch.tensor([n], device=device, dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def check_prompts(prompts, name="prompts", allow_empty=True) -> list[list[int]]:
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


def length_batches(rows: Sequence[Sequence[int]], batch_size: int | None,
                   device) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Prompts grouped by length, no padding (each row decodes as if alone): yields ``(indices, ids)`` per batch,
    groups shortest first, input order within a group, at most ``batch_size`` rows per batch (None or 0 = a
    whole group); ``ids`` int64 [len(indices), length] on ``device``. The caller validates ``batch_size``."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(len(r), []).append(i)
    for length, idx in sorted(groups.items()):
        size = batch_size or len(idx)
        for c in range(0, len(idx), size):
            chunk = idx[c:c + size]
            yield chunk, torch.tensor([rows[i] for i in chunk], dtype=torch.long, device=device).view(len(chunk),
                                                                                                       length)


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


def check_generator(generator, device) -> None:
    """Raise ValueError when ``generator`` (a ``torch.Generator``, a sequence of them, or None) is not on
    ``device``: random draws on a CUDA tensor need a CUDA generator (with temperature > 0 or random remasking a
    CPU generator fails deep inside ``torch.rand``)."""
    device = torch.device(device)
    for g in generator if isinstance(generator, (list, tuple)) else [generator]:
        if g is not None and g.device.type != device.type:
            raise ValueError(f"the sampling generator is on {g.device} but the model is on {device}: create it "
                             f"with torch.Generator(device=...) on the model's device")


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


def apply_repetition_penalty(logits: torch.Tensor, context_ids: torch.Tensor, penalty: float,
                             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Penalise every token id that already occurs in a row (the repetition penalty of CTRL, Keskar et al. 2019,
    arXiv:1909.05858 Sec. 4.1, in the form of transformers' ``RepetitionPenaltyLogitsProcessor``): a positive
    logit is divided by ``penalty``, a negative one multiplied by it, so ``penalty > 1`` makes repeats less
    likely whatever the logit's sign. Nano-LLaDA's sampler penalises repeats the same way.

    Args:
        logits: float [B, V] or [B, n, V] (row b's penalty applies to all its n positions).
        context_ids: int64 [B, L] tokens of each row so far (prompt and generated).
        penalty: > 0; 1.0 returns ``logits`` itself (off).
        valid: bool [B, L], True at the positions to count (e.g. not the mask token, not left padding);
            None counts all.
    Returns:
        a new tensor shaped like ``logits`` (``logits`` itself when ``penalty == 1``).
    Raises:
        ValueError: ``penalty <= 0``.
    """
    if penalty == 1.0:
        return logits
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
    b, v = logits.shape[0], logits.shape[-1]
    ids = context_ids.clamp(0, v - 1)
    if valid is not None:
        ids = torch.where(valid, ids, v)  # column v is a sink for positions that do not count
    seen = torch.zeros(b, v + 1, dtype=torch.bool, device=logits.device).scatter_(1, ids.to(logits.device), True)
    seen = seen[:, :v] if logits.dim() == 2 else seen[:, None, :v]
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def check_length(model, length: int, allow_extrapolation: bool, what: str) -> None:
    """Refuse sequences longer than the model's ``max_seq_len`` (our Transformer; other models unchecked).

    RoPE models run past their trained context but their outputs degrade silently; ``allow_extrapolation``
    (CLI ``--allow_extrapolation``) says the caller wants that anyway.

    Raises:
        ValueError: one line naming ``what`` (e.g. ``"prompt (3600 tokens) + gen_length 4096"``), the length
            and the limit.
    """
    cfg = our_config(model)
    if cfg is None or allow_extrapolation or length <= cfg.max_seq_len:
        return
    raise ValueError(f"{what} = {length} positions exceed the model's max_seq_len {cfg.max_seq_len}; shorten them "
                     "or allow extrapolation beyond the trained context (allow_extrapolation=True, "
                     "--allow_extrapolation)")


def pad_id_for(mask_token_id: int, pad_token_id: int | None) -> int:
    if pad_token_id is None:
        return 0 if mask_token_id != 0 else 1
    if pad_token_id == mask_token_id:
        raise ValueError(f"pad_token_id must differ from mask_token_id ({mask_token_id})")
    return pad_token_id
