"""Learning-rate schedules as multipliers of the peak LR, for ``torch.optim.lr_scheduler.LambdaLR``.

DeepSpeed ships WarmupLR / WarmupDecayLR / WarmupCosineLR but no warmup-stable-decay, so both schedules
are written here once as pure functions of the step and handed to DeepSpeed as a client scheduler
(DeepSpeed saves and restores its state with the checkpoint).
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, schedule: str, max_steps: int, warmup_steps: int, min_lr_ratio: float,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier in [min_lr_ratio, 1] of the peak learning rate at optimizer step ``step`` (0-based).

    - warmup (all schedules): linear from 1/warmup_steps to 1 over ``warmup_steps`` steps.
    - ``wsd`` (warmup-stable-decay; Hu et al. 2024, MiniCPM, sec. 4): constant 1, then a linear decay to
      ``min_lr_ratio`` over the last ``decay_fraction * max_steps`` steps.
    - ``cosine`` (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts): from 1 down to ``min_lr_ratio``.
    - ``constant``: 1 after warmup.

    Raises ValueError for an unknown schedule.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * max_steps)))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        frac = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * frac
    if schedule == "cosine":
        frac = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"optim.schedule must be wsd, cosine or constant, not {schedule!r}")
