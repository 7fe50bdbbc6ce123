"""The block-diffusion attention layout (BD3-LM / LLaDA 2.0): ``[x_t ; x_0]`` rows, their blocks and mask.

The training input is the noisy row and the clean row side by side, ``[x_t ; x_0]`` (length 2L), with the
same ``position_ids`` (and document ids) for both halves. Tokens are cut into blocks of ``block_length``
consecutive positions *within a document* (block index = ``position_ids // block_length``, so blocks start at
each document's position 0, exactly where the sampler of :mod:`llada_scale.sampling.block` starts them).
The attention mask (Arriola et al. 2025, "Block Diffusion", Sec. 3 / kuleshov-group/bd3lms
``models/dit.py::block_diff_mask``: M_BD | M_OBC | M_BC), always restricted to the same document:

* noisy query -> noisy key of the *same* block (block diagonal, M_BD);
* noisy query -> clean key of a *strictly earlier* block (offset block-causal, M_OBC);
* clean query -> clean key of the same or an earlier block (block-causal, M_BC).

Clean tokens never see noisy ones, so the clean half is exactly what a KV cache of finished blocks holds at
inference time. The objective (per-block noise, the block-length schedule) is in
:mod:`llada_scale.objectives.block_diffusion`; this module depends only on :mod:`llada_scale.model.attention`.
"""

from __future__ import annotations

import torch

from llada_scale.model import attention
from llada_scale.model.head import IGNORE_INDEX

FLEX_BLOCK_SIZE = 128  # FlexAttention tile (create_block_mask BLOCK_SIZE), passed explicitly


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
        # M_BD, noisy-noisy only (clean-clean of one block is inside M_BC). No ``==`` between the two booleans:
        # inductor's value-range pass rejects it ("A Boolean argument can only be used in Eq and Ne"), which
        # killed the compiled create_block_mask of every CUDA block-diffusion step (issue 21).
        diagonal = ~q_clean & ~kv_clean & (bq == bkv)
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
        backend: ``auto`` | ``sdpa`` | ``flex`` (see :func:`llada_scale.model.attention.resolve_backend`).
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
    return attention.block_mask(mod, b, 2 * length, 2 * length, segments.device, BLOCK_SIZE=block_size)


def _model_backend(model) -> str:
    for m in (model, getattr(model, "module", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "attention_backend"):
            return cfg.attention_backend
    return "auto"


def block_diffusion_logits(model, noisy_ids: torch.Tensor, clean_ids: torch.Tensor, position_ids: torch.Tensor,
                           document_ids: torch.Tensor | None, block_length: int, backend: str | None = None,
                           labels: torch.Tensor | None = None):
    """Run ``model`` on ``[x_t ; x_0]`` with the block-diffusion mask and return the noisy half's logits
    (or, with ``labels``, its per-token cross-entropy).

    Args:
        model: callable ``model(input_ids, position_ids=..., attention_mask=...) -> logits`` (a
            :class:`llada_scale.model.transformer.Transformer` or an engine wrapping one).
        noisy_ids, clean_ids: int64 [B, L] (x_t and the clean context x_0; under classifier-free-guidance
            training the dropped prompt is masked in both).
        position_ids: int64 [B, L] (used for both halves); document_ids: int [B, L] or None.
        block_length: tokens per block (>= 1).
        backend: mask backend; default the model config's ``attention_backend``.
        labels: optional int64 [B, L] targets of the noisy positions (-100 = no loss); the model is then called
            with ``labels`` (-100 on the whole clean half, so the head never runs there).
    Returns:
        logits [B, L, V] at the noisy positions, in the model's dtype; with ``labels`` float32 [B, L]
        cross-entropy (0 where the label is -100).
    Raises:
        ValueError: ``block_length < 1`` or a bad backend.
    """
    length = noisy_ids.shape[1]
    segments = block_ids(position_ids, document_ids, block_length)
    mask = block_diffusion_mask(segments, document_ids, backend or _model_backend(model))
    ids = torch.cat([noisy_ids, clean_ids], 1)
    pos = torch.cat([position_ids, position_ids], 1)
    if labels is None:
        return model(ids, position_ids=pos, attention_mask=mask)[:, :length]
    return model(ids, position_ids=pos, attention_mask=mask,
                 labels=torch.cat([labels, torch.full_like(labels, IGNORE_INDEX)], 1))[:, :length]


__all__ = ["FLEX_BLOCK_SIZE", "block_ids", "block_diffusion_mask_mod", "block_diffusion_mask", "flex_block_mask",
           "block_diffusion_logits"]
