"""LLaDA 2.1's editing decoder: threshold commits of masked positions plus token-to-token (T2T) edits of
committed ones, block by block, with an exact KV cache of finished blocks and rows that progress independently.

Semantics (those of the release's own ``generate()``, LLaDA2.1's ``modeling_llada21_moe.py``, read in
ZHZisZZ/dllm's copy and its ``pipelines/llada21/sampler.py``; not diffusers' ``LLaDA2Pipeline``, which reads
``editing_threshold=0.0`` differently). The sequence ``[prompt ; gen_length masks]`` is cut into blocks of
``block_length`` counted from position 0; the first block decoded is the one holding the prompt's last token
(``P // block_length``). Within a block every step runs the model on the block, which attends to all earlier
blocks and to the whole block (block-causal), draws a token x0 and its probability p at every block position
(argmax and its softmax probability at temperature 0; else a sample from the temperature / top-k / top-p
filtered distribution and its probability there), and then, per row:

* M2T: commits the masked positions with p > ``threshold``; when none passes, the single most confident one
  (so at least one per step while masks remain);
* T2T: rewrites the block's positions that were already committed before this step (never the prompt) where
  x0 differs from the current token and p > ``editing_threshold``. ``0.0`` edits every changed position;
  ``None`` turns editing off and a block ends when its last mask is committed (plain threshold decoding, no
  post steps; our extension: the release compares ``p > None`` and raises TypeError).
* Once a step starts with no mask left in the block, it is a post step: the row's block ends at the first
  post step that changes nothing, or when a post step would exceed ``max_post_steps`` (the release's
  ``post_steps > max_post_steps`` check at the top of the loop, so up to ``max_post_steps`` post forwards).

The release decodes one row with a full forward of ``[0, block end)`` every step. Here rows are batched: each
prompt is left-padded by whole blocks so that every row's first decoded block has the same index (the block
grid of each row is still counted from its own first token), padding is never attended to, and each row keeps
its own masks, post-step count and end flag: a row whose block ended waits (its tokens frozen) while the others
go on, so every row gets exactly its batch-size-1 result. With ``use_cache`` finished blocks are computed once
into a KV cache (exact: under the block-causal mask their keys and values never change) through
:func:`llada_scale.sampling.kv_cache.cached_hidden`; ``use_cache=False`` calls the model's plain forward with a
dense block-causal mask (any model with the ``model(input_ids, position_ids=, attention_mask=)`` interface).

Presets, named as LLaDA 2.1 publishes them: ``quality`` (threshold 0.7, editing_threshold 0.5,
max_post_steps 16) and ``speed`` (0.5, 0.0, 16). docs/EVAL.md says what each does.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from llada_scale.sampling.common import GenerationResult, check_length, check_prompts, model_device
from llada_scale.sampling.kv_cache import KVCache, cached_hidden, core_of, lm_head

PRESETS = {"quality": dict(threshold=0.7, editing_threshold=0.5, max_post_steps=16),
           "speed": dict(threshold=0.5, editing_threshold=0.0, max_post_steps=16)}

__all__ = ["PRESETS", "preset", "sample_tokens", "edit_generate"]


def preset(name: str) -> dict:
    """The ``threshold`` / ``editing_threshold`` / ``max_post_steps`` of a LLaDA 2.1 preset (``quality``,
    ``speed``). Raises ValueError for another name."""
    if name not in PRESETS:
        raise ValueError(f"unknown editing preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, generator=None, active: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and its probability at every position (LLaDA 2.1 ``_sample_with_temperature_topk_topp``).

    Temperature 0: argmax of ``logits`` and its softmax probability. Otherwise logits / temperature, top-k
    (keep the k largest), top-p (keep the smallest prefix of the sorted distribution whose mass reaches p,
    always the first token), softmax, one multinomial draw, and the drawn token's probability under that
    filtered distribution.

    Args:
        logits: float [B, n, V]; generator: one ``torch.Generator`` or a sequence of B (row i draws from its own).
        active: optional bool [B]: rows that draw; the others take the argmax and consume no random numbers
            (a row whose block has ended draws nothing, so its draws match its batch-size-1 run).
    Returns:
        (tokens int64 [B, n], probabilities float32 [B, n]).
    """
    logits = logits.float()
    if temperature == 0:
        probs = torch.softmax(logits, -1)
        tok = logits.argmax(-1)
        return tok, probs.gather(-1, tok[..., None])[..., 0]
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        srt, order = logits.sort(-1, descending=True)
        drop = srt.softmax(-1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -torch.inf)
    probs = torch.softmax(logits, -1)
    flat = probs.reshape(probs.shape[0], -1, probs.shape[-1])
    gens = generator if isinstance(generator, (list, tuple)) else [generator] * flat.shape[0]
    live = [True] * flat.shape[0] if active is None else active.tolist()
    tok = torch.stack([torch.multinomial(flat[i], 1, generator=gens[i])[:, 0] if live[i] else flat[i].argmax(-1)
                       for i in range(flat.shape[0])])
    tok = tok.view(probs.shape[:-1])
    return tok, probs.gather(-1, tok[..., None])[..., 0]


def _layout(prompts: list[list[int]], gen_length: int, bl: int, mask_id: int, device):
    """Canvas of a batch: rows left-padded by whole blocks so their first decoded blocks align.

    Returns (x, pos, valid, prompt_end, gen_start, first, row_blocks): x int64 [B, T] (pad = mask id, never
    attended), pos int64 [B, T] (0 at padding), valid bool [B, T], per row the canvas index after its prompt
    (``prompt_end``, = ``gen_start``), the common first decoded block and each row's last block + 1."""
    firsts = [len(p) // bl for p in prompts]
    first = max(firsts)
    pads = [(first - f) * bl for f in firsts]
    ends = [pad + -(-(len(p) + gen_length) // bl) * bl for pad, p in zip(pads, prompts)]
    total = max(ends)
    b = len(prompts)
    x = torch.full((b, total), mask_id, dtype=torch.long)
    pos = torch.zeros((b, total), dtype=torch.long)
    valid = torch.zeros((b, total), dtype=torch.bool)
    for i, (pad, p) in enumerate(zip(pads, prompts)):
        x[i, pad:pad + len(p)] = torch.tensor(p, dtype=torch.long)
        pos[i, pad:] = torch.arange(total - pad)
        valid[i, pad:] = True
    prompt_end = torch.tensor([pad + len(p) for pad, p in zip(pads, prompts)])
    return (x.to(device), pos.to(device), valid.to(device), prompt_end.to(device), first,
            torch.tensor([e // bl for e in ends], device=device))


def _block_causal(valid: torch.Tensor, bl: int, end: int) -> torch.Tensor:
    """bool [B, 1, end, end]: query i may attend key j when block(j) <= block(i) and j is not padding (a padding
    query also attends to itself, so no query row is empty)."""
    idx = torch.arange(end, device=valid.device)
    allowed = (idx[None, :] // bl <= idx[:, None] // bl)[None] & valid[:, None, :end]
    return (allowed | torch.eye(end, dtype=torch.bool, device=valid.device)[None])[:, None]


def _report(callback, step, x, commit, edit, s, prompt_end, gen_length):
    """Call ``callback(step, tokens, committed, edited)`` on each row's generated region ([B, gen_length])."""
    idx = (prompt_end[:, None] + torch.arange(gen_length, device=x.device)[None]).clamp(max=x.shape[1] - 1)
    full = torch.zeros(x.shape + (2,), dtype=torch.bool, device=x.device)
    full[:, s:s + commit.shape[1], 0], full[:, s:s + commit.shape[1], 1] = commit, edit
    flags = full.gather(1, idx[..., None].expand(-1, -1, 2))
    callback(step, x.gather(1, idx), flags[..., 0], flags[..., 1])


@torch.no_grad()
def _decode(model, prompts, gen_length, bl, mask_id, threshold, editing_threshold, max_post_steps, temperature,
            top_k, top_p, generator, banned, use_cache, eos_id, eos_early_stop, callback):
    device = model_device(model)
    x, pos, valid, prompt_end, first, row_blocks = _layout(prompts, gen_length, bl, mask_id, device)
    b, total = x.shape
    counts = {"prefill": 0, "denoise": 0, "append": 0, "edits": 0}
    edits = torch.zeros(b, dtype=torch.long, device=device)
    live_steps = torch.zeros(b, dtype=torch.long, device=device)  # the forwards a batch-size-1 run would make
    stopped = torch.zeros(b, dtype=torch.bool, device=device)  # eos_early_stop
    padded = not bool(valid.all())
    cache = KVCache.for_model(model, b, total) if use_cache else None
    if use_cache and first > 0:
        n = first * bl
        cached_hidden(model, x[:, :n], pos[:, :n], cache, 0, mask=_block_causal(valid, bl, n), store=True, kv_len=n)
        counts["prefill"] += 1
    for k in range(first, total // bl):
        s, e = k * bl, (k + 1) * bl
        in_prompt = torch.arange(s, e, device=device)[None] < prompt_end[:, None]
        done = (row_blocks <= k) | stopped
        post = torch.zeros(b, dtype=torch.long, device=device)
        key_ok = valid[:, None, None, :e] if padded else None
        while True:
            old = x[:, s:e].clone()
            is_mask = old == mask_id
            no_mask = ~is_mask.any(1)
            if editing_threshold is None:  # editing off: plain threshold decoding, no post steps
                done |= no_mask
            post += (no_mask & ~done).long()
            done |= post > max_post_steps
            if bool(done.all()):
                break
            if use_cache:
                logits = lm_head(model, cached_hidden(model, old, pos[:, s:e], cache, s, mask=key_ok, kv_len=e))
            else:
                logits = model(x[:, :e], position_ids=pos[:, :e], attention_mask=_block_causal(valid, bl, e))
                logits = logits[:, s:e].float()
            logits[..., banned] = -torch.inf
            tok, prob = sample_tokens(logits, temperature, top_k, top_p, generator, active=~done)
            conf = torch.where(is_mask, prob, -torch.inf)
            commit = is_mask & (conf > threshold)
            fallback = torch.zeros_like(commit).scatter_(1, conf.argmax(1, keepdim=True), True) & is_mask
            commit = torch.where(commit.any(1, keepdim=True), commit, fallback)
            edit = torch.zeros_like(commit)
            if editing_threshold is not None:
                edit = ~is_mask & ~in_prompt & (prob > editing_threshold) & (tok != old)
            live = ~done[:, None]
            commit, edit = commit & live, edit & live
            x[:, s:e] = torch.where(commit | edit, tok, old)
            edits += edit.sum(1)
            live_steps += (~done).long()
            counts["denoise"] += 1
            if callback is not None:
                _report(callback, counts["denoise"] - 1, x, commit, edit, s, prompt_end, gen_length)
            done |= no_mask & ~edit.any(1)
        if eos_early_stop and eos_id is not None:
            idx = torch.arange(e, device=device)[None]
            gen = (idx >= prompt_end[:, None]) & valid[:, :e]
            stopped |= ~((x[:, :e] == mask_id) & gen).any(1) & ((x[:, :e] == eos_id) & gen).any(1)
        if use_cache and e < total:
            cached_hidden(model, x[:, s:e], pos[:, s:e], cache, s, mask=key_ok, store=True, kv_len=e)
            counts["append"] += 1
    counts["edits"] = int(edits.sum())
    out = []
    for i in range(b):
        row = x[i, int(prompt_end[i]):int(prompt_end[i]) + gen_length].tolist()
        out.append([eos_id if (t == mask_id and eos_id is not None) else t for t in row])  # early-stopped tail
    return out, counts, edits.tolist(), live_steps.tolist()


def edit_generate(model, prompts: Sequence[Sequence[int]], *, mask_token_id: int, gen_length: int = 128,
                  block_length: int = 32, threshold: float = 0.95, editing_threshold: float | None = 0.9,
                  max_post_steps: int = 16, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                  seeds: Sequence[int] | None = None, batch_size: int | None = None, use_cache: bool = True,
                  eos_token_id: int | None = None, eos_early_stop: bool = False,
                  suppress_token_ids: Sequence[int] = (),
                  callback: Callable | None = None, progress: Callable[[int], None] | None = None,
                  allow_extrapolation: bool = False) -> GenerationResult:
    """LLaDA 2.1 editing decoding of a batch of prompts (semantics in the module docstring).

    Args:
        model: a bidirectional mask predictor trained with block diffusion (ideally with T2T editing). With
            ``use_cache`` a llada_scale Transformer (or anything :func:`llada_scale.sampling.kv_cache.cached_hidden`
            supports); without, any ``model(input_ids, position_ids=, attention_mask=)`` returning logits.
        prompts: token-id lists (lengths may differ; no mask tokens).
        mask_token_id: the mask token (never generated, nor are ``suppress_token_ids``).
        gen_length: tokens per answer (>= 1); block_length: tokens per block (>= 1), counted from position 0.
        threshold: M2T confidence threshold in [0, 1]; editing_threshold: T2T threshold in [0, 1], or None = no
            edits; max_post_steps: editing steps allowed after a block has no mask left (>= 0).
        temperature, top_k, top_p: see :func:`sample_tokens` (0 = greedy).
        generator / seeds: the sampling RNG (one generator, or one seed per prompt: row i then draws from its
            own generator, so its tokens do not depend on the batching).
        batch_size: prompts per call (None = all at once).
        eos_token_id, eos_early_stop: stop a row after the block in which it has no mask left and an EOS
            (the release's ``eos_early_stop``); its unfinished tail is returned as EOS.
        callback: ``callback(step, tokens, committed, edited)`` after every step, each [B, gen_length]: the
            generated region of every row of the call (mask tokens where still masked), the positions committed
            from masks and those rewritten (T2T) at this step.
    Returns:
        :class:`llada_scale.sampling.common.GenerationResult`: ``tokens[i]`` = the ``gen_length`` generated ids
        of prompt i (use :func:`llada_scale.sampling.common.truncate_at` to cut at EOS); ``nfe`` = forwards over
        the batch (prefill + denoising/editing steps + cache appends); ``steps`` = denoising/editing steps;
        ``extra`` = ``{"prefill", "denoise", "append", "edits", "edits_per_token", "row_edits", "row_steps"}``
        (``row_steps[i]``: the denoising/editing forwards row i took part in, its batch-size-1 step count).
    Raises:
        ValueError: bad lengths / thresholds, a prompt with the mask token, a context longer than the model's
            without ``allow_extrapolation``, ``seeds`` of the wrong length.
    """
    t0 = time.perf_counter()
    rows = check_prompts(prompts)
    if gen_length < 1 or block_length < 1 or max_post_steps < 0:
        raise ValueError(f"gen_length and block_length must be >= 1 and max_post_steps >= 0 (got {gen_length}, "
                         f"{block_length}, {max_post_steps})")
    if not 0.0 <= threshold <= 1.0 or (editing_threshold is not None and not 0.0 <= editing_threshold <= 1.0):
        raise ValueError(f"threshold and editing_threshold must be in [0, 1] (editing_threshold None = no edits), "
                         f"got {threshold}, {editing_threshold}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if any(mask_token_id in r for r in rows):
        raise ValueError("a prompt contains the mask token")
    if seeds is not None and len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} seeds for {len(rows)} prompts")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if use_cache:
        core_of(model)  # TypeError early for a model the cached forward cannot walk
    longest = max(len(r) for r in rows)
    check_length(model, -(-(longest + gen_length) // block_length) * block_length, allow_extrapolation,
                 f"prompt ({longest} tokens) + gen_length {gen_length} rounded up to whole blocks")
    device = model_device(model)
    banned = torch.tensor(sorted({mask_token_id, *suppress_token_ids}), dtype=torch.long, device=device)
    size = batch_size or len(rows)
    out: list[list[int]] = []
    totals = {"prefill": 0, "denoise": 0, "append": 0, "edits": 0}
    row_edits: list[int] = []
    row_steps: list[int] = []
    for c in range(0, len(rows), size):
        chunk = rows[c:c + size]
        gen = generator if seeds is None else [torch.Generator(device=device).manual_seed(int(s))
                                               for s in seeds[c:c + size]]
        toks, counts, per_row, steps = _decode(model, chunk, gen_length, block_length, mask_token_id, threshold,
                                        editing_threshold, max_post_steps, temperature, top_k, top_p, gen, banned,
                                        use_cache, eos_token_id, eos_early_stop, callback)
        out += toks
        row_edits += per_row
        row_steps += steps
        for k in totals:
            totals[k] += counts[k]
        if progress is not None:
            progress(len(chunk))
    nfe = totals["prefill"] + totals["denoise"] + totals["append"]
    return GenerationResult(tokens=out, nfe=nfe, seconds=time.perf_counter() - t0, steps=totals["denoise"],
                            extra={**totals, "edits_per_token": totals["edits"] / (len(rows) * gen_length),
                                   "row_edits": row_edits, "row_steps": row_steps})
