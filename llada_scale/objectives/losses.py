"""Training objectives: autoregressive next-token CE, LLaDA masked diffusion and block diffusion (LLaDA 2.0).

Every objective takes a batch from :mod:`llada_scale.data.loader` (``input_ids``, ``position_ids``,
``document_ids``, ``prompt_mask``, ``padding_mask``, all [B, L]) and a model callable
``model(input_ids, position_ids=..., document_ids=..., attention_mask=...) -> logits [B, L, V]``, and returns
``(loss, stats)`` where ``loss`` is a scalar float32 tensor and ``stats`` holds float32 tensors that may be
summed across ranks (per t-bucket loss sums and counts, token counts).

Pretraining and SFT share one code path: a pretraining batch is an SFT batch whose prompt is empty.

Noise schedules, loss weights and the forward process are in :mod:`llada_scale.objectives.noise`; the
``objective`` recipe section in :mod:`llada_scale.objectives.config`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llada_scale.model import block_attention as ba
from llada_scale.objectives import block_diffusion as bd
from llada_scale.objectives.config import NUM_T_BUCKETS, ObjectiveConfig, is_diffusion
from llada_scale.objectives.noise import forward_process, loss_weight


def diffusion_loss(logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                   answer_lengths: torch.Tensor, loss_weighting: str = "inverse_t"):
    """Masked-diffusion loss on the masked tokens.

    Weighted (``inverse_t``, ``linear``, ``cosine``): loss = (1/B) sum_b (1/n_b) sum_{i masked in b}
    w(t_{b,i}) CE(logits[b,i], x_0[b,i]) with w from :func:`llada_scale.objectives.noise.loss_weight` (LLaDA eq. 3 and eq. 5; MDLM eq. 10).
    n_b is the number of tokens of row b that could be masked: L in pretraining (then this is exactly
    GUIDELINES.md's ``token_loss.sum() / (b * l)``), the answer length in SFT (LLaDA eq. 5 normalisation).
    ``none``: loss = (sum of CE over masked tokens) / (number of masked tokens), the plain mean over the
    micro batch's masked tokens (inclusionAI/dFactory); 0 when nothing is masked.

    Args:
        logits: [B, L, V] any float dtype (computed in float32).
        input_ids: int64 [B, L]; masked: bool [B, L].
        t: float32 [B] (per row) or [B, L] (per token, block diffusion): the time that generated the mask
            (for the linear schedule equal to the mask probability p).
        answer_lengths: [B] (> 0).
    Returns:
        loss: float32 scalar; token_ce: float32 [N] unweighted CE of the N masked tokens (row-major order).
    """
    token_ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
    if loss_weighting == "none":
        return token_ce.sum() / max(int(token_ce.numel()), 1), token_ce
    rows = masked.nonzero()[:, 0]
    t_tok = t[rows] if t.dim() == 1 else t[masked]
    w = loss_weight(t_tok.float(), loss_weighting)
    per_token = token_ce * w / answer_lengths[rows].float()
    return per_token.sum() / input_ids.shape[0], token_ce


def ar_loss(logits: torch.Tensor, input_ids: torch.Tensor, valid_targets: torch.Tensor, per_row: bool):
    """Next-token cross-entropy on the targets ``input_ids[:, 1:]`` where ``valid_targets`` [B, L-1] is True.

    ``per_row=False``: mean over all valid targets of the micro batch (pretraining).
    ``per_row=True``: mean over each row's answer tokens, then over rows (SFT, answer-length normalised).
    Returns a float32 scalar.
    """
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    ce = ce.view_as(valid_targets) * valid_targets
    if per_row:
        n = valid_targets.sum(1)
        keep = n > 0
        return (ce.sum(1)[keep] / n[keep]).sum() / max(int(keep.sum()), 1)
    return ce.sum() / valid_targets.sum().clamp(min=1)


def _cut_random_length(batch: dict, generator: torch.Generator | None) -> dict:
    length = batch["input_ids"].shape[1]
    dev = batch["input_ids"].device
    new_len = int(torch.randint(1, length + 1, (1,), device=dev, generator=generator))
    return {k: v[:, :new_len] for k, v in batch.items()}


def _t_bucket_stats(t: torch.Tensor, masked: torch.Tensor, token_ce: torch.Tensor, eps: float, device) -> dict:
    t_tok = t[masked.nonzero()[:, 0]] if t.dim() == 1 else t[masked]
    u = (t_tok.float() - eps) / (1 - eps)  # back to U(0, 1): equal-probability buckets
    bucket = (u * NUM_T_BUCKETS).long().clamp(0, NUM_T_BUCKETS - 1)
    zeros = torch.zeros(NUM_T_BUCKETS, device=device)
    return {"t_bucket_ce_sum": zeros.clone().index_add_(0, bucket, token_ce.detach()),
            "t_bucket_count": zeros.index_add_(0, bucket, torch.ones_like(token_ce))}


def diffusion_objective(model, batch: dict, cfg: ObjectiveConfig, mask_token_id: int,
                        generator: torch.Generator | None = None, block_length: int | None = None):
    """Masked-diffusion loss of one (already length-cut) batch: plain LLaDA, or block diffusion.

    Steps: eligible = not prompt (and not padding under ``sft_pad_policy=ignore``); noise (one t per row, or
    with ``block_length`` one t per (document, block) via :func:`llada_scale.objectives.block_diffusion.sample_block_times`);
    classifier-free-guidance prompt dropping (SFT, ``cfg_prob``); model call (plain, or the 2L layout
    ``[x_t ; x_0]`` with the block-diffusion mask); :func:`diffusion_loss`.
    Random draws in order: times, masks (``rand(B, L)``), then ``rand(B)`` for CFG when ``cfg_prob > 0``.
    With ``block_length >= L`` and one document per row the draws, the inputs seen by the noisy tokens and
    hence the loss equal plain LLaDA's (the clean half is unreachable), which the tests check.

    Args:
        model: ``model(input_ids, position_ids=, document_ids=, attention_mask=) -> logits [B, L', V]``.
        batch: dict of [B, L] tensors (see module docstring).
        block_length: None = plain diffusion; int >= 1 = block diffusion with that block length.
    Returns:
        loss (float32 scalar), stats dict with ``t_bucket_ce_sum`` / ``t_bucket_count`` [NUM_T_BUCKETS].
    """
    input_ids, prompt, padding = batch["input_ids"], batch["prompt_mask"], batch["padding_mask"]
    position_ids, document_ids = batch["position_ids"], batch["document_ids"]
    eligible = ~prompt
    if cfg.sft_pad_policy == "ignore":
        eligible = eligible & ~padding
    t = None
    if block_length is not None:
        segments = ba.block_ids(position_ids, document_ids, block_length)
        t = bd.sample_block_times(segments, cfg.eps, generator)
    noisy, masked, _, t = forward_process(input_ids, eligible, mask_token_id, cfg.eps, generator,
                                          cfg.noise_schedule, t=t, return_t=True)
    clean = input_ids
    if cfg.name == "sft" and cfg.cfg_prob > 0:
        drop = torch.rand(input_ids.shape[0], device=input_ids.device, generator=generator) < cfg.cfg_prob
        dropped = drop[:, None] & prompt
        noisy = noisy.masked_fill(dropped, mask_token_id)
        clean = clean.masked_fill(dropped, mask_token_id)  # the clean context must not leak the prompt either
    if block_length is None:
        logits = model(noisy, position_ids=position_ids, document_ids=document_ids)
    else:
        logits = ba.block_diffusion_logits(model, noisy, clean, position_ids, document_ids, block_length)
    answer_lengths = eligible.sum(1).clamp(min=1)
    loss, token_ce = diffusion_loss(logits, input_ids, masked, t, answer_lengths, cfg.loss_weighting)
    return loss, _t_bucket_stats(t, masked, token_ce, cfg.eps, loss.device)


def compute_loss(model, batch: dict, cfg: ObjectiveConfig, causal: bool, mask_token_id: int | None,
                 generator: torch.Generator | None = None, step: int = 0):
    """Run ``model`` on ``batch`` and return ``(loss, stats)`` for objective ``cfg``.

    Diffusion objectives go through :func:`diffusion_objective`; with block diffusion on, the block length
    is ``cfg.block_length_at(step)`` (the WSD schedule) and a block length >= the row length runs plain
    LLaDA diffusion (the same objective, see :func:`diffusion_objective`, at half the compute).

    Args:
        step: optimizer step (0-based), picks the block length from ``cfg.block_schedule``.
    Returns:
        loss: float32 scalar. stats (float32 tensors, summable across ranks): ``tokens`` (input tokens),
        ``loss_sum``/``loss_count`` (the loss and 1, so a cross-rank mean is sum/count); for diffusion
        ``t_bucket_ce_sum`` / ``t_bucket_count`` [NUM_T_BUCKETS] (unweighted CE of masked tokens by their t in
        equal-width buckets of u = (t - eps)/(1 - eps)); with block diffusion on, ``block_length`` (the block
        length in force, min(schedule value, row length); the same on every rank, so divide a cross-rank sum
        by ``loss_count``).
    Raises:
        ValueError: a diffusion objective without ``mask_token_id``, ``ar``/``diffusion`` pretraining on SFT
            data where a prompt would be trained, block diffusion on a causal (AR) model.
    """
    input_ids = batch["input_ids"]
    prompt = batch["prompt_mask"]
    padding = batch["padding_mask"]
    is_sft = cfg.name == "sft"
    if not is_sft and bool(prompt.any()):
        raise ValueError(f"objective {cfg.name!r} got SFT data (prompt tokens); set objective.name=sft")
    stats = {"tokens": torch.tensor(float(input_ids.numel()))}
    if not is_diffusion(cfg, causal):
        if cfg.block_diffusion:
            raise ValueError("block diffusion needs a bidirectional model (model.causal=false)")
        logits = model(input_ids, position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        doc = batch["document_ids"]
        valid = (doc[:, 1:] == doc[:, :-1]) & ~prompt[:, 1:] & ~padding[:, 1:]
        loss = ar_loss(logits, input_ids, valid, per_row=is_sft)
    else:
        if mask_token_id is None:
            raise ValueError("a diffusion objective needs model.mask_token_id (the tokenizer's mask token id)")
        if not is_sft and cfg.random_length_prob > 0:
            dev = input_ids.device
            if float(torch.rand(1, device=dev, generator=generator)) < cfg.random_length_prob:
                batch = _cut_random_length(batch, generator)
        block_length = None
        if cfg.block_diffusion:
            length = batch["input_ids"].shape[1]
            effective = bd.effective_block_length(cfg.block_length_at(step), length)
            stats["block_length"] = torch.tensor(float(effective))
            block_length = effective if effective < length else None
        loss, dstats = diffusion_objective(model, batch, cfg, mask_token_id, generator, block_length)
        stats.update(dstats)
    stats["loss_sum"] = loss.detach().float()
    stats["loss_count"] = torch.tensor(1.0, device=loss.device)
    return loss, stats
