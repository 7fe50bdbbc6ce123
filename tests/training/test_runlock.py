"""One trainer per run directory (issue 20): the lock names its holder, is refused to a second process before it
writes anything, is freed when the holder dies, and a stale staging directory of an interrupted save is removed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llada_scale.training import runlock
from llada_scale.training.engine import TrainError
from tests.training.test_train import train

HOLD = "import sys, time; from llada_scale.training import runlock; l = runlock.acquire(sys.argv[1]); " \
       "print('held', flush=True); time.sleep(120)"


def test_lock_names_the_holder_and_is_freed_with_it(tmp_path):
    run = tmp_path / "run"
    first = runlock.acquire(run)
    with pytest.raises(TrainError, match=rf"another trainer is running in {run} \(host \S+, PID {os.getpid()}"):
        runlock.acquire(run)
    first.release()
    runlock.acquire(run).release()
    # a holder killed with SIGKILL leaves no lock behind (the kernel drops it)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(TrainError, match=f"PID {p.pid}"):
        runlock.acquire(run)
    p.kill()
    p.wait()
    runlock.acquire(run).release()


def test_second_trainer_exits_2_before_writing(tmp_path, pretrain_shards):
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000004.tmp").mkdir(parents=True)  # a save interrupted by a kill
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert p.stdout.readline().strip() == "held"
        r = train(run, pretrain_shards, "train.max_steps=2", "train.save_every=1", "train.init_from=", check=False)
        assert r.returncode == 2, r.stderr[-2000:]
        err = [x for x in r.stderr.splitlines() if x.startswith("error")]
        assert len(err) == 1 and f"PID {p.pid}" in err[0] and "another trainer" in err[0]
        assert sorted(x.name for x in run.iterdir()) == [".lock", "checkpoints"]  # nothing written
        assert (run / "checkpoints" / "step00000004.tmp").is_dir()  # not ours to clean while another holds it
    finally:
        p.kill()
        p.wait()
    r = train(run, pretrain_shards, "train.max_steps=1", "train.save_every=1", "train.init_from=", check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (run / "checkpoints" / "step00000004.tmp").exists()
    assert (run / "checkpoints" / "step00000001").is_dir()
