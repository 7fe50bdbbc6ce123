"""The output head as a memory-lean loss: linear projection + cross-entropy in chunks of positions.

For a vocabulary of V = 126,464 (LLaDA-8B) the logits of a 4096-token row are [4096, V]: 2 GB in float32, and
autograd keeps them (plus the softmax) for the backward. :func:`linear_cross_entropy` never holds more than
``chunk_size`` rows of logits: the forward keeps only each position's log-sum-exp, and the backward recomputes
one chunk of logits at a time and turns it into the gradients of the hidden states and of the head weight
(the recomputation approach of Cut Cross-Entropy, Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary
Language Models", arXiv 2411.09009; Liger Kernel's fused linear cross-entropy does the same in Triton). Cost:
one extra head matmul per position in the backward. Written in plain PyTorch so it runs on CPU and CUDA and
under DeepSpeed ZeRO-3 (the weight is saved like ``F.linear`` saves it).

:class:`llada_scale.model.transformer.Transformer` calls it inside its forward when given ``labels``, so the
head weight is only ever read inside a module forward (which ZeRO-3 needs to gather it).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a position without loss (PyTorch's cross_entropy default ignore_index)
CHUNK_ELEMENTS = 2**25  # logits per chunk: 128 MiB in float32 (265 positions at vocab 126,464)


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one chunk of float32 logits has about :data:`CHUNK_ELEMENTS` elements."""
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            logits = (hidden[s:s + chunk_size] @ weight.t()).float()  # matmul in the model dtype, like F.linear
            lse[s:s + chunk_size] = torch.logsumexp(logits, -1)
            target[s:s + chunk_size] = logits.gather(1, labels[s:s + chunk_size, None])[:, 0]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        return lse - target

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk_size
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # One chunk: addmm_ straight into the weight's dtype. Several: each chunk's product (float32 inside the
        # matmul, rounded once to the model dtype) is summed in float32 and cast back at the end; a bf16 running
        # sum rounds once per chunk (3.7e-3 vs 2.2e-3 relative error at vocab 126k, issue 21).
        grad_weight = None
        if ctx.needs_input_grad[1]:
            many = hidden.shape[0] > chunk and weight.dtype != torch.float32
            grad_weight = torch.zeros_like(weight, dtype=torch.float32 if many else weight.dtype)
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = (h @ weight.t()).float()
            # d CE / d logits = softmax - onehot(label), scaled by the incoming gradient of each position
            probs = logits.sub_(lse[s:s + chunk, None]).exp_()
            probs[rows[:h.shape[0]], labels[s:s + chunk]] -= 1
            g = probs.mul_(grad_ce[s:s + chunk, None].float()).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[s:s + chunk] = g @ weight
            if grad_weight is not None and grad_weight.dtype == g.dtype:
                grad_weight.addmm_(g.t(), h)
            elif grad_weight is not None:
                grad_weight.add_(g.t() @ h)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Per-position cross-entropy of ``hidden @ weight.T`` against ``labels``, in chunks of positions.

    Equals ``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="none")`` (values and
    gradients, up to float rounding) without the [N, V] logits ever existing at once. The weight gradient is
    summed over chunks in place in the weight's dtype (each chunk's matmul accumulates in float32 inside, as
    ``F.linear``'s backward does; with bf16 weights and more than one chunk the running sum is float32 and
    cast to bf16 once at the end, so the error stays that of one chunk). Memory: one [chunk_size, V] float32
    block plus the [V, d] weight gradient that any head needs; with bf16 weights and several chunks, a float32
    [V, d] sum and one [V, d] bf16 product besides (3 GB at the 8B shape, V = 126,464, d = 4096).

    Args:
        hidden: [N, d] in the model dtype (positions that carry a loss only).
        weight: [V, d] head matrix (same dtype as ``hidden``).
        labels: int64 [N], each in [0, V) (no ignore index here: select the positions first).
        chunk_size: positions per chunk; default :func:`default_chunk_size` of V.
    Returns:
        float32 [N]: cross-entropy (natural log) of each position.
    """
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size or default_chunk_size(weight.shape[0]))


__all__ = ["IGNORE_INDEX", "CHUNK_ELEMENTS", "default_chunk_size", "linear_cross_entropy"]


def head_forward(hidden_states: Callable[[], torch.Tensor], output_weight: Callable[[], torch.Tensor],
                 labels: torch.Tensor | None) -> torch.Tensor:
    """A language model's output from its decoder (``hidden_states()`` -> [B, L, d]) and head weight
    (``output_weight()`` -> [V, d]), both read inside the caller's forward (ZeRO-3 gathers them there).

    Returns:
        ``labels`` None: the logits [B, L, V] in the hidden states' dtype. Otherwise the float32 per-position
        cross-entropy [B, L] (0 where ``labels`` is :data:`IGNORE_INDEX`) through :func:`linear_cross_entropy` on
        the labelled positions only; these are selected before the decoder runs, so the host waits (``nonzero``)
        only for the few small ops that made the labels, not for the forward.
    """
    if labels is None:
        return F.linear(hidden_states(), output_weight())
    keep = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden_states()
    ce = linear_cross_entropy(h.reshape(-1, h.shape[-1]).index_select(0, keep), output_weight(),
                              labels.reshape(-1).index_select(0, keep))
    return ce.new_zeros(labels.numel()).index_copy(0, keep, ce).view(labels.shape)
