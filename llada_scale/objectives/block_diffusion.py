"""Block diffusion objective (BD3-LM / LLaDA 2.0): per-block noise and the block-length WSD schedule.

The model input is the ``[x_t ; x_0]`` layout with the block-diffusion mask of
:mod:`llada_scale.model.block_attention`. Each block draws its own time t (LLaDA 2.0 / BD3-LM: one noise
level per block); the loss is the masked-diffusion loss of :func:`llada_scale.objectives.losses.diffusion_loss`
on the noisy half. The block length may follow a warmup-stable-decay schedule over training steps (LLaDA 2.0).
"""

from __future__ import annotations

from typing import Sequence

import torch

FULL = "full"  # block_schedule value meaning "the whole row is one block" (plain LLaDA masked diffusion)
FULL_LENGTH = 2**31 - 1  # integer stand-in for FULL: any block length >= the row length is one block


# ---------------------------------------------------------------------------------------------- noise
def sample_block_times(segments: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One diffusion time per block, broadcast to its tokens.

    u ~ U(0, 1) per segment, t = (1 - eps) u + eps (LLaDA GUIDELINES.md ``forward_process``; one t per block
    as in BD3-LM, Arriola et al. 2025, Sec. 3, kuleshov-group/bd3lms ``diffusion.py``, and LLaDA 2.0). Draws ``rand(B, S)`` with S = number of segments of the longest
    row, so a batch whose rows are single blocks consumes exactly the random numbers of plain LLaDA's
    ``rand(B)`` (same seed -> same noise).

    Args:
        segments: int64 [B, L] from :func:`llada_scale.model.block_attention.block_ids`.
    Returns:
        t: float32 [B, L] in [eps, 1], constant over each segment.
    """
    num = int(segments.max()) + 1
    u = torch.rand(segments.shape[0], num, device=segments.device, generator=generator)
    return (1 - eps) * u.gather(1, segments) + eps


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


__all__ = ["FULL", "FULL_LENGTH", "sample_block_times", "validate_block_schedule", "block_length_at",
           "wsd_block_schedule", "effective_block_length"]
