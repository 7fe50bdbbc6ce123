"""log p(answer | prompt): the exact chain rule for AR models, LLaDA's Monte Carlo ELBO estimate for diffusion
models (LLaDA paper eq. 6 and Appendix B.5; ML-GSAI/LLaDA ``get_log_likelihood.py``), optionally with
classifier-free guidance (LLaDA ``eval_llada.py``), and the block NELBO for block-diffusion models (BD3-LM,
Arriola et al. 2025, eq. 6: the sum over blocks of each block's masked-diffusion ELBO given the clean earlier
blocks, computed with the training layout of :mod:`llada_scale.model.block_attention`)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from llada_scale.model import block_attention as ba
from llada_scale.sampling.common import (check_length, check_prompts, left_pad, max_global, model_device, pad_id_for,
                                         selected_logits)

__all__ = ["ESTIMATORS", "log_likelihood", "log_likelihood_batch"]

ESTIMATORS = ("ar", "full", "block")  # exact chain rule / LLaDA ELBO (full attention) / block NELBO


def _check_pairs(pairs) -> list[tuple[list[int], list[int]]]:
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("pairs must be a non-empty list of (prompt, answer) token-id lists")
    out = []
    for i, pa in enumerate(pairs):
        if not isinstance(pa, (list, tuple)) or len(pa) != 2:
            raise ValueError(f"pairs[{i}] must be a (prompt, answer) pair")
        prompt, answer = check_prompts([pa[0]], f"pairs[{i}].prompt")[0], check_prompts([pa[1]], f"pairs[{i}].answer")[0]
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


def _mc_rows(j: int, prompt: list[int], answer: list[int], mc_samples: int, block_length: int | None, g, mask_id: int):
    """The ``mc_samples`` noisy rows of one pair: ``(pair, noisy ids, prompt length, cols, targets, weights)``.

    Each segment of answer positions (the whole answer, or each block of ``block_length`` positions counted
    from position 0) draws its own stratified counts l (1..L_s) over the samples; a row masks l positions of
    every segment, chosen uniformly without replacement, and weighs each masked token by L_s / l.
    """
    n, p = len(answer), len(prompt)
    if block_length is None:
        segments = [list(range(n))]
    else:
        segments = [[i for i in range(n) if (p + i) // block_length == b]
                    for b in range(p // block_length, (p + n - 1) // block_length + 1)]
    draws = [(seg, _stratified_counts(mc_samples, len(seg), g)) for seg in segments]
    rows = []
    for s in range(mc_samples):
        ids, cols, targets, weights = prompt + answer, [], [], []
        for seg, counts in draws:
            chosen = torch.randperm(len(seg), generator=g)[:counts[s]].sort().values.tolist()
            for c in chosen:
                ids[p + seg[c]] = mask_id
                cols.append(p + seg[c])
                targets.append(answer[seg[c]])
                weights.append(len(seg) / counts[s])
        rows.append((j, ids, p, cols, targets, weights))
    return rows


@torch.no_grad()
def log_likelihood_batch(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, causal: bool,
                         mask_token_id: int | None = None, mc_samples: int = 128, batch_size: int = 32,
                         generator: torch.Generator | None = None, pad_token_id: int | None = None,
                         progress: bool = False, sync_ranks: bool = False,
                         pair_seeds: Sequence[int] | None = None, cfg_scale: float = 0.0,
                         block_length: int | None = None, return_greedy: bool = False,
                         allow_extrapolation: bool = False) -> list:
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

    Block diffusion (``block_length`` set): the block NELBO the model was trained with. Blocks of
    ``block_length`` positions are counted from position 0 (as in training and in
    :mod:`llada_scale.sampling.block`); every block holding answer tokens gets the estimator above for its own
    answer tokens (its own l, weight L_b / l), all blocks of a sample noised at once and scored in one forward
    of ``[x_t ; x_0]`` with the block-diffusion mask (each noisy block sees itself and the clean earlier
    blocks). The estimate is unbiased for the sum of the per-block ELBOs, a lower bound on log p(answer |
    prompt) under the block factorisation.

    Classifier-free guidance (``cfg_scale`` w > 0, diffusion only; LLaDA ``eval_llada.py::get_logits``): each
    row is also run with its prompt replaced by mask tokens, and ``uncond + (w + 1) (cond - uncond)`` is
    used as the logits (then the result is a score, no longer a bound).

    ZeRO-3: the number of forwards is ``ceil(rows / batch_size)``, which differs between ranks holding
    different data - pass ``sync_ranks=True``.

    Args:
        model: the model (logits float32-cast before log_softmax).
        pairs: (prompt ids, answer ids); answers non-empty.
        causal: True for AR models, False for mask predictors.
        mask_token_id: required when ``causal`` is False.
        mc_samples: Monte Carlo samples per pair (diffusion), >= 1.
        batch_size: rows per forward, >= 1 (a CFG forward holds 2x as many).
        generator: torch.Generator (CPU) for masks and counts, for reproducibility.
        pad_token_id: left-padding id (default 0 / 1 if the mask id is 0).
        progress: tqdm bar over forwards.
        sync_ranks: pad the number of forwards to the maximum over ranks (ZeRO-3; extra forwards are
            discarded).
        pair_seeds: one seed per pair; pair j then draws its counts and masks from its own
            ``torch.Generator().manual_seed(pair_seeds[j])`` (ignoring ``generator``), so its estimate does not
            depend on which other pairs share the call (e.g. how examples are sharded over ranks).
        cfg_scale: classifier-free guidance w >= 0 (diffusion; 0 = off).
        block_length: None = LLaDA's full-attention ELBO; an int >= 1 = the block NELBO (diffusion).
        return_greedy: AR only: return ``(log p, greedy)`` per pair, greedy = every answer token is the argmax
            of its teacher-forced prediction (lm-evaluation-harness's ``is_greedy``).
        allow_extrapolation: score pairs longer than the model's ``max_seq_len`` (otherwise refused).

    Returns:
        One float per pair (nats; <= 0 for AR), or ``(float, bool)`` tuples with ``return_greedy``.

    Raises:
        ValueError: bad pairs, empty prompt with ``causal``, missing mask id, mc_samples/batch_size < 1,
            cfg/block_length/greedy with the wrong kind of model, a pair beyond ``max_seq_len``.
    """
    from tqdm.auto import tqdm

    pairs = _check_pairs(pairs)
    if batch_size < 1 or mc_samples < 1:
        raise ValueError(f"batch_size and mc_samples must be >= 1 (got {batch_size}, {mc_samples})")
    if cfg_scale < 0 or (cfg_scale > 0 and causal):
        raise ValueError(f"cfg_scale must be >= 0 and applies to diffusion models only (got {cfg_scale})")
    if block_length is not None and (causal or block_length < 1):
        raise ValueError(f"block_length applies to diffusion models and must be >= 1 (got {block_length})")
    if return_greedy and not causal:
        raise ValueError("return_greedy is for AR models (a diffusion model's greedy answer needs decoding)")
    longest = max(len(p) + len(a) for p, a in pairs)
    check_length(model, longest, allow_extrapolation, "the longest prompt + answer")
    device = model_device(model)
    # rows: (pair index, token ids, prompt length, positions to score (index into ids), targets, weights)
    rows: list[tuple[int, list[int], int, list[int], list[int], list[float]]] = []
    if causal:
        for j, (prompt, answer) in enumerate(pairs):
            if not prompt:
                raise ValueError(f"pairs[{j}] has an empty prompt; AR scoring needs a context token (e.g. bos)")
            cols = list(range(len(prompt) - 1, len(prompt) + len(answer) - 1))
            rows.append((j, prompt + answer, len(prompt), cols, answer, [1.0] * len(answer)))
        pad = 0 if pad_token_id is None else pad_token_id
    else:
        if mask_token_id is None:
            raise ValueError("mask_token_id is required for diffusion (causal=False) likelihoods")
        pad = pad_id_for(mask_token_id, pad_token_id)
        if pair_seeds is not None and len(pair_seeds) != len(pairs):
            raise ValueError(f"pair_seeds has {len(pair_seeds)} entries for {len(pairs)} pairs")
        for j, (prompt, answer) in enumerate(pairs):
            g = torch.Generator().manual_seed(int(pair_seeds[j])) if pair_seeds is not None else generator
            rows += _mc_rows(j, prompt, answer, mc_samples, block_length, g, mask_token_id)
    totals = [0.0] * len(pairs)
    greedy = [True] * len(pairs)
    n_run = max_global(math.ceil(len(rows) / batch_size), sync_ranks, device)
    for bi in tqdm(range(n_run), desc="log-likelihood", unit="fwd", disable=not progress, leave=False):
        chunk = rows[bi * batch_size:(bi + 1) * batch_size]
        dummy = not chunk  # padding forward so every rank runs the same number (ZeRO-3)
        if dummy:
            chunk = rows[:1] or [(0, [pad], 0, [0], [pad], [0.0])]
        width = max(len(r[1]) for r in chunk)
        rr, cc, tt, ww = [], [], [], []
        for i, (_, ids, _, cols, targets, weights) in enumerate(chunk):
            rr += [i] * len(cols)
            cc += [width - len(ids) + c for c in cols]
            tt += targets
            ww += weights
        rr_t, cc_t = torch.tensor(rr, device=device), torch.tensor(cc, device=device)
        logits = _scored_logits(model, chunk, pad, mask_token_id, cfg_scale, block_length, rr_t, cc_t, device)
        tt_t = torch.tensor(tt, device=device)
        lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, tt_t[:, None])[:, 0]
        if dummy:
            continue
        lp = lp * torch.tensor(ww, dtype=torch.float64, device=device)
        per_row = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, rr_t, lp).tolist()
        hits = (logits.argmax(-1) == tt_t).tolist() if return_greedy else []
        for i, (j, *_) in enumerate(chunk):
            totals[j] += per_row[i]
        for r, hit in zip(rr, hits):
            greedy[chunk[r][0]] &= bool(hit)
    if not causal:
        totals = [t / mc_samples for t in totals]
    return list(zip(totals, greedy)) if return_greedy else totals


def _scored_logits(model, chunk, pad: int, mask_id: int | None, cfg_scale: float, block_length: int | None,
                   rr: torch.Tensor, cc: torch.Tensor, device) -> torch.Tensor:
    """float32 logits [N, V] at (rr, cc) of the left-padded chunk (CFG combined; block NELBO layout)."""
    noisy = [r[1] for r in chunk]
    if cfg_scale > 0:  # unconditional copies: the prompt masked (LLaDA eval_llada.py)
        noisy = noisy + [[mask_id] * r[2] + r[1][r[2]:] for r in chunk]
        rr, cc = torch.cat([rr, rr + len(chunk)]), torch.cat([cc, cc])
    x, pos, doc = left_pad(noisy, pad, device=device)
    if block_length is None:
        logits = selected_logits(model, x, pos, doc, rr, cc)
    else:  # clean x_0 next to x_t: the prompt stays masked in both halves of an unconditional row
        clean = [r[1][:r[2]] + _clean_answer(r) for r in chunk]
        if cfg_scale > 0:
            clean = clean + [[mask_id] * r[2] + _clean_answer(r) for r in chunk]
        x0 = left_pad(clean, pad, device=device)[0]
        # dense SDPA mask, as every other inference path: shapes change per call (see sampling/block.py)
        logits = ba.block_diffusion_logits(model, x, x0, pos, doc, block_length, backend="sdpa")[rr, cc].float()
    if cfg_scale > 0:
        cond, uncond = logits.chunk(2)
        logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
    return logits


def _clean_answer(row) -> list[int]:
    _, ids, p, cols, targets, _ = row
    out = list(ids[p:])
    for c, t in zip(cols, targets):
        out[c - p] = t
    return out


def log_likelihood(model, prompt: list[int], answer: list[int], *, mask_token_id: int | None = None,
                   causal: bool, mc_samples: int = 128, batch_size: int = 32,
                   generator: torch.Generator | None = None, pad_token_id: int | None = None,
                   sync_ranks: bool = False, cfg_scale: float = 0.0, block_length: int | None = None) -> float:
    """log p(answer | prompt) in nats for one pair: exact chain rule (AR), LLaDA's Monte Carlo ELBO estimate
    (diffusion, LLaDA eq. 6; ``get_log_likelihood.py``) or the block NELBO (``block_length``). See
    :func:`log_likelihood_batch` for the estimators, arguments and errors; here ``batch_size`` rows of the
    ``mc_samples`` Monte Carlo samples go through each forward (``ceil(mc_samples / batch_size)`` forwards;
    AR: one forward).
    """
    return log_likelihood_batch(model, [(prompt, answer)], causal=causal, mask_token_id=mask_token_id,
                                mc_samples=mc_samples, batch_size=batch_size, generator=generator,
                                pad_token_id=pad_token_id, sync_ranks=sync_ranks, cfg_scale=cfg_scale,
                                block_length=block_length)[0]
