"""The LLaDA2 MoE backbone in the trainer: block-diffusion SFT on 2 processes whose loss falls (ZeRO-2 with
activation checkpointing, ZeRO-3), exact resume with expert-bias updates, per-layer MoE logs, WSD block-schedule
CPT."""

import pytest

from llada_scale.testing import run_ranks, train_metrics as metrics

MOE = ["model.model_type=llada2_moe", "model.preset=none", "model.hidden_size=64", "model.num_layers=2",
       "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16", "model.intermediate_size=128",
       "model.moe_intermediate_size=32", "model.num_experts=8", "model.n_group=4", "model.topk_group=2",
       "model.num_experts_per_tok=2", "model.max_seq_len=256"]
COMMON = ["data.seq_len=64", "data.num_workers=0", "train.wandb=off", "train.val_every=0", "train.log_every=1",
          "train.num_samples=0", "train.init_from=", "train.micro_batch_size=2", "train.global_batch_size=8",
          "train.save_every=0", "optim.lr=3e-3", "optim.schedule=constant", "optim.warmup_steps=0"]


def sft(run_dir, shards, *extra, ds="ds_configs/zero2.json"):
    return run_ranks(["-m", "llada_scale.train", "--config", "configs/llada2_bd_sft_tiny.yaml", "--deepspeed_config",
                      ds, f"run_dir={run_dir}", f"data.train_shards={shards}", *MOE, *COMMON, *extra], 2)


def mean_ce(row):
    """Unweighted CE of a step: mean over its noise-level buckets (the 1/t-weighted loss is too noisy)."""
    vals = [v for k, v in row.items() if k.startswith("train/ce_t")]
    return sum(vals) / len(vals)


@pytest.mark.distributed
def test_llada2_bd_sft_zero2_loss_falls_with_balancing_logs(tmp_path, sft_shards):
    sft(tmp_path / "r", sft_shards, "train.max_steps=14", "train.activation_checkpointing=full",
        "model.moe.bias_update_rate=0.01", "model.moe.aux_loss_coef=0.01")
    m = metrics(tmp_path / "r")
    assert sorted(m) == list(range(1, 15))
    first = sum(mean_ce(m[s]) for s in (1, 2, 3)) / 3
    last = sum(mean_ce(m[s]) for s in (12, 13, 14)) / 3
    assert last < first - 0.5, (first, last)
    row = m[14]
    assert row["moe/layer1/load_imbalance"] >= 1.0 and 0 < row["moe/layer1/router_entropy"] <= 2.0795
    # every step moves every bias by +-0.01 (or 0 at the mean): the range grows from 0 within 14 steps
    assert 0 < row["moe/layer1/bias_range"] <= 2 * 14 * 0.01 + 1e-6
    assert "moe/layer0/load_imbalance" not in row  # layer 0 is dense (first_k_dense_replace=1)


@pytest.mark.distributed
def test_llada2_zero3_resume_is_exact_with_bias_updates(tmp_path, sft_shards):
    common = ["train.max_steps=6", "model.moe.bias_update_rate=0.01"]
    full, split = tmp_path / "full", tmp_path / "split"
    sft(full, sft_shards, *common, ds="ds_configs/zero3.json")
    sft(split, sft_shards, *common, "train.stop_at_step=3", ds="ds_configs/zero3.json")
    sft(split, sft_shards, *common, ds="ds_configs/zero3.json")
    a, b = metrics(full), metrics(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["data/checksum"] == b[step]["data/checksum"], step
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["moe/layer1/bias_range"] == pytest.approx(b[step]["moe/layer1/bias_range"], abs=1e-7), step


@pytest.mark.distributed
def test_llada2_wsd_block_diffusion_cpt_runs(tmp_path, pretrain_shards):
    """CPT as LLaDA2.0 was trained: the WSD block-length schedule (configs/llada2_wsd_diffusion_tiny.yaml, phases of
    block 1 then 4 here) on the MoE backbone, with selective activation checkpointing and balancing on."""
    run_ranks(["-m", "llada_scale.train", "--config", "configs/llada2_wsd_diffusion_tiny.yaml", "--deepspeed_config",
               "ds_configs/zero2.json", f"run_dir={tmp_path / 'r'}", f"data.train_shards={pretrain_shards}", *MOE,
               *COMMON, "train.max_steps=4", "train.global_batch_size=2", "objective.block_schedule=[[1, 2], [4, 2]]",
               "train.activation_checkpointing=selective", "model.moe.bias_update_rate=0.001"], 1)
    m = metrics(tmp_path / "r")
    assert [m[s]["train/block_length"] for s in (1, 2, 3, 4)] == [1, 1, 4, 4]
    assert all(m[s]["train/loss"] > 0 and "moe/layer1/load_imbalance" in m[s] for s in m)
