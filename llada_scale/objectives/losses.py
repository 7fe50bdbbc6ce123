"""Training objectives: autoregressive next-token CE, LLaDA masked diffusion and block diffusion (LLaDA 2.0).

Every objective takes a batch from :mod:`llada_scale.data.loader` (``input_ids``, ``position_ids``,
``document_ids``, ``prompt_mask``, ``padding_mask``, all [B, L]) and a model callable
``model(input_ids, position_ids=..., document_ids=..., attention_mask=...) -> logits [B, L, V]``, and returns
``(loss, stats)`` where ``loss`` is a scalar float32 tensor and ``stats`` holds float32 tensors that may be
summed across ranks (per t-bucket loss sums and counts, token counts).

Pretraining and SFT share one code path: a pretraining batch is an SFT batch whose prompt is empty.

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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llada_scale import block_diffusion as bd

NUM_T_BUCKETS = 5
LOSS_WEIGHTINGS = ("inverse_t", "linear", "cosine", "none")
NOISE_SCHEDULES = ("linear", "cosine")
PAD_POLICIES = ("train", "ignore")
# Which ELBO weightings belong to which schedule ("none" goes with any schedule).
_WEIGHTING_SCHEDULE = {"inverse_t": "linear", "linear": "linear", "cosine": "cosine"}


@dataclass
class ObjectiveConfig:
    """Which loss to train and its knobs (YAML section ``objective``).

    name: ``ar`` (next-token CE), ``diffusion`` (LLaDA masked diffusion) or ``sft`` (AR or diffusion by the
        model's ``causal`` flag; the prompt is never masked and carries no loss).
    eps: minimum time: t = (1 - eps) u + eps with u ~ U(0, 1) (GUIDELINES.md ``forward_process``).
    random_length_prob: probability that a pretraining batch is cut to a random length U{1..L}
        (LLaDA GUIDELINES.md, "We set 1% of the pre-training data to a random length").
    noise_schedule: ``linear`` (LLaDA, p = t) or ``cosine`` (p = 1 - cos(pi t / 2)); see the module docstring.
    loss_weighting: ``inverse_t`` (default; LLaDA eq. 3, w = 1/t), ``linear`` (the ELBO weight of the linear
        schedule, -alpha'/(1-alpha) = 1/t: same as ``inverse_t``), ``cosine`` (the ELBO weight of the cosine
        schedule, (pi/2) cot(pi t / 4)) or ``none`` (unweighted mean CE over the masked tokens of the micro
        batch, as inclusionAI/dFactory trains). ``inverse_t``/``linear`` need ``noise_schedule=linear`` and
        ``cosine`` needs ``noise_schedule=cosine`` (another pairing is not an ELBO).
    sft_pad_policy: ``train`` (LLaDA default: EOS padding of SFT rows is part of the answer, masked and
        trained, so the model learns to stop) or ``ignore`` (padding is never masked and carries no loss).
    cfg_prob: SFT only: probability that a row's whole prompt is replaced by mask tokens (classifier-free
        guidance training, LLaDA paper Appendix B / Nie et al. 2025 unsupervised CFG); the prompt still
        carries no loss. 0 disables.
    block_length: block diffusion (BD3-LM / LLaDA 2.0) with this many tokens per block; 0 = off (plain
        LLaDA diffusion). Mutually exclusive with ``block_schedule``.
    block_schedule: list of ``[block_length, steps]`` phases (block_length an int >= 1 or ``"full"``),
        the WSD schedule over block length of LLaDA 2.0; the last phase's length holds after the schedule
        ends. Non-empty turns block diffusion on. See :func:`llada_scale.block_diffusion.block_length_at`.
    """

    name: str = "diffusion"
    eps: float = 1e-3
    random_length_prob: float = 0.01
    loss_weighting: str = "inverse_t"
    sft_pad_policy: str = "train"
    noise_schedule: str = "linear"
    cfg_prob: float = 0.0
    block_length: int = 0
    block_schedule: list = field(default_factory=list)

    def __post_init__(self):
        if self.name not in ("ar", "diffusion", "sft"):
            raise ValueError(f"objective.name must be ar, diffusion or sft, not {self.name!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"objective.loss_weighting must be one of {LOSS_WEIGHTINGS}, not {self.loss_weighting!r}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"objective.noise_schedule must be one of {NOISE_SCHEDULES}, not {self.noise_schedule!r}")
        want = _WEIGHTING_SCHEDULE.get(self.loss_weighting)
        if want is not None and want != self.noise_schedule:
            raise ValueError(f"objective.loss_weighting={self.loss_weighting} is the ELBO weight of the {want} schedule "
                             f"but objective.noise_schedule={self.noise_schedule}; use loss_weighting="
                             f"{'cosine' if self.noise_schedule == 'cosine' else 'inverse_t'} or none")
        if self.sft_pad_policy not in PAD_POLICIES:
            raise ValueError(f"objective.sft_pad_policy must be one of {PAD_POLICIES}, not {self.sft_pad_policy!r}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"objective.eps must be in [0, 1), got {self.eps}")
        if not 0.0 <= self.cfg_prob < 1.0:
            raise ValueError(f"objective.cfg_prob must be in [0, 1), got {self.cfg_prob}")
        if self.cfg_prob > 0 and self.name != "sft":
            raise ValueError("objective.cfg_prob (classifier-free guidance training) needs objective.name=sft")
        if not isinstance(self.block_length, int) or isinstance(self.block_length, bool) or self.block_length < 0:
            raise ValueError(f"objective.block_length must be an int >= 0 (0 = off), got {self.block_length!r}")
        self.block_schedule = bd.validate_block_schedule(self.block_schedule or [])
        if self.block_length and self.block_schedule:
            raise ValueError("set either objective.block_length (constant) or objective.block_schedule (WSD), not both")
        if self.block_diffusion and self.name == "ar":
            raise ValueError("block diffusion (objective.block_length / block_schedule) needs objective.name "
                             "diffusion or sft")

    @property
    def block_diffusion(self) -> bool:
        """True when block diffusion is on (``block_length > 0`` or a non-empty ``block_schedule``)."""
        return bool(self.block_length) or bool(self.block_schedule)

    def block_length_at(self, step: int) -> int:
        """Block length at optimizer step ``step``: ``block_length``, or the ``block_schedule`` value
        (:data:`llada_scale.block_diffusion.FULL_LENGTH` for ``"full"``). Raises ValueError when block
        diffusion is off."""
        if self.block_schedule:
            return bd.block_length_at(self.block_schedule, step)
        if self.block_length:
            return self.block_length
        raise ValueError("block diffusion is off (objective.block_length=0 and no objective.block_schedule)")


def is_diffusion(cfg: ObjectiveConfig, causal: bool) -> bool:
    """True when ``cfg`` trains a masked-diffusion model (``diffusion``, or ``sft`` of a bidirectional model)."""
    return cfg.name == "diffusion" or (cfg.name == "sft" and not causal)


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


def diffusion_loss(logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                   answer_lengths: torch.Tensor, loss_weighting: str = "inverse_t"):
    """Masked-diffusion loss on the masked tokens.

    Weighted (``inverse_t``, ``linear``, ``cosine``): loss = (1/B) sum_b (1/n_b) sum_{i masked in b}
    w(t_{b,i}) CE(logits[b,i], x_0[b,i]) with w from :func:`loss_weight` (LLaDA eq. 3 and eq. 5; MDLM eq. 10).
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
    with ``block_length`` one t per (document, block) via :func:`llada_scale.block_diffusion.sample_block_times`);
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
        segments = bd.block_ids(position_ids, document_ids, block_length)
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
        logits = bd.block_diffusion_logits(model, noisy, clean, position_ids, document_ids, block_length)
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
