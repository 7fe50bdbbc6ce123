"""Loss guards: what the trainer does with a non-finite or spiking micro-batch loss, with optimizer steps that
were skipped for non-finite gradients, and when the validation loss stops improving (early stopping).

Every rule acts on values every rank agrees on (the trainer all-reduces a "non-finite anywhere" flag and the
largest finite micro-batch loss over ranks; DeepSpeed's ZeRO optimizers all-reduce their overflow check; the
ZeRO-0 gradient norm is taken after the gradient all-reduce; the validation loss is all-reduced), so every
rank takes the same decision at the same micro step.
"""

from __future__ import annotations

import logging
import math

from llada_scale.training.engine import TrainError

log = logging.getLogger("llada_scale")


class DivergedError(TrainError):
    """Too many skipped micro batches / optimizer steps in a row (or ``train.nonfinite=stop``). The weights are
    those of the last applied step (skipped steps do not change them); the trainer saves them, then stops."""


class LossGuard:
    """Skip or stop on non-finite losses (``train.nonfinite``), loss spikes (``train.spike_*``), skipped optimizer
    steps (non-finite gradients) and a stalled validation loss (``train.early_stop_*``).

    Args:
        cfg: the ``train`` section (:class:`llada_scale.training.config.TrainLoopConfig`): ``nonfinite``,
            ``max_consecutive_skips``, ``spike_factor``, ``spike_action``, ``spike_warmup``,
            ``early_stop_patience``, ``early_stop_min_delta``.
        rank: this process's rank (rank 0 logs).
        logger: optional :class:`llada_scale.training.metrics.Logger` that records spikes in metrics.jsonl.

    State kept in checkpoints (:meth:`state_dict`): :attr:`skipped` (micro batches dropped so far),
    :attr:`skipped_steps` (optimizer steps skipped), :attr:`loss_ema`, and the early-stopping record.
    """

    EMA_DECAY = 0.99  # running mean over roughly the last 100 micro batches
    MAX_CONSECUTIVE = 20  # this many spikes in a row: the loss level really changed, stop

    def __init__(self, cfg, rank: int = 0, logger=None):
        self.cfg = cfg
        self.rank = rank
        self.logger = logger
        self.skipped = 0
        self.skipped_steps = 0
        self.loss_ema: float | None = None  # running mean of the (max over ranks) micro-batch loss
        self.spike_run = 0  # consecutive micro batches skipped as spikes
        self.nonfinite_run = 0  # consecutive micro batches skipped for a non-finite loss
        self.step_run = 0  # consecutive optimizer steps skipped for non-finite gradients
        self.best_val: float | None = None  # early stopping: best validation loss so far
        self.best_step: int | None = None
        self.bad_evals = 0  # validations since best_val improved by more than early_stop_min_delta

    # -- checkpoint state
    def state_dict(self) -> dict:
        """The guard's part of the checkpoint client state."""
        return {"skipped": self.skipped, "skipped_steps": self.skipped_steps, "loss_ema": self.loss_ema,
                "early_stop": {"best_val": self.best_val, "best_step": self.best_step, "bad_evals": self.bad_evals}}

    def load_state_dict(self, client: dict) -> None:
        """Restore from a checkpoint's client state (older checkpoints lack some keys: defaults then)."""
        self.skipped, self.loss_ema = client.get("skipped", 0), client.get("loss_ema")
        self.skipped_steps = client.get("skipped_steps", 0)
        es = client.get("early_stop") or {}
        self.best_val, self.best_step, self.bad_evals = es.get("best_val"), es.get("best_step"), es.get("bad_evals", 0)

    # -- micro batches
    def skip(self, step: int, nonfinite: bool, loss: float) -> bool:
        """Whether every rank drops this micro batch (no backward); raises TrainError to stop the run.

        Args:
            step: the optimizer step (0-based) the micro batch belongs to.
            nonfinite: the loss was NaN/inf on some rank (all-reduced).
            loss: the largest finite micro-batch loss over ranks (ignored when ``nonfinite``).
        Raises:
            DivergedError: ``train.nonfinite=stop`` on a non-finite loss, or ``train.max_consecutive_skips``
                non-finite micro batches in a row (the weights themselves are no longer usable).
            TrainError: ``train.spike_action=stop`` on a spike, or :attr:`MAX_CONSECUTIVE` spikes in a row.
        """
        if nonfinite:
            self.skipped += 1
            self.nonfinite_run += 1
            self._bound(f"step {step + 1}: non-finite loss, micro batch skipped", self.nonfinite_run,
                        "micro batches", self.skipped)
            return True
        self.nonfinite_run = 0
        return self.is_spike(step, loss)

    def is_spike(self, step: int, loss: float) -> bool:
        """Loss-spike rule on the largest micro-batch loss over ranks (identical on every rank).

        With ``train.spike_factor`` > 0 and after ``train.spike_warmup`` steps, a micro batch whose loss
        exceeds spike_factor x the running mean (EMA, decay :attr:`EMA_DECAY`) is a spike:
        ``train.spike_action=skip`` drops it on every rank (no backward, counted in :attr:`skipped`, logged),
        ``stop`` raises TrainError. Spikes do not update the running mean. Returns True when the micro batch
        is to be skipped.
        """
        t = self.cfg
        ema = self.loss_ema
        if t.spike_factor > 0 and ema is not None and step >= t.spike_warmup and loss > t.spike_factor * ema:
            self.spike_run += 1
            self.skipped += 1
            msg = (f"step {step}: loss spike, micro-batch loss {loss:.4f} > train.spike_factor "
                   f"{t.spike_factor} x running mean {ema:.4f}")
            if t.spike_action == "stop":
                raise TrainError(f"{msg}; lower optim.lr, raise train.spike_factor or set train.spike_action=skip")
            if self.spike_run >= self.MAX_CONSECUTIVE:
                raise TrainError(f"{msg}: {self.spike_run} spikes in a row, the loss level has changed; raise "
                                 "train.spike_factor or set it to 0 (off)")
            if self.rank == 0:
                log.warning(f"{msg}: micro batch skipped ({self.skipped} skipped so far)")
                if self.logger is not None:
                    self.logger.log(step, {"train/spike_loss": loss, "train/spike_mean": ema})
            return True
        self.spike_run = 0
        d = self.EMA_DECAY
        self.loss_ema = loss if ema is None else d * ema + (1 - d) * loss
        return False

    # -- optimizer steps
    @staticmethod
    def skip_nonfinite_update(engine, grad_norm: float) -> bool:
        """ZeRO-0 fp32: when the (all-reduced) gradient norm is NaN/inf, make the coming ``engine.step()`` leave
        the weights and the optimizer state alone, as DeepSpeed's ZeRO 1-3 and bf16 optimizers do on their own
        (without this, clipping turns the inf into NaN weights). The optimizer's ``step`` is replaced for that
        one call; DeepSpeed still clips, zeroes the gradients and advances its counters and the LR schedule.
        Returns True when the step is skipped (for :meth:`step_done`). (ZeRO-0 never runs in bf16:
        :func:`llada_scale.training.engine.build_ds_config` refuses it.)"""
        if math.isfinite(grad_norm):
            return False
        opt = engine.optimizer

        def skipped_step(*args, **kwargs):
            del opt.step  # back to the class's step for the next optimizer step

        opt.step = skipped_step
        return True

    def step_done(self, step: int, skipped: bool) -> None:
        """Account for the optimizer step that just ended (call at every gradient-accumulation boundary).

        Args:
            step: the optimizer step (0-based).
            skipped: DeepSpeed skipped it (``engine.skipped_steps`` grew: non-finite gradients) or, at ZeRO-0,
                the gradient norm was not finite (see :meth:`skip_nonfinite_update`).
        Raises:
            DivergedError: a skipped step with ``train.nonfinite=stop``, or ``train.max_consecutive_skips``
                skipped steps in a row.
        """
        if not skipped:
            self.step_run = 0
            return
        self.skipped_steps += 1
        self.step_run += 1
        self._bound(f"step {step + 1}: non-finite gradients, optimizer step skipped", self.step_run,
                    "optimizer steps", self.skipped_steps)

    def _bound(self, what: str, run: int, unit: str, total: int) -> None:
        """The stop rules shared by skipped micro batches and skipped optimizer steps; else a warning (rank 0)."""
        if self.cfg.nonfinite == "stop":
            raise DivergedError(f"{what}; lower optim.lr or set train.nonfinite=skip")
        if run >= self.cfg.max_consecutive_skips:
            raise DivergedError(f"{what}: {run} {unit} in a row skipped (train.max_consecutive_skips="
                                f"{self.cfg.max_consecutive_skips}), the run has diverged; lower optim.lr")
        if self.rank == 0:
            log.warning(f"{what} ({total} so far)")

    # -- validation
    def validated(self, step: int, val_loss: float) -> str | None:
        """Early stopping (``train.early_stop_patience`` > 0): record a validation loss; returns why the run
        should stop now, or None.

        The loss improves when it is below the best so far by more than ``train.early_stop_min_delta``;
        after ``early_stop_patience`` validations in a row without improvement the run stops (Nano-LLaDA's
        ``--early-stop-patience`` / ``--early-stop-min-delta``, counted in validations). A non-finite
        validation loss never improves.
        """
        t = self.cfg
        if t.early_stop_patience <= 0:
            return None
        if math.isfinite(val_loss) and (self.best_val is None or val_loss < self.best_val - t.early_stop_min_delta):
            self.best_val, self.best_step, self.bad_evals = val_loss, step, 0
            return None
        self.bad_evals += 1
        if self.bad_evals < t.early_stop_patience:
            return None
        best = "none" if self.best_val is None else f"{self.best_val:.4f} at step {self.best_step}"
        return (f"early stopping at step {step}: validation loss {val_loss:.4f} has not improved on the best "
                f"({best}) by more than train.early_stop_min_delta={t.early_stop_min_delta} for "
                f"{self.bad_evals} validations (train.early_stop_patience={t.early_stop_patience})")
