"""Loss guards without a run: bounds on non-finite micro batches and skipped optimizer steps, the ZeRO-0 skip of
a non-finite update (as DeepSpeed's ZeRO optimizers do), early stopping on the validation loss, and the guard's
checkpoint state. (Whole runs: tests/training/test_stops.py.)"""

import math
from types import SimpleNamespace

import pytest
import torch

from llada_scale.training.guards import DivergedError, LossGuard


def guard(**kw):
    cfg = dict(nonfinite="skip", max_consecutive_skips=3, spike_factor=0.0, spike_action="skip", spike_warmup=0,
               early_stop_patience=0, early_stop_min_delta=0.0)
    return LossGuard(SimpleNamespace(**{**cfg, **kw}), rank=1)


def test_nonfinite_micro_batches_in_a_row_stop_the_run():
    g = guard()
    assert g.skip(0, nonfinite=True, loss=0.0) and g.skip(0, nonfinite=True, loss=0.0)
    assert not g.skip(0, nonfinite=False, loss=2.0)  # a usable micro batch resets the count
    assert g.skip(1, nonfinite=True, loss=0.0) and g.skip(1, nonfinite=True, loss=0.0)
    with pytest.raises(DivergedError, match="non-finite loss, micro batch skipped: 3 micro batches in a row"):
        g.skip(1, nonfinite=True, loss=0.0)  # never a livelock of skips
    assert g.skipped == 5
    with pytest.raises(DivergedError, match="step 1: non-finite loss.*train.nonfinite=skip"):
        guard(nonfinite="stop").skip(0, nonfinite=True, loss=0.0)


def test_skipped_optimizer_steps_count_and_stop():
    g = guard()
    g.step_done(0, skipped=False)
    g.step_done(1, skipped=True)
    g.step_done(2, skipped=True)
    g.step_done(3, skipped=False)
    g.step_done(4, skipped=True)
    g.step_done(5, skipped=True)
    assert g.skipped_steps == 4
    with pytest.raises(DivergedError, match=r"step 7: non-finite gradients.*3 optimizer steps in a row skipped"):
        g.step_done(6, skipped=True)
    with pytest.raises(DivergedError, match="train.nonfinite=skip"):
        guard(nonfinite="stop").step_done(0, skipped=True)


def test_zero0_nonfinite_update_leaves_weights_and_adam_state():
    """At ZeRO-0 (fp32) the engine's plain AdamW would step with NaN gradients; the guard turns exactly that
    one step into a no-op, as DeepSpeed's ZeRO 1-3 optimizers skip an overflow step."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    engine = SimpleNamespace(optimizer=opt, bfloat16_enabled=lambda: False)
    w.grad = torch.full((4,), float("nan"))
    assert LossGuard.skip_nonfinite_update(engine, float("nan"))
    opt.step()
    assert torch.equal(w.detach(), torch.ones(4)) and not opt.state
    w.grad = torch.ones(4)
    assert not LossGuard.skip_nonfinite_update(engine, 2.0)  # finite: nothing changes
    opt.step()
    assert not torch.equal(w.detach(), torch.ones(4)) and opt.state[w]["step"] == 1


def test_early_stopping_rule():
    g = guard(early_stop_patience=2, early_stop_min_delta=0.05)
    assert g.validated(100, 3.0) is None
    assert g.validated(200, 2.97) is None  # not better by more than 0.05: 1 bad
    assert g.validated(300, 2.90) is None  # better by 0.10: reset
    assert g.validated(400, float("nan")) is None  # 1 bad
    why = g.validated(500, 2.89)  # 2 bad in a row
    assert why and why.startswith("early stopping at step 500") and "2.9000 at step 300" in why
    assert guard().validated(1, 5.0) is None and guard().validated(1, math.inf) is None  # patience 0: off


def test_guard_state_round_trip():
    g = guard(early_stop_patience=3)
    g.skip(0, nonfinite=True, loss=0.0)
    g.step_done(0, skipped=True)
    g.validated(10, 2.5)
    g.validated(20, 2.6)
    h = guard(early_stop_patience=3)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict() and (h.best_val, h.bad_evals, h.skipped_steps) == (2.5, 1, 1)
    h.load_state_dict({"skipped": 4, "loss_ema": 1.0})  # a checkpoint from before these counters
    assert (h.skipped, h.skipped_steps, h.best_val) == (4, 0, None)
