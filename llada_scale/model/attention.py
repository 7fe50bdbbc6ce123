"""Attention masks and the attention call, on two backends.

A mask is written once as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` and realised either as
a FlexAttention ``BlockMask`` (CUDA: sparse, skips fully-masked tiles; built by a compiled
``create_block_mask``) or as a dense boolean tensor
[B, 1, Lq, Lk] for ``scaled_dot_product_attention`` (CPU: FlexAttention has no CPU backward in torch 2.13).
The dense path evaluates the same ``mask_mod`` on broadcast index tensors, so both backends share one
definition of every mask (document, causal, block diffusion).

The CUDA code paths (``create_block_mask`` and ``flex_attention`` compiled once here, at import) run on CPU
inductor too when the environment sets ``LLADA_COMPILE_ON_CPU=1`` (:func:`cuda_paths`): the "CPU twin" that
lets the CPU tests compile every ``mask_mod`` and the flex forward exactly as a GPU run does (forward only:
no FlexAttention backward on CPU).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

try:  # FlexAttention (torch >= 2.5)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = None  # type: ignore[assignment]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CAUSAL = "causal"  # sentinel: plain causal attention, no document ids (SDPA is_causal fast path)
CPU_TWIN_ENV = "LLADA_COMPILE_ON_CPU"  # "1": run the CUDA code paths (compiled mask + flex) on CPU inductor

# Compiled once, here: ``create_block_mask(..., _compile=True)`` is deprecated in torch 2.13, and a compiled
# function created lazily inside a compiled, checkpointed layer is a side effect dynamo graph-breaks on (the
# checkpointed layers then run eager for the whole run). torch.compile only wraps here; it compiles at the
# first call, once per mask_mod / shape.
if BlockMask is not None:
    compiled_create_block_mask = torch.compile(create_block_mask)
    compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


def cuda_paths(device) -> bool:
    """Whether ``device`` runs the CUDA code paths: compiled ``create_block_mask`` and compiled ``flex_attention``.

    True on CUDA; on CPU only when the environment sets ``LLADA_COMPILE_ON_CPU=1`` (the CPU twin used by the
    tests and ``benchmarks/gpu_check.py --cpu-dry-run``; inductor compiles for CPU as it does for CUDA, so a
    mask or kernel that fails to compile fails here too). The variable also turns ``train.compile=auto`` on
    for CPU (:func:`llada_scale.training.parallelize.resolve_compile`).
    """
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get(CPU_TWIN_ENV, "") == "1")


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
    """Whether ``create_block_mask`` runs compiled: where :func:`cuda_paths` (eager it materialises the
    [B, Lq, Lk] boolean mask, 0.5 GB per row at L = 16k, and is slow; compiled it works tile by tile). Shapes are
    static in training, so it compiles once per (batch, length)."""
    return cuda_paths(device)


def block_mask(mask_mod: MaskMod, batch_size: int, q_len: int, kv_len: int, device, **kwargs):
    """``create_block_mask(mask_mod, batch_size, None, q_len, kv_len, device=device, **kwargs)``, through the
    module's compiled ``create_block_mask`` where :func:`compile_mask` (one head dimension: every mask here is
    the same for all heads)."""
    make = compiled_create_block_mask if compile_mask(device) else create_block_mask
    return make(mask_mod, batch_size, None, q_len, kv_len, device=device, **kwargs)


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
        return block_mask(mask_mod, batch_size, q_len, kv_len, device)
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
        if not cuda_paths(q.device):  # eager reference path (forward only on CPU)
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        return compiled_flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
