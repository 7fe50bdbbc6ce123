"""Block diffusion (BD3-LM / LLaDA 2.0): attention mask, per-block noise and the block-length WSD schedule.

The training input is the noisy row and the clean row side by side, ``[x_t ; x_0]`` (length 2L), with the
same ``position_ids`` (and document ids) for both halves. Tokens are cut into blocks of ``block_length``
consecutive positions *within a document* (block index = ``position_ids // block_length``, so blocks start at
each document's position 0, exactly where the sampler of :mod:`llada_scale.block_sampling` starts them).
The attention mask (Arriola et al. 2025, "Block Diffusion", Sec. 3 / kuleshov-group/bd3lms
``models/dit.py::block_diff_mask``: M_BD | M_OBC | M_BC), always restricted to the same document:

* noisy query -> noisy key of the *same* block (block diagonal, M_BD);
* noisy query -> clean key of a *strictly earlier* block (offset block-causal, M_OBC);
* clean query -> clean key of the same or an earlier block (block-causal, M_BC).

Clean tokens never see noisy ones, so the clean half is exactly what a KV cache of finished blocks holds at
inference time. Each block draws its own time t (LLaDA 2.0 / BD3-LM: one noise level per block); the loss is
the masked-diffusion loss of :func:`llada_scale.objectives.diffusion_loss` on the noisy half.

This module depends only on :mod:`llada_scale.attention`; :mod:`llada_scale.objectives` calls into it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llada_scale import attention

FULL = "full"  # block_schedule value meaning "the whole row is one block" (plain LLaDA masked diffusion)
FULL_LENGTH = 2**31 - 1  # integer stand-in for FULL: any block length >= the row length is one block
FLEX_BLOCK_SIZE = 128  # FlexAttention tile (create_block_mask BLOCK_SIZE), passed explicitly


# ----------------------------------------------------------------------------------------------- blocks


def block_ids(position_ids: torch.Tensor, document_ids: torch.Tensor | None, block_length: int) -> torch.Tensor:
    """Index of the (document, block) segment of every token, numbered 0, 1, ... along each row.

    A new segment starts where the document id changes or ``position_ids // block_length`` changes, so a
    block never spans two documents and blocks are aligned to each document's first position.

    Args:
        position_ids: int64 [B, L], positions restarting at each packed document.
        document_ids: int [B, L] or None (one document per row).
        block_length: tokens per block, >= 1 (values >= L make each document one block).
    Returns:
        int64 [B, L], non-decreasing along each row, starting at 0.
    Raises:
        ValueError: ``block_length < 1``.
    """
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    blk = torch.div(position_ids, block_length, rounding_mode="floor")
    new = torch.zeros_like(blk, dtype=torch.bool)
    new[:, 1:] = blk[:, 1:] != blk[:, :-1]
    if document_ids is not None:
        new[:, 1:] |= document_ids[:, 1:] != document_ids[:, :-1]
    return new.long().cumsum(1)


def sample_block_times(segments: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One diffusion time per block, broadcast to its tokens.

    u ~ U(0, 1) per segment, t = (1 - eps) u + eps (LLaDA GUIDELINES.md ``forward_process``; one t per block
    as in BD3-LM, Arriola et al. 2025, Sec. 3, kuleshov-group/bd3lms ``diffusion.py``, and LLaDA 2.0). Draws ``rand(B, S)`` with S = number of segments of the longest
    row, so a batch whose rows are single blocks consumes exactly the random numbers of plain LLaDA's
    ``rand(B)`` (same seed -> same noise).

    Args:
        segments: int64 [B, L] from :func:`block_ids`.
    Returns:
        t: float32 [B, L] in [eps, 1], constant over each segment.
    """
    num = int(segments.max()) + 1
    u = torch.rand(segments.shape[0], num, device=segments.device, generator=generator)
    return (1 - eps) * u.gather(1, segments) + eps


# ------------------------------------------------------------------------------------------------- mask


def block_diffusion_mask_mod(segments: torch.Tensor, document_ids: torch.Tensor | None) -> attention.MaskMod:
    """FlexAttention ``mask_mod`` of the block-diffusion mask over the 2L layout ``[x_t ; x_0]``.

    Index n < L is noisy token n, index n >= L is clean token n - L. See the module docstring for the rule.

    Args:
        segments: int64 [B, L] from :func:`block_ids` (segment order equals block order within a document).
        document_ids: int [B, L] or None.
    Returns:
        ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend). Indices >= 2L (FlexAttention pads
        Q_LEN/KV_LEN up to a multiple of its tile, pytorch/pytorch#137801) are clamped into range before any
        table lookup; those padded rows/columns are discarded by the kernel, so their value is irrelevant.
    """
    length = segments.shape[1]
    doc = document_ids if document_ids is not None else torch.zeros_like(segments)

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean = q_idx >= length
        kv_clean = kv_idx >= length
        q_tok = torch.where(q_clean, q_idx - length, q_idx).clamp(0, length - 1)
        kv_tok = torch.where(kv_clean, kv_idx - length, kv_idx).clamp(0, length - 1)
        bq, bkv = segments[b, q_tok], segments[b, kv_tok]
        same_doc = doc[b, q_tok] == doc[b, kv_tok]
        diagonal = (bq == bkv) & (q_clean == kv_clean)  # M_BD (noisy-noisy; clean-clean is inside M_BC)
        offset_causal = ~q_clean & kv_clean & (bkv < bq)  # M_OBC
        causal = q_clean & kv_clean & (bkv <= bq)  # M_BC
        return same_doc & (diagonal | offset_causal | causal)

    return mask_mod


def block_diffusion_mask(segments: torch.Tensor, document_ids: torch.Tensor | None, backend: str = "auto"):
    """Realise :func:`block_diffusion_mask_mod` for the 2L layout.

    On ``flex`` this calls ``create_block_mask`` with an explicit ``BLOCK_SIZE`` of :data:`FLEX_BLOCK_SIZE`
    (the kernel tiles must divide it; attention-gym#65) and Q_LEN = KV_LEN = 2L, which need not be a tile
    multiple: partial tiles are evaluated element-wise by the mask_mod (which is safe on the padded indices),
    so the mask is exact for any L and any block length. For best sparsity pick L a multiple of 128 so the
    noisy/clean boundary falls on a tile edge (bd3lms#23 is what goes wrong when the mask is built for one
    length and used for another, or when out-of-range indices are read).

    Args:
        segments: int64 [B, L]; document_ids: int [B, L] or None.
        backend: ``auto`` | ``sdpa`` | ``flex`` (see :func:`llada_scale.attention.resolve_backend`).
    Returns:
        FlexAttention ``BlockMask`` or dense bool [B, 1, 2L, 2L] (True = attend).
    Raises:
        ValueError: unknown backend, or ``flex`` off CUDA.
    """
    b, length = segments.shape
    device = segments.device
    if attention.resolve_backend(backend, device) == "flex":
        return flex_block_mask(segments, document_ids)
    mod = block_diffusion_mask_mod(segments, document_ids)
    return attention.mask_from_mod(mod, b, 2 * length, 2 * length, device, "sdpa")


def flex_block_mask(segments: torch.Tensor, document_ids: torch.Tensor | None,
                    block_size: int = FLEX_BLOCK_SIZE):
    """FlexAttention ``BlockMask`` of the block-diffusion mask, shape (B, 1, 2L, 2L), tile ``block_size``.

    Built on ``segments.device`` (CPU works too, which the tests use to check that every skipped tile is
    all-False and every "full" tile all-True for lengths that are not tile multiples).

    Args:
        segments: int64 [B, L]; document_ids: int [B, L] or None; block_size: tile edge (default 128).
    Raises:
        RuntimeError: FlexAttention is not available in this torch.
    """
    if attention.BlockMask is None:  # pragma: no cover - old torch
        raise RuntimeError("FlexAttention is not available in this torch; use attention_backend=sdpa")
    b, length = segments.shape
    mod = block_diffusion_mask_mod(segments, document_ids)
    return attention.create_block_mask(mod, b, None, 2 * length, 2 * length, device=segments.device,
                                       BLOCK_SIZE=block_size)


def _model_backend(model) -> str:
    for m in (model, getattr(model, "module", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "attention_backend"):
            return cfg.attention_backend
    return "auto"


def block_diffusion_logits(model, noisy_ids: torch.Tensor, clean_ids: torch.Tensor, position_ids: torch.Tensor,
                           document_ids: torch.Tensor | None, block_length: int, backend: str | None = None):
    """Run ``model`` on ``[x_t ; x_0]`` with the block-diffusion mask and return the noisy half's logits.

    Args:
        model: callable ``model(input_ids, position_ids=..., attention_mask=...) -> logits`` (a
            :class:`llada_scale.model.Transformer` or an engine wrapping one).
        noisy_ids, clean_ids: int64 [B, L] (x_t and the clean context x_0; under classifier-free-guidance
            training the dropped prompt is masked in both).
        position_ids: int64 [B, L] (used for both halves); document_ids: int [B, L] or None.
        block_length: tokens per block (>= 1).
        backend: mask backend; default the model config's ``attention_backend``.
    Returns:
        logits [B, L, V] at the noisy positions, in the model's dtype.
    Raises:
        ValueError: ``block_length < 1`` or a bad backend.
    """
    length = noisy_ids.shape[1]
    segments = block_ids(position_ids, document_ids, block_length)
    mask = block_diffusion_mask(segments, document_ids, backend or _model_backend(model))
    ids = torch.cat([noisy_ids, clean_ids], 1)
    pos = torch.cat([position_ids, position_ids], 1)
    return model(ids, position_ids=pos, attention_mask=mask)[:, :length]


# ------------------------------------------------------------------------------------ block-length WSD


def validate_block_schedule(schedule: Sequence) -> list[list]:
    """Check a ``block_schedule`` (list of ``[block_length, steps]``) and return it as a list of lists.

    ``block_length`` is an int >= 1 or ``"full"`` (whole row = one block = plain LLaDA diffusion); ``steps`` an
    int >= 0. Raises ValueError naming the bad entry.
    """
    out = []
    for i, entry in enumerate(schedule):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"block_schedule[{i}] must be [block_length, steps], got {entry!r}")
        bl, steps = entry
        ok_bl = bl == FULL or (isinstance(bl, int) and not isinstance(bl, bool) and bl >= 1)
        if not ok_bl:
            raise ValueError(f"block_schedule[{i}]: block_length must be an int >= 1 or 'full', got {bl!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"block_schedule[{i}]: steps must be an int >= 0, got {steps!r}")
        out.append([bl, steps])
    return out


def block_length_at(schedule: Sequence, step: int) -> int:
    """Block length of a piecewise-constant schedule at optimizer step ``step`` (0-based).

    Phase i covers steps [sum_{j<i} steps_j, sum_{j<=i} steps_j); after the last phase its block length
    holds. ``"full"`` returns :data:`FULL_LENGTH` (any value >= the row length means one block per document).
    This is the WSD-over-block-length schedule of LLaDA 2.0 (Bie et al. 2025, arXiv 2512.15745: warm-up
    growing the block from small to the full sequence, stable MDLM phase at full length, decay to a compact
    block for BDLM) and is independent of the learning-rate schedule.

    Raises:
        ValueError: empty or invalid schedule, negative step.
    """
    schedule = validate_block_schedule(schedule)
    if not schedule:
        raise ValueError("block_schedule is empty")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    end = 0
    for bl, steps in schedule:
        end += steps
        if step < end:
            break
    return FULL_LENGTH if bl == FULL else int(bl)


def wsd_block_schedule(warmup: Sequence[int], warmup_steps: int, stable_steps: int, decay: Sequence[int],
                       decay_steps: int) -> list[list]:
    """Build a WSD ``block_schedule``: each warm-up length for ``warmup_steps`` steps, ``"full"`` for
    ``stable_steps``, then each decay length for ``decay_steps`` steps (the last one holds afterwards).

    Example: ``wsd_block_schedule([1, 4, 32], 100, 1000, [64, 32], 200)`` ->
    ``[[1, 100], [4, 100], [32, 100], ['full', 1000], [64, 200], [32, 200]]``.

    Raises:
        ValueError: a length < 1 or negative step count (see :func:`validate_block_schedule`).
    """
    sched = [[int(b), warmup_steps] for b in warmup] + [[FULL, stable_steps]]
    sched += [[int(b), decay_steps] for b in decay]
    return validate_block_schedule(sched)


def effective_block_length(block_length: int, seq_len: int) -> int:
    """``min(block_length, seq_len)``: the block length actually in force for rows of length ``seq_len``."""
    return int(min(block_length, seq_len))


__all__ = ["FULL", "FULL_LENGTH", "block_ids", "sample_block_times", "block_diffusion_mask_mod",
           "block_diffusion_mask", "flex_block_mask", "block_diffusion_logits", "validate_block_schedule", "block_length_at",
           "wsd_block_schedule", "effective_block_length"]
