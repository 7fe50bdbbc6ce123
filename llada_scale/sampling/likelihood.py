"""log p(answer | prompt): the exact chain rule for AR models and LLaDA's Monte Carlo ELBO estimate for
diffusion models (LLaDA paper eq. 6 and Appendix B.5; ML-GSAI/LLaDA ``get_log_likelihood.py``)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from llada_scale.sampling.common import check_prompts, left_pad, max_global, model_device, pad_id_for, selected_logits

__all__ = ["log_likelihood", "log_likelihood_batch"]


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
    device = model_device(model)
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
        pad = pad_id_for(mask_token_id, pad_token_id)
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
    n_run = max_global(n_batches, sync_ranks, device)
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
        logits = selected_logits(model, x, pos, doc, rr_t, torch.tensor(cc, device=device))
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
