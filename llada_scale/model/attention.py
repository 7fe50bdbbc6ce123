"""Attention masks and the attention call, on two backends.

A mask is written once as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` and realised either as
a FlexAttention ``BlockMask`` (CUDA: sparse, skips fully-masked tiles; built by a compiled
``create_block_mask``) or as a dense boolean tensor
[B, 1, Lq, Lk] for ``scaled_dot_product_attention`` (CPU: FlexAttention has no CPU backward in torch 2.13).
The dense path evaluates the same ``mask_mod`` on broadcast index tensors, so both backends share one
definition of every mask (document, causal, block diffusion).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

try:  # FlexAttention (torch >= 2.5)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = None  # type: ignore[assignment]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CAUSAL = "causal"  # sentinel: plain causal attention, no document ids (SDPA is_causal fast path)
_compiled_flex = None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``auto`` -> ``flex`` on CUDA, ``sdpa`` elsewhere. Raises ValueError for unknown names.

    ``flex`` on CPU runs forward passes only (torch 2.13 has no FlexAttention CPU backward); use it for
    evaluation or tests, never for CPU training.
    """
    device = torch.device(device)
    if backend == "auto":
        return "flex" if device.type == "cuda" and BlockMask is not None else "sdpa"
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"attention_backend must be auto, sdpa or flex, not {backend!r}")
    if backend == "flex" and BlockMask is None:
        raise ValueError("attention_backend=flex needs torch >= 2.5 (FlexAttention); use sdpa")
    return backend


def compile_mask(device) -> bool:
    """Whether ``create_block_mask`` runs compiled: on CUDA (eager it materialises the [B, Lq, Lk] boolean
    mask, 0.5 GB per row at L = 16k, and is slow; compiled it works tile by tile). Shapes are static in training,
    so it compiles once per (batch, length)."""
    return torch.device(device).type == "cuda"


def document_mask_mod(document_ids: torch.Tensor, causal: bool) -> MaskMod:
    """Mask: attend only within the same document id, and only to earlier positions when ``causal``.

    Args:
        document_ids: int [B, L] segment ids from the packer.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        same = document_ids[b, q_idx] == document_ids[b, kv_idx]
        return same & (kv_idx <= q_idx) if causal else same

    return mask_mod


def mask_from_mod(mask_mod: MaskMod, batch_size: int, q_len: int, kv_len: int, device, backend: str = "auto"):
    """Realise ``mask_mod`` for one backend.

    Returns:
        ``BlockMask`` (flex) or bool tensor [batch_size, 1, q_len, kv_len], True = may attend (sdpa).
    """
    backend = resolve_backend(backend, device)
    if backend == "flex":
        return create_block_mask(mask_mod, batch_size, None, q_len, kv_len, device=device,
                                 _compile=compile_mask(device))
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    q = torch.arange(q_len, device=device)[None, None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    return mask_mod(b, h, q, kv).expand(batch_size, 1, q_len, kv_len)


def build_mask(document_ids: torch.Tensor | None, causal: bool, q_len: int, kv_len: int, batch_size: int,
               device, backend: str = "auto"):
    """The standard mask for a packed batch: document-restricted, causal or bidirectional.

    Returns None (full bidirectional attention) or :data:`CAUSAL` when there are no document ids,
    otherwise what :func:`mask_from_mod` returns.
    """
    if document_ids is None:
        if not causal:
            return None
        if resolve_backend(backend, device) == "sdpa":
            return CAUSAL
        return mask_from_mod(lambda b, h, q, kv: kv <= q, batch_size, q_len, kv_len, device, backend)
    return mask_from_mod(document_mask_mod(document_ids, causal), batch_size, q_len, kv_len, device, backend)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] with Hq a multiple of Hkv.
        mask: None (full), :data:`CAUSAL`, bool tensor [B, 1, Lq, Lk] (True = attend) or ``BlockMask``.
    Returns:
        [B, Hq, Lq, D] in q's dtype.
    """
    gqa = q.shape[1] != k.shape[1]
    if BlockMask is not None and isinstance(mask, BlockMask):
        if q.device.type != "cuda":  # eager reference path (forward only on CPU)
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        global _compiled_flex
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
