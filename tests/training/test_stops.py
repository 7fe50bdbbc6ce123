"""How runs end, with real processes and loader workers (data.num_workers=1): every run exits within seconds of
its last step at ZeRO 0-3 (normally, early-stopped, diverged, after Ctrl-C or a signal), a diverged run saves its
last good state and exits 2, Ctrl-C checkpoints and exits 130, resume skips a damaged newest checkpoint, and
signals through the README's launchers (``deepspeed``, ``torchrun``) checkpoint instead of orphaning the ranks.

Before these fixes a run with loader workers hung forever after its final checkpoint (multiprocessing's exit
handler SIGTERMs the workers, which block that signal, then joins them), so every test here has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llada_scale.checkpoint import checkpointer
from llada_scale.testing import REPO_ROOT, free_port, launched_rank, pid_running, train_metrics

TINY = ["--config", "configs/diffusion_pretrain_tiny.yaml", "model.num_layers=2", "model.hidden_size=64",
        "model.intermediate_size=128", "data.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=4",
        "train.log_every=1", "train.init_from=", "train.wandb=off", "train.num_samples=0", "train.val_every=0",
        "data.num_workers=1", "train.keep_last=0", "train.save_every=0"]
EXIT_S = 15  # from the last checkpoint written to the process gone (engine teardown included; slow shared CPUs)


def start(prefix: list[str], run: Path, shards: Path, *extra: str) -> subprocess.Popen:
    """Start ``prefix`` (launcher, script and its options) + the tiny recipe + ``extra`` overrides in its own
    session, output to ``<run>.log``."""
    run.mkdir(parents=True, exist_ok=True)
    log = open(run.parent / f"{run.name}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([*prefix, *TINY, f"run_dir={run}", f"data.train_shards={shards}", *extra], cwd=REPO_ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while max(train_metrics(run), default=0) < step if (run / "metrics.jsonl").exists() else True:
        assert proc.poll() is None, f"exited {proc.returncode} before step {step}: {output(run)[-3000:]}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, run: Path, timeout: float = 240) -> tuple[int, str, float]:
    """Wait for the exit (killing the session after ``timeout``); returns (exit code, output, seconds between the
    last write of checkpoints/latest and the exit)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running {timeout} s later (hung?): {output(run)[-3000:]}")
    gone = time.time()
    latest = run / "checkpoints" / "latest"
    return proc.returncode, output(run), gone - latest.stat().st_mtime if latest.exists() else float("nan")


def output(run: Path) -> str:
    return (run.parent / f"{run.name}.log").read_text()


def train(run: Path, shards: Path, *extra: str, ds: str | None = None, timeout: float = 240) -> tuple[int, str, float]:
    return finish(start(TRAIN + (["--deepspeed_config", ds] if ds else []), run, shards, *extra), run, timeout)


TRAIN = [sys.executable, "-m", "llada_scale.train"]


# ---------------------------------------------------------------------------------------------- diverged
@pytest.mark.distributed
@pytest.mark.parametrize("ds", ["ZeRO-0", "ds_configs/zero2.json"])
def test_diverged_run_saves_last_good_state_and_exits(tmp_path, pretrain_shards, ds):
    """optim.lr=1e6: ZeRO-2 skips every optimizer step (inf gradients) while the loss stays finite; ZeRO-0 used
    to step into NaN weights and then skip NaN micro batches forever. Both count skipped steps, stop after
    train.max_consecutive_skips of them with one line, exit 2, and save the weights of the last applied step."""
    run = tmp_path / "run"
    code, out, exit_s = train(run, pretrain_shards, "train.max_steps=40", "optim.lr=1e6", "optim.warmup_steps=1",
                              "train.max_consecutive_skips=3", ds=None if ds == "ZeRO-0" else ds)
    assert code == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error (rank 0): step ") and "3 optimizer steps in a row skipped" in last, out[-3000:]
    assert "Traceback" not in out
    k = int(last.split("as ")[-1].strip().split("step")[-1])
    assert f"Saved the last good state (the skipped steps did not change the weights) as {run}/checkpoints/step" in last
    assert checkpointer.find_latest(run / "checkpoints") == run / "checkpoints" / f"step{k:08d}"
    rows = train_metrics(run)
    assert rows[k]["train/skipped_steps"] == 2 and k < 10  # the 3rd skip stops before its step is logged
    assert exit_s < EXIT_S, exit_s


# ---------------------------------------------------------------------------------------------- early stopping
@pytest.mark.distributed
def test_early_stopping_zero3_with_workers(tmp_path, pretrain_shards):
    """Validation every step; no improvement by more than 100 for one validation stops the run at step 2 with a
    checkpoint and exit 0; steps where it may stop are logged whatever train.log_every says."""
    run = tmp_path / "run"
    code, out, exit_s = train(run, pretrain_shards, "train.max_steps=50", "train.log_every=7", "train.val_every=1",
                              "train.val_batches=1", "train.early_stop_patience=1", "train.early_stop_min_delta=100",
                              ds="ds_configs/zero3.json")
    assert code == 0, out[-3000:]
    assert "early stopping at step 2: validation loss" in out and "train.early_stop_patience=1" in out
    assert checkpointer.find_latest(run / "checkpoints") == run / "checkpoints" / "step00000002"
    assert sorted(train_metrics(run)) == [1, 2]  # log_every=7, but every validation is a step it may stop at
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/early_stopped") == 2 for r in rows)
    assert exit_s < EXIT_S, exit_s


# ---------------------------------------------------------------------------------------------- Ctrl-C, damage
@pytest.mark.distributed
def test_ctrl_c_then_resume_past_a_damaged_checkpoint(tmp_path, pretrain_shards):
    """ZeRO-1, workers: Ctrl-C checkpoints at the next step, logs that step (log_every=5 would hide it) and exits
    130; every logged t-bucket has a real value. Then the newest checkpoint's optimizer shard is
    truncated: the resume says so and continues from the previous complete checkpoint."""
    run = tmp_path / "run"
    ds = "ds_configs/zero1.json"
    proc = start(TRAIN + ["--deepspeed_config", ds], run, pretrain_shards, "train.save_every=2", "train.max_steps=400",
                 "train.log_every=5")
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGINT)
    code, out, exit_s = finish(proc, run)
    assert code == 130, out[-3000:]
    assert "Ctrl-C: checkpointing at the next step boundary" in out and "Traceback" not in out
    k = int(out.split("signal 2 received: checkpointing at step ")[1].split()[0])
    assert 5 <= k < 400 and k in train_metrics(run) and checkpointer.find_latest(run / "checkpoints").name == \
        f"step{k:08d}"
    assert exit_s < EXIT_S, exit_s
    for row in train_metrics(run).values():  # empty buckets: tests/training/test_metrics.py
        ce = [v for key, v in row.items() if key.startswith("train/ce_t")]
        assert ce and 0.0 not in ce

    shard = run / "checkpoints" / f"step{k:08d}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    prev = max(s for s in range(2, k, 2))
    code, out, exit_s = train(run, pretrain_shards, "train.save_every=2", f"train.max_steps={k + 1}", ds=ds)
    assert code == 0, out[-3000:]
    assert f"skipping damaged checkpoint {shard.parent}: {shard} has" in out
    assert f"resumed from {run}/checkpoints/step{prev:08d} at step {prev}" in out
    assert exit_s < EXIT_S, exit_s


# ---------------------------------------------------------------------------------------------- launchers
def _gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while pid_running(pid) and time.time() < deadline:
        time.sleep(0.1)
    return not pid_running(pid)


LAUNCHERS = {  # both default to port 29500, which another job on the machine may hold
    "deepspeed": lambda: [sys.executable, shutil.which("deepspeed") or "deepspeed", "--num_gpus", "1",
                          "--master_port", str(free_port()), "llada_scale/train.py"],
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                         str(free_port()), "-m", "llada_scale.train"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("launcher,target,sig,launcher_code", [
    # the deepspeed command dies of SIGTERM/SIGUSR1 (no handler on one node); the rank sees its launcher gone
    ("deepspeed", "launcher", signal.SIGTERM, -signal.SIGTERM),
    # the documented way: signal a rank (any one); launch.py passes the 75 on, and so does the deepspeed command
    ("deepspeed", "rank", signal.SIGUSR1, 75),
    # torchrun dies of SIGUSR1 (it handles SIGTERM/SIGINT/SIGHUP/SIGQUIT only): the rank sees its launcher gone
    ("torchrun", "launcher", signal.SIGUSR1, -signal.SIGUSR1),
    # torchrun forwards SIGTERM, the rank checkpoints and exits 75, torchrun itself exits 1 (SignalException)
    ("torchrun", "launcher", signal.SIGTERM, 1),
])
def test_signals_through_launchers_checkpoint(tmp_path, pretrain_shards, launcher, target, sig, launcher_code):
    if launcher == "deepspeed" and not shutil.which("deepspeed"):
        pytest.skip("no deepspeed launcher on PATH")
    run = tmp_path / "run"
    proc = start(LAUNCHERS[launcher](), run, pretrain_shards, "train.max_steps=2000")
    wait_for_step(proc, run, 2)
    rank = launched_rank(proc.pid)
    assert rank is not None, "no rank process found"
    os.kill(proc.pid if target == "launcher" else rank, sig)
    code, _, _ = finish(proc, run)
    assert _gone(rank, 60), "the rank kept running: " + output(run)[-3000:]
    out = output(run)  # the rank may outlive a launcher that died
    assert code == launcher_code, out[-3000:]
    line = next(x for x in out.splitlines() if "received: checkpointing at step" in x)
    k = int(line.split("checkpointing at step ")[1].split()[0])
    assert checkpointer.find_latest(run / "checkpoints") == run / "checkpoints" / f"step{k:08d}", out[-3000:]
    assert k < 2000 and "DataLoader worker" not in out
