"""Training objectives: autoregressive next-token CE and LLaDA masked diffusion, for pretraining and SFT.

Every objective takes a batch from :mod:`llada_scale.data.loader` (``input_ids``, ``position_ids``,
``document_ids``, ``prompt_mask``, ``padding_mask``, all [B, L]) and a model callable
``model(input_ids, position_ids=..., document_ids=...) -> logits [B, L, V]``, and returns
``(loss, stats)`` where ``loss`` is a scalar float32 tensor and ``stats`` holds float32 tensors that may be
summed across ranks (per t-bucket loss sums and counts, token counts).

Pretraining and SFT share one code path: a pretraining batch is an SFT batch whose prompt is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_T_BUCKETS = 5
LOSS_WEIGHTINGS = ("inverse_t", "none")
PAD_POLICIES = ("train", "ignore")


@dataclass
class ObjectiveConfig:
    """Which loss to train and its knobs.

    name: ``ar`` (next-token CE), ``diffusion`` (LLaDA masked diffusion) or ``sft`` (AR or diffusion by the
        model's ``causal`` flag; the prompt is never masked and carries no loss).
    eps: LLaDA's minimum mask ratio, p = (1 - eps) t + eps (GUIDELINES.md ``forward_process``).
    random_length_prob: probability that a pretraining batch is cut to a random length U{1..L}
        (LLaDA GUIDELINES.md, "We set 1% of the pre-training data to a random length").
    loss_weighting: ``inverse_t`` (LLaDA eq. 3: CE / p) or ``none`` (plain mean over masked tokens).
    sft_pad_policy: ``train`` (LLaDA default: EOS padding of SFT rows is part of the answer, masked and
        trained, so the model learns to stop) or ``ignore`` (padding is never masked and carries no loss).
    """

    name: str = "diffusion"
    eps: float = 1e-3
    random_length_prob: float = 0.01
    loss_weighting: str = "inverse_t"
    sft_pad_policy: str = "train"

    def __post_init__(self):
        if self.name not in ("ar", "diffusion", "sft"):
            raise ValueError(f"objective.name must be ar, diffusion or sft, not {self.name!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"objective.loss_weighting must be one of {LOSS_WEIGHTINGS}, not {self.loss_weighting!r}")
        if self.sft_pad_policy not in PAD_POLICIES:
            raise ValueError(f"objective.sft_pad_policy must be one of {PAD_POLICIES}, not {self.sft_pad_policy!r}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"objective.eps must be in [0, 1), got {self.eps}")


def is_diffusion(cfg: ObjectiveConfig, causal: bool) -> bool:
    """True when ``cfg`` trains a masked-diffusion model (``diffusion``, or ``sft`` of a bidirectional model)."""
    return cfg.name == "diffusion" or (cfg.name == "sft" and not causal)


def forward_process(input_ids: torch.Tensor, eligible: torch.Tensor, mask_token_id: int, eps: float = 1e-3,
                    generator: torch.Generator | None = None):
    """LLaDA forward (noising) process (LLaDA paper eq. 1-3; GUIDELINES.md ``forward_process``).

    Per row t ~ U(0, 1), p = (1 - eps) t + eps, and each eligible token is replaced by ``mask_token_id``
    independently with probability p.

    Args:
        input_ids: int64 [B, L] clean tokens x_0.
        eligible: bool [B, L], tokens that may be masked (False for SFT prompts).
        generator: RNG on ``input_ids.device`` (resumable noise).
    Returns:
        noisy_ids int64 [B, L] (x_t), masked bool [B, L], p float32 [B] (mask probability per row).
    """
    b, l = input_ids.shape
    t = torch.rand(b, device=input_ids.device, generator=generator)
    p = (1 - eps) * t + eps
    masked = (torch.rand(b, l, device=input_ids.device, generator=generator) < p[:, None]) & eligible
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked, p


def diffusion_loss(logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor, p: torch.Tensor,
                   answer_lengths: torch.Tensor, loss_weighting: str = "inverse_t"):
    """LLaDA masked-diffusion loss, normalised per row by its answer length.

    loss = (1/B) sum_b (1/n_b) sum_{i masked in b} w_b CE(logits[b,i], x_0[b,i]), with w_b = 1/p_b
    (``inverse_t``, LLaDA eq. 3 / GUIDELINES.md SFT loss) or w_b = 1 (``none``). n_b is the number of
    tokens of row b that could be masked: L in pretraining (then this is exactly GUIDELINES.md's
    ``token_loss.sum() / (b * l)``), the answer length in SFT (LLaDA eq. 5 normalisation).

    Args:
        logits: [B, L, V] any float dtype (computed in float32).
        input_ids: int64 [B, L]; masked: bool [B, L]; p: float32 [B]; answer_lengths: [B] (> 0).
    Returns:
        loss: float32 scalar; token_ce: float32 [N] unweighted CE of the N masked tokens (row-major order).
    """
    token_ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
    rows = masked.nonzero()[:, 0]
    w = 1.0 / p[rows] if loss_weighting == "inverse_t" else torch.ones_like(token_ce)
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


def compute_loss(model, batch: dict, cfg: ObjectiveConfig, causal: bool, mask_token_id: int | None,
                 generator: torch.Generator | None = None):
    """Run ``model`` on ``batch`` and return ``(loss, stats)`` for objective ``cfg``.

    stats (float32 tensors, summable across ranks): ``tokens`` (input tokens), ``loss_sum``/``loss_count``
    (the loss and 1, so a cross-rank mean is sum/count) and for diffusion ``t_bucket_ce_sum`` /
    ``t_bucket_count`` [NUM_T_BUCKETS]: unweighted CE of masked tokens by the row's t in equal-width buckets.

    Raises:
        ValueError: a diffusion objective without ``mask_token_id``, or ``ar``/``diffusion`` pretraining on SFT
            data where a prompt would be trained.
    """
    input_ids = batch["input_ids"]
    prompt = batch["prompt_mask"]
    padding = batch["padding_mask"]
    is_sft = cfg.name == "sft"
    if not is_sft and bool(prompt.any()):
        raise ValueError(f"objective {cfg.name!r} got SFT data (prompt tokens); set objective.name=sft")
    stats = {"tokens": torch.tensor(float(input_ids.numel()))}
    if not is_diffusion(cfg, causal):
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
                input_ids, prompt, padding = batch["input_ids"], batch["prompt_mask"], batch["padding_mask"]
        eligible = ~prompt
        if cfg.sft_pad_policy == "ignore":
            eligible = eligible & ~padding
        noisy, masked, p = forward_process(input_ids, eligible, mask_token_id, cfg.eps, generator)
        logits = model(noisy, position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        answer_lengths = eligible.sum(1).clamp(min=1)
        loss, token_ce = diffusion_loss(logits, input_ids, masked, p, answer_lengths, cfg.loss_weighting)
        rows = masked.nonzero()[:, 0]
        t = (p - cfg.eps) / (1 - cfg.eps)
        bucket = (t[rows] * NUM_T_BUCKETS).long().clamp(0, NUM_T_BUCKETS - 1)
        stats["t_bucket_ce_sum"] = torch.zeros(NUM_T_BUCKETS, device=loss.device).index_add_(0, bucket, token_ce.detach())
        stats["t_bucket_count"] = torch.zeros(NUM_T_BUCKETS, device=loss.device).index_add_(
            0, bucket, torch.ones_like(token_ce))
    stats["loss_sum"] = loss.detach().float()
    stats["loss_count"] = torch.tensor(1.0, device=loss.device)
    return loss, stats
