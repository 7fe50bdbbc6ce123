"""The slurm/ scripts on a real SLURM cluster: two slurmd nodes on this machine (tests/training/slurm_cluster.py).

``sbatch slurm/diffusion_pretrain.sh`` in its CPU smoke configuration (LLADA_DEVICE=cpu, --gpus-per-node=0,
one rank per node, gloo) with a tiny model on shards built here by tools/build_shards.py:

1. trains across the two nodes to the end and writes checkpoints;
2. the same job, signalled mid-run with ``scancel --signal=USR1 --batch``, checkpoints, requeues itself,
   resumes under the same job id and ends with the same losses (step by step) as the uninterrupted run,
   in the same wandb run;
3. resuming that job's last checkpoint on ONE node (universal checkpoint + loader resharding) trains on.

Needs root (daemons, /etc/hosts) and SLURM + munge (installed with apt-get when missing); skipped with the
reason otherwise. The cluster is torn down afterwards whatever happens (fixture finalizer): jobs cancelled,
``scontrol shutdown``, munged ended by pid, the /etc/hosts line removed, temporary directories deleted.

Also: ``shellcheck`` over slurm/*.sh (not marked slurm; skipped when shellcheck cannot be had).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llada_scale.testing import train_losses as losses

from slurm_cluster import LocalSlurm, Unavailable, ensure_packages

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("LLADA_DATA", REPO.parent / "shared" / "data"))
STEPS = 30
# Tiny: 2-layer model, 64-token rows, 8 sequences per step over 2 ranks, every step logged.
COMMON = ["--config", "configs/diffusion_pretrain_tiny.yaml", "model.num_layers=2", "data.seq_len=64",
          "train.global_batch_size=8", "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.val_every=0",
          "train.log_every=1", "train.save_every=10", "train.keep_last=1", "train.init_from="]
JOB_TIMEOUT = 240


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(request):
    if os.geteuid() != 0:
        pytest.skip("starts munged/slurmctld/slurmd and edits /etc/hosts: needs root")
    try:
        ensure_packages()
    except Unavailable as e:
        pytest.skip(f"SLURM cannot be installed here: {e}")
    c = LocalSlurm()
    request.addfinalizer(c.stop)  # registered before start: a half-started cluster is torn down too
    c.start()
    return c


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tok = DATA / "tokenizer" / "minimind"
    src = DATA / "pretrain" / "en_classics.jsonl.gz"
    if not tok.is_dir() or not src.is_file():
        pytest.skip(f"real data not found at {DATA} (set LLADA_DATA)")
    out = tmp_path_factory.mktemp("slurm_shards") / "pretrain"
    r = subprocess.run([sys.executable, "tools/build_shards.py", "--input", str(src), "--tokenizer", str(tok),
                        "--output", str(out), "--kind", "pretrain", "--max_tokens", "160000", "--shard_tokens", "16000",
                        "--val_docs", "4", "--no_progress", "--num_workers", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n = len(json.loads((out / "index.json").read_text())["splits"]["train"])
    assert n >= 4, f"only {n} train shards"
    return out


@pytest.fixture(scope="module")
def ds_ops():
    """Build DeepSpeed's CPU comm op once (~40 s, cached in TORCH_EXTENSIONS_DIR) instead of in every rank."""
    r = subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm_runs")
    os.chmod(d, 0o755)
    return d


def submit(cluster: LocalSlurm, work: Path, name: str, nodes: int, args: list[str]) -> str:
    """sbatch slurm/diffusion_pretrain.sh with the CPU smoke overrides; returns the job id."""
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", "--ntasks-per-node=1",
           "--cpus-per-task=1", "--gpus-per-node=0", "--time=30", f"--output={work}/{name}-%j.out",
           "slurm/diffusion_pretrain.sh", *args]
    env = {"LLADA_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "LLADA_PYTHON": sys.executable}  # this interpreter
    r = cluster.run(cmd, cwd=REPO, env=env)
    return r.stdout.strip().split(";")[0]


def wait_job(cluster: LocalSlurm, job: str, work: Path, name: str, timeout=JOB_TIMEOUT, restarts=0) -> dict:
    """Wait until the job is COMPLETED/FAILED/... with at least ``restarts`` restarts; return its record."""
    deadline = time.time() + timeout
    info, ended_short = {}, None
    while time.time() < deadline:
        info = cluster.job(job)
        if info.get("JobState", "") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                        "BOOT_FAIL"):
            if int(info.get("Restarts", 0)) >= restarts:
                return info
            ended_short = ended_short or time.time()
            if time.time() - ended_short > 20:  # ended and was not requeued
                break
        else:
            ended_short = None
        time.sleep(1)
    pytest.fail(f"job {job} not done after {timeout} s: {info}\n{job_log(work, name, job)[-4000:]}\n{cluster.logs()}")


def job_log(work: Path, name: str, job: str) -> str:
    p = work / f"{name}-{job}.out"
    return p.read_text(errors="replace") if p.exists() else f"(no log {p})"



def assert_completed(info: dict, log: str):
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{log[-5000:]}"


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def uninterrupted(cluster, shards, work, ds_ops):
    run = work / "uninterrupted"
    job = submit(cluster, work, "plain", 2, [*COMMON, f"data.train_shards={shards}", f"run_dir={run}",
                                             "train.wandb=off"])
    info = wait_job(cluster, job, work, "plain")
    log = job_log(work, "plain", job)
    return {"job": job, "info": info, "log": log, "run": run}


@pytest.fixture(scope="module")
def preempted(cluster, shards, work, ds_ops):
    run = work / "preempted"
    name = "preempt"
    job = submit(cluster, work, name, 2, [*COMMON, f"data.train_shards={shards}", f"run_dir={run}",
                                          "train.wandb=offline"])
    metrics = run / "metrics.jsonl"
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline:  # signal once a few steps are done
        if metrics.exists() and sum('"train/loss"' in x for x in metrics.read_text().splitlines()) >= 5:
            break
        if cluster.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job ended before it could be signalled\n{job_log(work, name, job)[-4000:]}")
        time.sleep(0.2)
    else:
        pytest.fail(f"no training progress within {JOB_TIMEOUT} s\n{job_log(work, name, job)[-4000:]}")
    wandb_id = (run / "wandb_id").read_text()
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    info = wait_job(cluster, job, work, name, restarts=1)
    return {"job": job, "info": info, "log": job_log(work, name, job), "run": run, "wandb_id": wandb_id}


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.slurm
def test_two_node_job_trains_and_checkpoints(uninterrupted):
    log, run = uninterrupted["log"], uninterrupted["run"]
    assert_completed(uninterrupted["info"], log)
    assert uninterrupted["info"].get("NodeList") == "n[1-2]", uninterrupted["info"]
    assert "task rank 0/2 local 0 on node n1" in log and "task rank 1/2 local 0 on node n2" in log, log[-3000:]
    assert "| world 2 |" in log and "device cpu" in log
    assert "training exited with status 0" in log
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert (ckpts / f"step{STEPS:08d}" / "llada_scale.json").is_file()
    meta = json.loads((ckpts / f"step{STEPS:08d}" / "llada_scale.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == STEPS
    for step in (10, 20):
        assert f"saved checkpoint {ckpts}/step{step:08d}" in log
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in got.values())
    assert got[STEPS] < got[1], "the loss did not go down"


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_resumes_with_same_losses(uninterrupted, preempted):
    log, run, info = preempted["log"], preempted["run"], preempted["info"]
    assert_completed(info, log)
    assert int(info["Restarts"]) == 1, info
    assert "SIGUSR1 (time limit near / requested)" in log, log[-4000:]
    stop = [line for line in log.splitlines() if "signal 10 received: checkpointing at step" in line]
    assert stop, log[-4000:]
    k = int(stop[0].split("at step")[1].split()[0])
    assert 5 <= k < STEPS, k
    assert f"saved checkpoint {run}/checkpoints/step{k:08d}" in log
    assert f"requeueing job {preempted['job']}" in log and "restart 1:" in log
    assert f"resumed from {run}/checkpoints/step{k:08d} at step {k}" in log, log[-4000:]
    assert "training exited with status 0" in log
    ref, got = losses(uninterrupted["run"]), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(1, STEPS + 1):  # the same run, steps before and after the preemption
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (step, got[step], ref[step])
    # one wandb run: the requeued job reused the id (two offline segments of the same run)
    assert (run / "wandb_id").read_text() == preempted["wandb_id"]
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(p.name.endswith(preempted["wandb_id"]) for p in segments), segments


@pytest.mark.slurm
def test_resume_on_one_node_continues(cluster, shards, work, preempted):
    run = preempted["run"]
    assert_completed(preempted["info"], preempted["log"])
    job = submit(cluster, work, "onenode", 1, [*COMMON, f"data.train_shards={shards}", f"run_dir={run}",
                                               "train.wandb=off", f"train.max_steps={STEPS + 10}"])
    info = wait_job(cluster, job, work, "onenode")
    log = job_log(work, "onenode", job)
    assert_completed(info, log)
    assert info.get("NodeList") in ("n1", "n2"), info
    assert f"resumed from {run}/checkpoints/step{STEPS:08d} at step {STEPS} (written by 2 ranks, now 1: " \
           "universal checkpoint, loader resharded)" in log, log[-4000:]
    assert "| world 1 |" in log and "accum 2" in log
    got = losses(run)
    assert all(s in got and math.isfinite(got[s]) for s in range(STEPS + 1, STEPS + 11)), sorted(got)[-12:]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step{STEPS + 10:08d}"
    assert json.loads((ckpts / f"step{STEPS + 10:08d}" / "llada_scale.json").read_text())["world_size"] == 1
    assert not (ckpts / "universal").exists(), "the converted universal copy was not cleaned up"


def test_shellcheck_slurm_scripts():
    if not shutil.which("shellcheck"):
        try:
            ensure_packages(["shellcheck"], ["shellcheck"], timeout=300)
        except Unavailable as e:
            pytest.skip(f"shellcheck not available: {e}")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").glob("*.sh"))
    assert {"slurm/launch.sh", "slurm/env.sh", "slurm/diffusion_pretrain.sh", "slurm/ar_pretrain.sh",
            "slurm/sft.sh"} <= set(scripts)
    r = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
