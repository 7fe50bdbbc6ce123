"""Training objectives: autoregressive next-token CE, LLaDA masked diffusion and block diffusion (LLaDA 2.0).

Every objective takes a batch from :mod:`llada_scale.data.loader` (``input_ids``, ``position_ids``,
``document_ids``, ``prompt_mask``, ``padding_mask``, all [B, L]) and a model callable
``model(input_ids, position_ids=..., document_ids=..., attention_mask=..., labels=...) -> float32 [B, L]``
that returns the per-token cross-entropy against ``labels`` (0 where the label is -100; our
:class:`llada_scale.model.transformer.Transformer` runs its head on the labelled positions only, in chunks, so
[B, L, V] logits never exist), and returns ``(loss, stats)`` where ``loss`` is a scalar float32 tensor and
``stats`` holds float32 tensors on the batch's device that may be summed across ranks (per t-bucket loss sums
and counts, token counts).

Pretraining and SFT share one code path: a pretraining batch is an SFT batch whose prompt is empty.
Shapes are static: every micro batch reaches the model as [B, L] (or [B, 2L] for block diffusion), including
the random-length batches, and nothing here reads a device value on the host except the prompt check and
the block count of block diffusion.

Noise schedules, loss weights and the forward process are in :mod:`llada_scale.objectives.noise`; the
``objective`` recipe section in :mod:`llada_scale.objectives.config`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llada_scale.model import block_attention as ba
from llada_scale.model.head import IGNORE_INDEX
from llada_scale.objectives import block_diffusion as bd
from llada_scale.objectives import editing
from llada_scale.objectives.config import NUM_T_BUCKETS, ObjectiveConfig, is_diffusion
from llada_scale.objectives.noise import forward_process, loss_weight


def diffusion_loss(token_ce: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, answer_lengths: torch.Tensor,
                   loss_weighting: str = "inverse_t") -> torch.Tensor:
    """Masked-diffusion loss from the per-token cross-entropy of the masked tokens.

    Weighted (``inverse_t``, ``linear``, ``cosine``): loss = (1/B) sum_b (1/n_b) sum_{i masked in b}
    w(t_{b,i}) CE(logits[b,i], x_0[b,i]) with w from :func:`llada_scale.objectives.noise.loss_weight` (LLaDA eq. 3 and eq. 5; MDLM eq. 10).
    n_b is the number of tokens of row b that could be masked: L in pretraining (then this is exactly
    GUIDELINES.md's ``token_loss.sum() / (b * l)``; after a random-length cut to l' it is l', GUIDELINES.md's
    truncation), the answer length in SFT (LLaDA eq. 5 normalisation).
    ``none``: loss = (sum of CE over masked tokens) / (number of masked tokens), the plain mean over the
    micro batch's masked tokens (inclusionAI/dFactory); 0 when nothing is masked.

    Args:
        token_ce: float32 [B, L] cross-entropy of every masked token, 0 elsewhere (the model's ``labels`` output).
        masked: bool [B, L].
        t: float32 [B] (per row) or [B, L] (per token, block diffusion): the time that generated the mask
            (for the linear schedule equal to the mask probability p).
        answer_lengths: [B] (> 0).
    Returns:
        float32 scalar. No host synchronisation (no boolean indexing).
    """
    if loss_weighting == "none":
        return token_ce.sum() / masked.sum().clamp(min=1)
    t_tok = t[:, None].expand_as(masked) if t.dim() == 1 else t
    w = loss_weight(torch.where(masked, t_tok.float(), 1.0), loss_weighting)  # t = 1 where unmasked: finite
    per_token = token_ce * torch.where(masked, w, 0.0) / answer_lengths[:, None].float()
    return per_token.sum() / masked.shape[0]


def ar_loss(token_ce: torch.Tensor, valid_targets: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Next-token cross-entropy from the per-position CE ``token_ce`` [B, L-1] (position i predicts token i+1,
    0 where ``valid_targets`` [B, L-1] is False).

    ``per_row=False``: mean over all valid targets of the micro batch (pretraining).
    ``per_row=True``: mean over each row's answer tokens, then over rows with answer tokens (SFT,
    answer-length normalised). Returns a float32 scalar (no host synchronisation).
    """
    if per_row:
        n = valid_targets.sum(1)
        rows = torch.where(n > 0, token_ce.sum(1) / n.clamp(min=1), 0.0)
        return rows.sum() / (n > 0).sum().clamp(min=1)
    return token_ce.sum() / valid_targets.sum().clamp(min=1)


def random_length_keep(batch: dict, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's random-length pretraining data (GUIDELINES.md: 1% of batches cut to a random length), with
    static shapes: bool [L], True for the first l' positions, where l' ~ U{1..L} with probability ``prob``
    and l' = L otherwise (one l' for the whole micro batch, as GUIDELINES.md slices ``input_ids[:, :l']``).

    The row keeps its length L: the trainer hands the model the same shapes every step (a compiled model or
    FlexAttention never recompiles). :func:`compute_loss` makes the positions after the cut their own document
    (no attention to or from them) and excludes them from noise and loss; the loss then equals the one of
    the sliced batch. Random draws: ``rand(1)``, ``randint(1, L + 1, (1,))``, both always (no host sync).
    """
    length = batch["input_ids"].shape[1]
    dev = batch["input_ids"].device
    u = torch.rand(1, device=dev, generator=generator)
    new_len = torch.randint(1, length + 1, (1,), device=dev, generator=generator)
    return torch.arange(length, device=dev) < torch.where(u < prob, new_len, length)


def _t_bucket_stats(t: torch.Tensor, masked: torch.Tensor, token_ce: torch.Tensor, eps: float) -> dict:
    t_tok = t[:, None].expand_as(masked) if t.dim() == 1 else t
    u = (t_tok.float() - eps) / (1 - eps)  # back to U(0, 1): equal-probability buckets
    bucket = (u * NUM_T_BUCKETS).long().clamp(0, NUM_T_BUCKETS - 1).reshape(-1)
    w = masked.reshape(-1).float()
    zeros = torch.zeros(NUM_T_BUCKETS, device=masked.device)
    return {"t_bucket_ce_sum": zeros.clone().index_add_(0, bucket, token_ce.detach().reshape(-1) * w),
            "t_bucket_count": zeros.index_add_(0, bucket, w)}


def _times(cfg: ObjectiveConfig, position_ids: torch.Tensor, document_ids: torch.Tensor, block_length: int | None,
           generator) -> torch.Tensor | None:
    """Diffusion times: None (plain LLaDA: :func:`forward_process` draws ``rand(B)``), one per block
    (:func:`llada_scale.objectives.block_diffusion.sample_block_times`), or from ``mask_ratio_band``
    (:func:`llada_scale.objectives.editing.band_times`: [B] per row, or per block)."""
    band = cfg.mask_ratio_band
    if block_length is None:
        return editing.band_times((position_ids.shape[0],), *band, position_ids.device, generator) if band else None
    segments = ba.block_ids(position_ids, document_ids, block_length)
    if not band:
        return bd.sample_block_times(segments, cfg.eps, generator)
    u = editing.band_times((segments.shape[0], int(segments.max()) + 1), *band, segments.device, generator)
    return u.gather(1, segments)


def _run(model, ids, clean, position_ids, document_ids, block_length, labels=None):
    """Per-token CE (with ``labels``) or logits [B, L, V] of the noisy positions, plain or block diffusion."""
    if block_length is None:
        return model(ids, position_ids=position_ids, document_ids=document_ids, labels=labels)
    return ba.block_diffusion_logits(model, ids, clean, position_ids, document_ids, block_length, labels=labels)


def diffusion_objective(model, batch: dict, cfg: ObjectiveConfig, mask_token_id: int,
                        generator: torch.Generator | None = None, block_length: int | None = None,
                        keep: torch.Tensor | None = None, edit_vocab: torch.Tensor | None = None):
    """Masked-diffusion loss of one batch: plain LLaDA, or block diffusion, with the optional T2T editing
    term and LLaDA 2.0 SFT techniques (:mod:`llada_scale.objectives.editing`).

    Steps: eligible = not prompt (and not padding under ``sft_pad_policy=ignore``, and inside ``keep``, and
    inside the block-aligned padding with ``sft_block_pad``); noise (one t per row, or with ``block_length``
    one t per (document, block) via :func:`llada_scale.objectives.block_diffusion.sample_block_times`; from
    ``mask_ratio_band`` when set); complementary masking (the batch doubled: [rows ; rows], the second half
    with mask eligible & ~m and t = 1 - t); classifier-free-guidance prompt dropping (SFT, ``cfg_prob``); T2T
    corruption (``edit_prob``: visible eligible positions replaced by random or self-drafted tokens); the
    model call with ``labels`` = x_0 at the masked and corrupted positions (and the intact visible ones with
    ``edit_keep_weight > 0``) (plain, or the 2L layout
    ``[x_t ; x_0]`` with the block-diffusion mask; the head runs on those positions only, or on all noisy
    positions when ``confidence_weight > 0`` needs the logits); loss = :func:`diffusion_loss` (M2T) +
    ``edit_loss_weight`` x :func:`llada_scale.objectives.editing.edit_loss` (T2T) + ``confidence_weight`` x
    :func:`llada_scale.objectives.editing.confidence_loss` (CAP).
    Random draws in order: times, masks (``rand(B, L)``), ``rand(B)`` for CFG when ``cfg_prob > 0``, then with
    ``edit_prob > 0`` ``rand(B, L)`` for the positions and ``randint`` for random replacements. With every new
    key off the draws and the loss are those of plain LLaDA / block diffusion; with ``block_length >= L`` and one
    document per row they equal plain LLaDA's (the clean half is unreachable), which the tests check.

    Args:
        model: ``model(input_ids, position_ids=, document_ids=, attention_mask=, labels=)`` -> float32 [B, L']
            per-token cross-entropy, or logits without ``labels`` (any model with that interface).
        batch: dict of [B, L] tensors (see module docstring).
        block_length: None = plain diffusion; int >= 1 = block diffusion with that block length.
        keep: optional bool [L] or [B, L]: positions that exist (:func:`random_length_keep`); the others are
            never masked, carry no loss and must already be their own document in ``batch``.
        edit_vocab: int64 [n] replacement ids for ``edit_source=random``
            (:func:`llada_scale.objectives.editing.replacement_vocab`).
    Returns:
        loss (float32 scalar), stats dict with ``t_bucket_ce_sum`` / ``t_bucket_count`` [NUM_T_BUCKETS],
        ``head_tokens`` (positions the output head ran on), ``model_rows`` (rows the model ran on, draft pass
        included), ``m2t_loss_sum`` and, with ``edit_prob > 0``, ``t2t_loss_sum`` / ``t2t_tokens`` (and
        ``keep_loss_sum`` with ``edit_keep_weight > 0``), with
        ``confidence_weight > 0`` ``cap_loss_sum``.
    Raises:
        ValueError: ``edit_source=random`` without ``edit_vocab``.
    """
    input_ids, prompt, padding = batch["input_ids"], batch["prompt_mask"], batch["padding_mask"]
    position_ids, document_ids = batch["position_ids"], batch["document_ids"]
    eligible = ~prompt
    if cfg.sft_pad_policy == "ignore":
        eligible = eligible & ~padding
    if keep is not None:
        eligible = eligible & keep
    if cfg.sft_block_pad and block_length is not None:
        kept = editing.block_pad_keep(position_ids, padding, block_length)
        eligible = eligible & kept
        document_ids = torch.where(kept, document_ids, -1)  # the dropped padding: its own document
    t = _times(cfg, position_ids, document_ids, block_length, generator)
    noisy, masked, _, t = forward_process(input_ids, eligible, mask_token_id, cfg.eps, generator,
                                          cfg.noise_schedule, t=t, return_t=True)
    if cfg.complementary_masking:
        masked_c, t_c = editing.complementary_masks(masked, eligible, t, cfg.eps)
        input_ids, prompt, position_ids, document_ids, eligible = (
            torch.cat([v, v], 0) for v in (input_ids, prompt, position_ids, document_ids, eligible))
        masked, t = torch.cat([masked, masked_c], 0), torch.cat([t, t_c], 0)
        noisy = torch.where(masked, mask_token_id, input_ids)
    clean = input_ids
    if cfg.name == "sft" and cfg.cfg_prob > 0:
        drop = torch.rand(input_ids.shape[0], device=input_ids.device, generator=generator) < cfg.cfg_prob
        dropped = drop[:, None] & prompt
        noisy = noisy.masked_fill(dropped, mask_token_id)
        clean = clean.masked_fill(dropped, mask_token_id)  # the clean context must not leak the prompt either
    rows = input_ids.shape[0]
    corrupted = None
    if cfg.edit_prob > 0:
        chosen = editing.corrupt_positions(eligible & ~masked, cfg.edit_prob, generator)
        if cfg.edit_source == "random":
            if edit_vocab is None:
                raise ValueError("objective.edit_source=random needs the replacement vocabulary (edit_vocab)")
            rep = editing.random_replacements(input_ids, edit_vocab, generator)
        else:  # self: the model drafts the chosen positions with them masked; its wrong guesses are the edits
            with torch.no_grad():
                draft = _run(model, noisy.masked_fill(chosen, mask_token_id), clean, position_ids, document_ids,
                             block_length).float()
            draft[..., mask_token_id] = -torch.inf
            rep = draft.argmax(-1)
            rows += input_ids.shape[0]
        corrupted = chosen & (rep != input_ids)
        noisy = torch.where(corrupted, rep, noisy)
    kept = None
    if corrupted is not None and cfg.edit_keep_weight > 0:
        kept = eligible & ~masked & ~corrupted  # visible and intact: the model must keep them
    targets = masked if corrupted is None else masked | corrupted | (kept if kept is not None else corrupted)
    labels = torch.where(targets, input_ids, IGNORE_INDEX)
    stats = {}
    if cfg.confidence_weight > 0:
        logits = _run(model, noisy, clean, position_ids, document_ids, block_length)
        token_ce = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
        cap = editing.confidence_loss(logits, masked, input_ids)
        stats["cap_loss_sum"] = cap.detach().float()
        stats["head_tokens"] = torch.full((), float(labels.numel()), device=labels.device)
    else:
        token_ce = _run(model, noisy, clean, position_ids, document_ids, block_length, labels=labels)
        stats["head_tokens"] = targets.sum().float()
    m2t_ce = torch.where(masked, token_ce, 0.0)
    answer_lengths = eligible.sum(1).clamp(min=1)
    loss = diffusion_loss(m2t_ce, masked, t, answer_lengths, cfg.loss_weighting)
    stats["m2t_loss_sum"] = loss.detach().float()
    if corrupted is not None:
        t2t = editing.edit_loss(token_ce, corrupted)
        stats["t2t_loss_sum"] = t2t.detach().float()
        stats["t2t_tokens"] = corrupted.sum().float()
        loss = loss + cfg.edit_loss_weight * t2t
    if kept is not None:
        keep = editing.edit_loss(token_ce, kept)
        stats["keep_loss_sum"] = keep.detach().float()
        loss = loss + cfg.edit_keep_weight * keep
    if cfg.confidence_weight > 0:
        loss = loss + cfg.confidence_weight * cap
    stats["model_rows"] = torch.full((), float(rows), device=input_ids.device)
    return loss, {**_t_bucket_stats(t, masked, m2t_ce, cfg.eps), **stats}


def model_input_length(cfg: ObjectiveConfig, causal: bool, seq_len: int, step: int = 0) -> int:
    """Positions per row that the model runs on at optimizer step ``step`` for rows of ``seq_len`` tokens:
    2 x seq_len while block diffusion with a block shorter than the row is in force (``[x_t ; x_0]``),
    else seq_len. What the MFU counts (and the same every micro step of a phase: static shapes)."""
    if cfg.block_diffusion and is_diffusion(cfg, causal) \
            and bd.effective_block_length(cfg.block_length_at(step), seq_len) < seq_len:
        return 2 * seq_len
    return seq_len


def check_objective_data(cfg: ObjectiveConfig, prompt_mask: torch.Tensor) -> None:
    """Raise ValueError when a pretraining objective (``ar`` / ``diffusion``) gets SFT rows (prompt tokens).
    Reads ``prompt_mask`` (bool [B, L]) on the host: call it on the loader's CPU batch, before the copy to the
    device, where it costs no device synchronisation (:class:`llada_scale.training.trainer.Trainer` does)."""
    if cfg.name != "sft" and bool(prompt_mask.any()):
        raise ValueError(f"objective {cfg.name!r} got SFT data (prompt tokens); set objective.name=sft")


def compute_loss(model, batch: dict, cfg: ObjectiveConfig, causal: bool, mask_token_id: int | None,
                 generator: torch.Generator | None = None, step: int = 0, check_data: bool = True,
                 edit_vocab: torch.Tensor | None = None):
    """Run ``model`` on ``batch`` and return ``(loss, stats)`` for objective ``cfg``.

    Host synchronisations (CUDA): the selection of the loss positions in the model (``nonzero``), and with block
    diffusion the number of blocks of the batch (``segments.max()``); plus :func:`check_objective_data` unless
    ``check_data=False`` (the trainer checks the CPU batch instead). Counted in tests/objectives/test_host_syncs.py.

    Diffusion objectives go through :func:`diffusion_objective`; with block diffusion on, the block length
    is ``cfg.block_length_at(step)`` (the WSD schedule) and a block length >= the row length runs plain
    LLaDA diffusion (the same objective, see :func:`diffusion_objective`, at half the compute).

    Args:
        step: optimizer step (0-based), picks the block length from ``cfg.block_schedule``.
        check_data: run :func:`check_objective_data` on ``batch["prompt_mask"]`` here.
        edit_vocab: replacement ids of T2T editing with ``edit_source=random`` (see :func:`diffusion_objective`).
    Returns:
        loss: float32 scalar. stats (float32 tensors, summable across ranks): ``tokens`` (input tokens),
        ``model_tokens`` (positions the model ran on: B x :func:`model_input_length`), ``head_tokens``
        (positions the output head ran on), ``loss_sum``/``loss_count`` (the loss and 1, so a cross-rank mean is sum/count); for diffusion
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
    b, length = input_ids.shape
    dev = input_ids.device
    is_sft = cfg.name == "sft"
    if check_data:
        check_objective_data(cfg, prompt)
    stats = {"tokens": torch.full((), float(input_ids.numel()), device=dev)}
    if not is_diffusion(cfg, causal):
        if cfg.block_diffusion:
            raise ValueError("block diffusion needs a bidirectional model (model.causal=false)")
        doc = batch["document_ids"]
        valid = (doc[:, 1:] == doc[:, :-1]) & ~prompt[:, 1:] & ~padding[:, 1:]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(valid, input_ids[:, 1:], IGNORE_INDEX)
        token_ce = model(input_ids, position_ids=batch["position_ids"], document_ids=doc, labels=labels)
        loss = ar_loss(token_ce[:, :-1], valid, per_row=is_sft)
        stats["head_tokens"] = valid.sum().float()
    else:
        if mask_token_id is None:
            raise ValueError("a diffusion objective needs model.mask_token_id (the tokenizer's mask token id)")
        keep = None
        if not is_sft and cfg.random_length_prob > 0:
            keep = random_length_keep(batch, cfg.random_length_prob, generator)
            # the cut-off tail becomes its own document: no attention to or from the kept positions
            batch = {**batch, "document_ids": torch.where(keep, batch["document_ids"], -1)}
        block_length = None
        if cfg.block_diffusion:
            effective = bd.effective_block_length(cfg.block_length_at(step), length)
            stats["block_length"] = torch.full((), float(effective), device=dev)
            block_length = effective if effective < length else None
        loss, dstats = diffusion_objective(model, batch, cfg, mask_token_id, generator, block_length, keep, edit_vocab)
        b = dstats.pop("model_rows")  # complementary masking doubles the rows, a self-draft pass adds a forward
        stats.update(dstats)
    stats["model_tokens"] = b * float(model_input_length(cfg, causal, length, step)) * torch.ones((), device=dev)
    stats["loss_sum"] = loss.detach().float()
    stats["loss_count"] = torch.ones((), device=dev)
    return loss, stats
