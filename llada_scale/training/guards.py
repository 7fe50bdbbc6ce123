"""Loss guards: what the trainer does with a non-finite or spiking micro-batch loss.

Both rules act on values every rank agrees on (the trainer all-reduces a "non-finite anywhere" flag and the
largest finite micro-batch loss over ranks), so every rank takes the same decision at the same micro step.
"""

from __future__ import annotations

import logging

from llada_scale.training.engine import TrainError

log = logging.getLogger("llada_scale")


class LossGuard:
    """Skip or stop on non-finite losses (``train.nonfinite``) and loss spikes (``train.spike_*``).

    Args:
        cfg: the ``train`` section (:class:`llada_scale.training.config.TrainLoopConfig`): ``nonfinite``,
            ``spike_factor``, ``spike_action``, ``spike_warmup``.
        rank: this process's rank (rank 0 logs).
        logger: optional :class:`llada_scale.training.metrics.Logger` that records spikes in metrics.jsonl.

    State kept in checkpoints: :attr:`skipped` (micro batches dropped so far) and :attr:`loss_ema`.
    """

    EMA_DECAY = 0.99  # running mean over roughly the last 100 micro batches
    MAX_CONSECUTIVE = 20  # this many spikes in a row: the loss level really changed, stop

    def __init__(self, cfg, rank: int = 0, logger=None):
        self.cfg = cfg
        self.rank = rank
        self.logger = logger
        self.skipped = 0
        self.loss_ema: float | None = None  # running mean of the (max over ranks) micro-batch loss
        self.spike_run = 0  # consecutive micro batches skipped as spikes

    def skip(self, step: int, nonfinite: bool, loss: float) -> bool:
        """Whether every rank drops this micro batch (no backward); raises TrainError to stop the run.

        Args:
            step: the optimizer step (0-based) the micro batch belongs to.
            nonfinite: the loss was NaN/inf on some rank (all-reduced).
            loss: the largest finite micro-batch loss over ranks (ignored when ``nonfinite``).
        Raises:
            TrainError: ``train.nonfinite=stop`` on a non-finite loss, ``train.spike_action=stop`` on a spike,
                or :attr:`MAX_CONSECUTIVE` spikes in a row.
        """
        if nonfinite:
            self.skipped += 1
            if self.rank == 0:
                log.warning(f"step {step}: non-finite loss, micro batch skipped ({self.skipped} so far)")
            if self.cfg.nonfinite == "stop":
                raise TrainError(f"non-finite loss at step {step}; lower optim.lr or set train.nonfinite=skip")
            return True
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
