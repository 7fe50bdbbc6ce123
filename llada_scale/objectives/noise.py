"""Masked-diffusion noise: times t, mask probabilities p(t), ELBO loss weights w(t) and the forward process.

Noise schedules and loss weights (masked diffusion with "alpha" = probability a token is still clean):
time t ~ U(eps, 1) (LLaDA's ``(1 - eps) u + eps``, the time-truncated ELBO of MDLM), mask probability
p = 1 - alpha(t), token weight w(t) = -alpha'(t) / (1 - alpha(t)) (MDLM, Sahoo et al. 2024, eq. 10;
MD4, Shi et al. 2024, eq. 5):

=========  =====================  =========================  =====================================
schedule   alpha(t)               p(t) = 1 - alpha(t)        w(t) = -alpha'(t) / (1 - alpha(t))
=========  =====================  =========================  =====================================
linear     1 - t                  t                          1 / t          (LLaDA eq. 3, "1/t")
cosine     cos(pi t / 2)          1 - cos(pi t/2)            (pi/2) sin(pi t/2) / (1 - cos(pi t/2))
                                  = 2 sin^2(pi t / 4)        = (pi/2) cot(pi t / 4)
=========  =====================  =========================  =====================================

The cosine weight follows from sin x = 2 sin(x/2) cos(x/2) and 1 - cos x = 2 sin^2(x/2). The weight is
always evaluated at the same t that produced the mask (Nano-LLaDA's fresh, unrelated t is a bug we avoid).
"""

from __future__ import annotations

import math

import torch

from llada_scale.objectives.config import LOSS_WEIGHTINGS, NOISE_SCHEDULES


def mask_probability(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """Mask probability p(t) = 1 - alpha(t) of a noise schedule (table in the module docstring).

    ``linear``: p = t (LLaDA eq. 1). ``cosine``: p = 1 - cos(pi t / 2), computed as 2 sin^2(pi t / 4) to
    keep precision at small t (MDLM / MD4 cosine schedule).

    Args:
        t: float tensor, any shape, values in [0, 1].
    Returns:
        float tensor of t's shape and dtype.
    Raises:
        ValueError: unknown schedule.
    """
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 2 * torch.sin(math.pi * t / 4) ** 2
    raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, not {schedule!r}")


def loss_weight(t: torch.Tensor, weighting: str = "inverse_t") -> torch.Tensor:
    """Per-token loss weight w(t) = -alpha'(t) / (1 - alpha(t)) (MDLM eq. 10), at the time t of the mask.

    ``inverse_t`` / ``linear``: 1 / t (LLaDA eq. 3; alpha = 1 - t). ``cosine``: (pi/2) cot(pi t / 4)
    (alpha = cos(pi t / 2); derivation in the module docstring). ``none``: 1.

    Args:
        t: float tensor in (0, 1], any shape.
    Returns:
        float tensor of t's shape.
    Raises:
        ValueError: unknown weighting.
    """
    if weighting in ("inverse_t", "linear"):
        return 1.0 / t
    if weighting == "cosine":
        return (math.pi / 2) / torch.tan(math.pi * t / 4)
    if weighting == "none":
        return torch.ones_like(t)
    raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, not {weighting!r}")


def sample_times(batch_size: int, eps: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """t = (1 - eps) u + eps, u ~ U(0, 1): float32 [batch_size] (GUIDELINES.md ``forward_process``)."""
    return (1 - eps) * torch.rand(batch_size, device=device, generator=generator) + eps


def forward_process(input_ids: torch.Tensor, eligible: torch.Tensor, mask_token_id: int, eps: float = 1e-3,
                    generator: torch.Generator | None = None, schedule: str = "linear",
                    t: torch.Tensor | None = None, return_t: bool = False):
    """Masked-diffusion forward (noising) process (LLaDA paper eq. 1; GUIDELINES.md ``forward_process``).

    Time t = (1 - eps) u + eps per row (u ~ U(0, 1)) unless ``t`` is given; each eligible token is replaced
    by ``mask_token_id`` independently with probability p = 1 - alpha(t) (:func:`mask_probability`). For the
    linear schedule p = t, i.e. exactly LLaDA's ``p_mask = (1 - eps) t + eps``. Random draws: ``rand(B)``
    for t (only when ``t`` is None), then ``rand(B, L)`` for the masks.

    Args:
        input_ids: int64 [B, L] clean tokens x_0.
        eligible: bool [B, L], tokens that may be masked (False for SFT prompts).
        schedule: ``linear`` or ``cosine``.
        t: optional float [B] (per row) or [B, L] (per token, e.g. per block) times in (0, 1].
        generator: RNG on ``input_ids.device`` (resumable noise).
        return_t: also return t.
    Returns:
        noisy_ids int64 [B, L] (x_t), masked bool [B, L], p float32 of t's shape ([B] by default: the mask
        probability), and t (same shape) when ``return_t``.
    """
    b, l = input_ids.shape
    if t is None:
        t = sample_times(b, eps, input_ids.device, generator)
    p = mask_probability(t, schedule)
    p_tok = p[:, None] if p.dim() == 1 else p
    masked = (torch.rand(b, l, device=input_ids.device, generator=generator) < p_tok) & eligible
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return (noisy, masked, p, t) if return_t else (noisy, masked, p)
