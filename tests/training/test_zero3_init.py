"""ZeRO-3 start-up without a full model per rank (issue 19, item 1): the partitioned build (deepspeed.zero.Init)
and the streamed ``train.init_from`` give the same weights and losses as the unpartitioned start-up
(``train.zero3_init=false``), on 2 processes, from random weights, a consolidated directory and a DeepSpeed
checkpoint. Resume at ZeRO-3 (which now always builds partitioned) is covered by test_train's resume test."""

import pytest
import torch

from llada_scale.checkpoint import load_model_state
from llada_scale.testing import train_losses
from tests.checkpoint.test_convert import convert
from tests.training.test_train import train

COMMON = ["train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=4", "train.save_every=0",
          "objective.random_length_prob=0.3"]


@pytest.mark.distributed
def test_partitioned_start_equals_full_model_start(tmp_path, pretrain_shards):
    runs = {}
    for name, flag in (("part", "true"), ("full", "false")):
        runs[name] = tmp_path / f"ar_{name}"
        train(runs[name], pretrain_shards, *COMMON, "train.max_steps=1", "train.init_from=", f"train.zero3_init={flag}",
              world=2, ds="ds_configs/zero3.json", recipe="configs/ar_pretrain_tiny.yaml")
    assert train_losses(runs["part"]) == train_losses(runs["full"]) and len(train_losses(runs["part"])) == 1
    # The start-up weights are the same numbers; after the step they agree to a tenth of one update (lr at
    # step 1 = 3e-3 / 30 warmup steps = 1e-4; a wrong init would differ by ~0.02): the partitions are laid out in
    # another order, so gradient reductions are summed in another order, and Adam's m / (sqrt(v) + eps) turns
    # that last-bit difference into a visible one where a gradient is near zero.
    a, b = load_model_state(str(runs["part"]))[0], load_model_state(str(runs["full"]))[0]
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst

    cons = tmp_path / "cons"
    assert convert("consolidate", runs["part"], cons, "--dtype", "fp32", "--quiet") == 0
    losses = {}
    for name, src, flag in (("cons_part", cons, "true"), ("cons_full", cons, "false"),
                            ("ds_part", runs["part"], "true")):
        train(tmp_path / name, pretrain_shards, *COMMON, f"train.init_from={src}", f"train.zero3_init={flag}",
              world=2, ds="ds_configs/zero3.json")
        losses[name] = train_losses(tmp_path / name)
    assert losses["cons_part"] == losses["cons_full"] == losses["ds_part"], losses
    # init_from really loaded (the mask-token row added to the AR vocabulary included): step 1 of a diffusion
    # run from the AR weights differs from one from random weights
    train(tmp_path / "rand", pretrain_shards, *COMMON, "train.init_from=", world=2, ds="ds_configs/zero3.json")
    assert train_losses(tmp_path / "rand")[1] != losses["cons_part"][1]
