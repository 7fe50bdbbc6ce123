"""Expert parallelism through DeepSpeed AutoEP (llada_scale.training.expert_parallel) on 2 CPU processes (gloo
all-to-all): EP=2 trains exactly as EP=1 (loss, gradient norm, balancing statistics and biases per step, fp32;
gradients of every parameter in ep_grad_worker.py), an EP=2 checkpoint resumes exactly and consolidates to the
model's own names (ZeRO-2 per-expert files, ZeRO-3 shards), and what EP cannot do is refused with one line."""

import pytest
import torch

from llada_scale.checkpoint.weights import load_model_state
from llada_scale.testing import run_ranks, train_metrics as metrics
from tests.training.test_llada2_train import MOE, sft

BALANCE = ["model.moe.bias_update_rate=0.01", "model.moe.aux_loss_coef=0.01", "train.max_steps=4"]
SAME = ("train/loss", "train/grad_norm", "moe/layer1/load_imbalance", "moe/layer1/router_entropy",
        "moe/layer1/bias_range")


@pytest.mark.distributed
def test_ep2_gradients_equal_ep1(tmp_path):
    run_ranks(["tests/training/ep_grad_worker.py", str(tmp_path)], 2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["replaced"] == [1, 2]
        got, want = r["bf16_logits"]
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert r["bias_dtypes"] == {"torch.float32"}
        assert r["ep"]["loss"] == pytest.approx(r["ep1"]["loss"], rel=1e-6)
        ref, got = r["ep1"]["grads"], r["ep"]["grads"]
        assert set(ref) == set(got)
        lo, hi = (0, 4) if rank == 0 else (4, 8)
        for name, g in got.items():
            want = ref[name][lo:hi] if ".mlp.experts." in name else ref[name]
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7, msg=name)
        assert any(".mlp.experts." in n and got[n].abs().sum() > 0 for n in got)


@pytest.mark.distributed
def test_ep2_trains_as_ep1_with_balancing(tmp_path, sft_shards):
    extra = [*BALANCE, "train.activation_checkpointing=full"]
    sft(tmp_path / "ep1", sft_shards, *extra)
    sft(tmp_path / "ep2", sft_shards, *extra, "train.expert_parallel_size=2")
    a, b = metrics(tmp_path / "ep1"), metrics(tmp_path / "ep2")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in SAME:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert a[4]["moe/layer1/bias_range"] > 0  # the biases moved, identically
    # the EP=2 checkpoint (per-expert files, AutoEP names) reads back as the EP=1 one under the model's names
    want, _ = load_model_state(str(tmp_path / "ep1" / "checkpoints"), progress=False)
    got, meta = load_model_state(str(tmp_path / "ep2" / "checkpoints"), progress=False)
    assert sorted(got) == sorted(want) and meta["step"] == 4
    # Adam divides by sqrt(v): where a gradient is near eps, reduction-order differences of the two layouts move a
    # weight by up to ~1e-3 of an lr step (measured 1.5e-6 after one step at lr 3e-3); 4 steps x lr x 2e-3
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-5, atol=4 * 3e-3 * 2e-3, msg=name)
    assert want["model.layers.1.mlp.gate.expert_bias"].abs().max() > 0


@pytest.mark.distributed
def test_ep2_zero3_resume_is_exact_and_other_ep_size_is_refused(tmp_path, sft_shards):
    ep2, z3 = [*BALANCE, "train.expert_parallel_size=2"], "ds_configs/zero3.json"
    full, split = tmp_path / "full", tmp_path / "split"
    sft(full, sft_shards, *ep2, ds=z3)
    sft(split, sft_shards, *ep2, "train.stop_at_step=2", ds=z3)
    sft(split, sft_shards, *ep2, ds=z3)
    a, b = metrics(full), metrics(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["data/checksum"] == b[step]["data/checksum"], step
        for key in SAME:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-8), (step, key)
    want, _ = load_model_state(str(full / "checkpoints"), progress=False)  # ZeRO-3 shards of the experts
    got, _ = load_model_state(str(split / "checkpoints"), progress=False)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-8, msg=name)
    with pytest.raises(RuntimeError, match="was written with train.expert_parallel_size=2, this run has 1"):
        sft(split, sft_shards, *BALANCE, "train.max_steps=6", ds=z3)


LLADA2 = "configs/llada2_bd_sft_tiny.yaml"


@pytest.mark.parametrize("recipe,overrides,world,message", [
    ("configs/diffusion_pretrain_tiny.yaml", [], 2, "needs a mixture-of-experts model"),
    (LLADA2, MOE, 3, "does not divide the world size 3"),
    (LLADA2, [*MOE, "model.num_experts=9", "model.n_group=3", "model.topk_group=1"], 2,
     "does not divide model.num_experts=9"),
    (LLADA2, [*MOE, "train.sequence_parallel_size=2"], 2, "with train.sequence_parallel_size=2 is not supported"),
    (LLADA2, [*MOE, "train.lora.rank=4", "train.init_from=x"], 2, "with train.lora is not supported"),
])
def test_what_expert_parallelism_cannot_do_is_refused(recipe, overrides, world, message):
    from llada_scale.training import expert_parallel
    from llada_scale.training.config import ConfigError, load_config

    cfg = load_config(recipe, [*overrides, "train.expert_parallel_size=2"])
    with pytest.raises(ConfigError, match=message) as e:
        expert_parallel.check(cfg, world)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("zero,message", [
    ({"stage": 0}, "expert parallelism needs ZeRO stage 1-3"),
    ({"stage": 2, "contiguous_gradients": False}, "needs zero_optimization.contiguous_gradients true"),
])
def test_deepspeed_configs_expert_parallelism_cannot_use_are_refused(tmp_path, zero, message):
    import json

    from llada_scale.training.config import load_config
    from llada_scale.training.engine import TrainError, build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    cfg = load_config(LLADA2, [*MOE, "train.expert_parallel_size=2"])
    with pytest.raises(TrainError, match=message):
        build_ds_config(str(path), cfg, 2, torch.device("cpu"))
    ok = build_ds_config("ds_configs/zero2.json", cfg, 2, torch.device("cpu"))
    assert ok["expert_parallel"]["autoep_size"] == 2 and ok["zero_optimization"]["contiguous_gradients"] is True
