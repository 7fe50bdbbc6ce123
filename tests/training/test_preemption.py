"""Preemption, half-written checkpoints, world-size changes and loss spikes, without SLURM (tests/training/test_slurm.py
does the same through sbatch on a real cluster).

* A process killed (SIGKILL) in the middle of writing a checkpoint leaves ``<tag>.tmp`` behind; resume never
  picks it and continues from the previous complete checkpoint.
* SIGUSR1 sent to ONE rank and to its data loader worker (as SLURM signals every process of a step): every
  rank stops after the same step, saves one complete checkpoint and exits 75; the worker survives.
* A ZeRO-3 checkpoint written by 2 ranks resumes on 1 (universal checkpoint, loader resharded).
* The loss-spike rule (training/guards.py LossGuard) skips or stops, is identical on every rank, and ignores warm-up.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from llada_scale.checkpoint import checkpointer
from llada_scale.testing import REPO_ROOT, child_pids, free_port, run_ranks, train_losses as losses

TINY = ["--config", "configs/diffusion_pretrain_tiny.yaml", "model.num_layers=2", "data.seq_len=64",
        "train.micro_batch_size=4", "train.val_every=0", "train.log_every=1", "train.init_from=",
        "train.wandb=off", "train.keep_last=0"]



# ---------------------------------------------------------------------------------------------- half-written
KILL_MID_SAVE = r"""
import os, signal, sys, torch
target = sys.argv[1]
orig = torch.save
def save(obj, f, *a, **k):
    orig(obj, f, *a, **k)
    if target in str(f) and "optim_states" in str(f):  # model states written, optimizer shard written, no meta
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.argv = ["train"] + sys.argv[2:]
from llada_scale.train import main
sys.exit(main())
"""


@pytest.mark.distributed
def test_checkpoint_killed_mid_save_is_never_resumed(tmp_path, pretrain_shards):
    run = tmp_path / "run"
    args = ["--deepspeed_config", "ds_configs/zero2.json", *TINY, f"data.train_shards={pretrain_shards}",
            "train.global_batch_size=4", "train.max_steps=8", "train.save_every=3", f"run_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, "step00000006.tmp", *args], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    ckpts = run / "checkpoints"
    half = ckpts / "step00000006.tmp"
    assert half.is_dir() and any(half.iterdir()) and not (half / checkpointer.META_FILE).exists()
    assert (ckpts / "latest").read_text().strip() == "step00000003"
    assert checkpointer.find_latest(ckpts) == ckpts / "step00000003"
    (ckpts / "latest").unlink()  # even without the pointer file the .tmp directory is not a candidate
    assert checkpointer.find_latest(ckpts) == ckpts / "step00000003"
    r = subprocess.run([sys.executable, "-m", "llada_scale.train", *args], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpts}/step00000003 at step 3" in r.stderr
    assert not half.exists() and (ckpts / "step00000006" / checkpointer.META_FILE).is_file()
    assert (ckpts / "latest").read_text().strip() == "step00000008"


# ---------------------------------------------------------------------------------------------- signals
@pytest.mark.distributed
def test_sigusr1_to_one_rank_and_its_worker_stops_all_ranks_at_one_step(tmp_path, pretrain_shards):
    run = tmp_path / "run"
    args = ["-m", "llada_scale.train", "--deepspeed_config", "ds_configs/zero2.json", *TINY,
            f"data.train_shards={pretrain_shards}", "data.num_workers=1", "train.global_batch_size=8",
            "train.max_steps=400", "train.save_every=0", f"run_dir={run}"]
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO_ROOT)}
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no progress"
            time.sleep(0.1)
        tree = [procs[1].pid, *child_pids(procs[1].pid)]
        assert len(tree) >= 2, "rank 1 has no loader worker child"
        for pid in tree:  # like slurmstepd: every process of the task
            os.kill(pid, signal.SIGUSR1)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [75, 75], [(c, o[1][-2000:]) for c, o in zip(codes, outs)]
    err0 = outs[0][1]
    line = next(x for x in err0.splitlines() if "checkpointing at step" in x)
    k = int(line.split("at step")[1].split()[0])
    assert "signal 10 received" in line and 3 <= k < 400
    ckpts = run / "checkpoints"
    assert checkpointer.find_latest(ckpts) == ckpts / f"step{k:08d}"
    meta = checkpointer.read_meta(ckpts / f"step{k:08d}")
    assert meta["step"] == k and meta["world_size"] == 2
    assert "DataLoader worker" not in outs[0][1] + outs[1][1], "a loader worker died of the signal"


# ---------------------------------------------------------------------------------------------- world size
@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_checkpoint_of_two_ranks_resumes_on_one(tmp_path, pretrain_shards):
    run = tmp_path / "run"
    base = ["-m", "llada_scale.train", "--deepspeed_config", "ds_configs/zero3.json", *TINY,
            f"data.train_shards={pretrain_shards}", "train.global_batch_size=8", "train.max_steps=12",
            "train.save_every=0", f"run_dir={run}"]
    run_ranks([*base, "train.stop_at_step=6"], 2)
    r = run_ranks(base, 1)[0]
    assert (f"resumed from {run}/checkpoints/step00000006 at step 6 (written by 2 ranks, now 1: universal "
            "checkpoint, loader resharded)") in r.stderr, r.stderr[-3000:]
    got = losses(run)
    assert all(math.isfinite(got[s]) for s in range(1, 13))
    assert got[7] < got[1], "the resumed model is not the trained one"
    assert checkpointer.read_meta(run / "checkpoints" / "step00000012")["world_size"] == 1


# ---------------------------------------------------------------------------------------------- spikes
def _spike_guard(factor=2.0, action="skip", warmup=2):
    from llada_scale.training.guards import LossGuard

    cfg = SimpleNamespace(nonfinite="skip", spike_factor=factor, spike_action=action, spike_warmup=warmup)
    return LossGuard(cfg, rank=1)  # rank 1: no logging needed


def test_spike_rule_skips_and_keeps_the_running_mean():
    g = _spike_guard()
    assert not g.is_spike(0, 10.0)  # first value sets the mean
    assert not g.is_spike(0, 50.0)  # warm-up (step 0 < 2): never a spike, but it moves the mean
    mean = g.loss_ema
    assert g.is_spike(5, 2.0 * mean + 1) and g.skipped == 1
    assert g.loss_ema == mean, "a spike must not move the running mean"
    assert not g.is_spike(5, mean)  # an ordinary loss resets the consecutive count
    assert g.spike_run == 0


def test_spike_rule_stop_and_consecutive_limit():
    from llada_scale.training.engine import TrainError

    g = _spike_guard(action="stop")
    g.is_spike(0, 1.0)
    with pytest.raises(TrainError, match=r"loss spike.*spike_factor 2.0 x running mean 1.0000.*spike_action=skip"):
        g.is_spike(5, 3.0)
    g = _spike_guard()
    g.is_spike(0, 1.0)
    for _ in range(g.MAX_CONSECUTIVE - 1):
        assert g.is_spike(5, 5.0)
    with pytest.raises(TrainError, match="in a row"):
        g.is_spike(5, 5.0)
    off = _spike_guard(factor=0.0)
    off.is_spike(0, 1.0)
    assert not off.is_spike(5, 1e6)


@pytest.mark.distributed
def test_spike_stop_gives_one_clear_line(tmp_path, pretrain_shards):
    r = subprocess.run([sys.executable, "-m", "llada_scale.train", *TINY, f"data.train_shards={pretrain_shards}",
                        "train.global_batch_size=4", "train.max_steps=40", "train.save_every=0",
                        "train.spike_factor=1.01", "train.spike_warmup=3", "train.spike_action=stop",
                        f"run_dir={tmp_path / 'run'}"],
                       cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "loss spike" in r.stderr and "spike_action=skip" in r.stderr and "Traceback" not in r.stderr
