"""End-to-end trainer behaviour with real processes: resume exactness, world-size equivalence,
AR -> diffusion initialisation, and clear errors for bad input."""

from pathlib import Path

import pytest

from llada_scale.testing import run_ranks, train_metrics as metrics

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.preset=tiny", "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
        "data.seq_len=64", "data.num_workers=0", "train.wandb=off", "train.val_every=0", "train.log_every=1",
        "train.num_samples=0"]



def train(run_dir, shards, *extra, world=1, ds="ds_configs/zero2.json", recipe="configs/diffusion_pretrain_tiny.yaml",
          check=True):
    argv = ["-m", "llada_scale.train", "--config", recipe, "--deepspeed_config", ds, f"run_dir={run_dir}",
            f"data.train_shards={shards}", *TINY, *extra]
    if check:
        return run_ranks(argv, world)
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("ds", ["ds_configs/zero2.json", "ds_configs/zero3.json"])
def test_resume_equals_uninterrupted(tmp_path, pretrain_shards, ds):
    """2 ranks, diffusion objective, gradient accumulation: stop at step 3 and resume == uninterrupted run."""
    common = ["train.max_steps=6", "train.micro_batch_size=2", "train.global_batch_size=8", "train.save_every=0",
              "train.init_from=", "objective.random_length_prob=0.3"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, pretrain_shards, *common, world=2, ds=ds)
    train(split, pretrain_shards, *common, "train.stop_at_step=3", world=2, ds=ds)
    assert sorted(metrics(split)) == [1, 2, 3]
    train(split, pretrain_shards, *common, world=2, ds=ds)
    a, b = metrics(full), metrics(split)
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert a[step]["data/checksum"] == b[step]["data/checksum"], f"different batches at step {step}"
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5, abs=1e-6), step
    assert len({a[s]["data/checksum"] for s in a}) == 6  # the data really moves on


@pytest.mark.distributed
def test_world_size_equivalence(tmp_path, tokenizer_path):
    """2 processes x micro batch b give the same AR loss curve as 1 process x micro batch 2b. (The workers' trainer
    loads the default tokenizer: ``tokenizer_path`` skips the test where the data is missing.)"""
    worker = str(REPO / "tests" / "training" / "equivalence_worker.py")
    run_ranks([worker, str(tmp_path / "w2"), "2", "ds_configs/zero2.json"], 2)
    run_ranks([worker, str(tmp_path / "w1"), "4", "ds_configs/zero2.json"], 1)
    two, one = metrics(tmp_path / "w2"), metrics(tmp_path / "w1")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert one[step]["data/checksum"] == two[step]["data/checksum"]
        assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step
    assert one[3]["train/loss"] < one[1]["train/loss"] - 0.05  # it trained (step 3 revisits step 1's batch)


def test_ar_init_lowers_first_diffusion_loss(tmp_path, pretrain_shards):
    ar = tmp_path / "ar"
    train(ar, pretrain_shards, "train.max_steps=60", "train.save_every=0", "train.log_every=20",
          "optim.warmup_steps=5", "optim.lr=5e-3", recipe="configs/ar_pretrain_tiny.yaml")
    ar_losses = metrics(ar)
    assert ar_losses[60]["train/loss"] < ar_losses[20]["train/loss"]
    first = {}
    for name, init in (("from_ar", str(ar)), ("random", "")):
        run = tmp_path / name
        train(run, pretrain_shards, "train.max_steps=1", f"train.init_from={init}", "train.save_every=0")
        first[name] = metrics(run)[1]["train/loss"]
        assert metrics(run)[1]["data/checksum"] == metrics(tmp_path / "from_ar")[1]["data/checksum"]
    assert first["from_ar"] < first["random"] - 1.0, first

    # a checkpoint of another shape: one clear line, exit code 2
    r = train(tmp_path / "bad", pretrain_shards, "train.max_steps=1", f"train.init_from={ar}", "model.hidden_size=128",
              check=False)
    assert r.returncode == 2 and "does not fit the model" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = train(tmp_path / "bad2", pretrain_shards, "train.max_steps=1", f"train.resume={ar}", "model.hidden_size=128",
              check=False)
    assert r.returncode == 2 and "another model" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("extra,message", [
    (["train.global_batch_size=12", "train.micro_batch_size=8"], "not a multiple of micro_batch_size 8"),
    (["data.train_shards=/nonexistent/shards"], "/nonexistent/shards"),
    (["train.bogus=1"], "unknown key(s) ['bogus'] in train"),
    (["model.preset=huge"], "unknown model preset 'huge'"),
])
def test_bad_input_gives_one_clear_line(tmp_path, pretrain_shards, extra, message):
    r = train(tmp_path / "run", pretrain_shards, "train.max_steps=1", "train.init_from=", *extra, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_missing_deepspeed_config(tmp_path, pretrain_shards):
    r = train(tmp_path / "run", pretrain_shards, "train.max_steps=1", "train.init_from=", ds="ds_configs/nope.json",
              check=False)
    assert r.returncode == 2 and "ds_configs/nope.json does not exist" in r.stderr, r.stderr[-2000:]


def test_block_diffusion_logs_executed_mfu(tmp_path, pretrain_shards):
    """Block diffusion logs a second MFU from the attention scores its mask keeps (issue 21 finding 14): below
    the PaLM-convention MFU, which counts every score of the 2L input."""
    run = tmp_path / "bd"
    train(run, pretrain_shards, "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=2",
          "train.save_every=0", "train.init_from=", "objective.block_length=8", "train.peak_flops=1e12")
    row = metrics(run)[2]
    assert 0 < row["perf/mfu_executed"] < row["perf/mfu"], row
