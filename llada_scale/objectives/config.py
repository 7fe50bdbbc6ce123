"""The ``objective`` section of a recipe: which loss to train and its knobs (:class:`ObjectiveConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llada_scale.objectives import block_diffusion as bd


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
        ends. Non-empty turns block diffusion on. See :func:`llada_scale.objectives.block_diffusion.block_length_at`.
    edit_prob: LLaDA 2.1 token-to-token (T2T) editing: fraction of the visible (unmasked), loss-bearing
        positions of x_t that are corrupted; a second loss term restores them. 0 (default) = off.
    edit_loss_weight: weight of the T2T term: loss = M2T + edit_loss_weight x T2T + edit_keep_weight x KEEP
        (default 1).
    edit_keep_weight: with ``edit_prob > 0``, weight of the mean CE on the visible positions left intact (the
        model learns to keep right tokens as well as to repair wrong ones; the editing decoder rewrites every
        committed token whose argmax changed). Default 1; 0 trains the corrupted positions only.
    edit_source: ``random`` (uniform non-special vocabulary tokens) or ``self`` (a no-grad draft pass with
        the chosen positions masked predicts them; the draft's wrong tokens are the corruptions).
    complementary_masking: LLaDA 2.0 SFT: each row also appears with the complementary mask (micro batch x 2).
    mask_ratio_band: ``[low, high]``: t ~ U(low, high) instead of U(eps, 1) (dFactory SFT: [0.3, 0.8]); [] = off.
    sft_block_pad: SFT with block diffusion: the trained EOS padding stops at the end of the block holding
        the conversation's last token (rows as if padded to a multiple of the block length).
    confidence_weight: LLaDA 2.0 CAP loss weight: + weight x mean entropy on the correctly predicted masked
        positions (needs the full logits of the noisy positions). 0 = off.
    See :mod:`llada_scale.objectives.editing` and docs/LLADA2.md.
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
    edit_prob: float = 0.0
    edit_loss_weight: float = 1.0
    edit_keep_weight: float = 1.0
    edit_source: str = "random"
    complementary_masking: bool = False
    mask_ratio_band: list = field(default_factory=list)
    sft_block_pad: bool = False
    confidence_weight: float = 0.0

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
        self._check_llada2()

    def _check_llada2(self):
        """Validate the T2T and LLaDA 2.0 SFT keys (:mod:`llada_scale.objectives.editing`)."""
        extras = self.edit_prob > 0 or self.complementary_masking or self.mask_ratio_band or self.sft_block_pad \
            or self.confidence_weight > 0
        if extras and self.name == "ar":
            raise ValueError("objective.edit_prob / complementary_masking / mask_ratio_band / sft_block_pad / "
                             "confidence_weight need a diffusion objective (objective.name diffusion or sft)")
        if not 0.0 <= self.edit_prob < 1.0:
            raise ValueError(f"objective.edit_prob must be in [0, 1), got {self.edit_prob}")
        if self.edit_loss_weight < 0 or self.edit_keep_weight < 0:
            raise ValueError(f"objective.edit_loss_weight and edit_keep_weight must be >= 0, got "
                             f"{self.edit_loss_weight}, {self.edit_keep_weight}")
        if self.edit_source not in ("random", "self"):
            raise ValueError(f"objective.edit_source must be random or self, not {self.edit_source!r}")
        if self.confidence_weight < 0:
            raise ValueError(f"objective.confidence_weight must be >= 0, got {self.confidence_weight}")
        band = list(self.mask_ratio_band or [])
        if band and not (len(band) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in band)
                         and 0.0 < band[0] <= band[1] <= 1.0):
            raise ValueError(f"objective.mask_ratio_band must be [low, high] with 0 < low <= high <= 1 (e.g. [0.3, 0.8]), "
                             f"got {self.mask_ratio_band!r}")
        self.mask_ratio_band = [float(v) for v in band]
        if self.complementary_masking and self.noise_schedule != "linear":
            raise ValueError("objective.complementary_masking needs noise_schedule=linear (the complement of "
                             "mask ratio t is 1 - t only there)")
        if self.sft_block_pad and not (self.name == "sft" and self.block_diffusion):
            raise ValueError("objective.sft_block_pad needs objective.name=sft with block diffusion "
                             "(objective.block_length or block_schedule)")

    @property
    def block_diffusion(self) -> bool:
        """True when block diffusion is on (``block_length > 0`` or a non-empty ``block_schedule``)."""
        return bool(self.block_length) or bool(self.block_schedule)

    def block_length_at(self, step: int) -> int:
        """Block length at optimizer step ``step``: ``block_length``, or the ``block_schedule`` value
        (:data:`llada_scale.objectives.block_diffusion.FULL_LENGTH` for ``"full"``). Raises ValueError when block
        diffusion is off."""
        if self.block_schedule:
            return bd.block_length_at(self.block_schedule, step)
        if self.block_length:
            return self.block_length
        raise ValueError("block diffusion is off (objective.block_length=0 and no objective.block_schedule)")


def is_diffusion(cfg: ObjectiveConfig, causal: bool) -> bool:
    """True when ``cfg`` trains a masked-diffusion model (``diffusion``, or ``sft`` of a bidirectional model)."""
    return cfg.name == "diffusion" or (cfg.name == "sft" and not causal)
