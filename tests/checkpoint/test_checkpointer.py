"""The training checkpointer without DeepSpeed (a stand-in engine writes the files): retention never deletes the
checkpoint just written, damaged checkpoints are recognised and resume falls back past them, a full disk is
named with the path, and which checkpoint a run starts from (resume=none over another run, init_from)."""

import errno
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llada_scale.checkpoint import checkpointer
from llada_scale.checkpoint.files import CheckpointError
from llada_scale.training import resume
from llada_scale.training.engine import TrainError


class FakeEngine:
    """Writes what DeepSpeed writes for ZeRO-2 on one rank (two torch zip files); ``fail`` is raised mid-save."""

    def __init__(self, fail: BaseException | None = None):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": torch.zeros(64), "client": client_state}, d / "mp_rank_00_model_states.pt")
        if self.fail is not None:
            raise self.fail
        torch.save({"optimizer": torch.zeros(256)}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def save(ckpt_dir, step, keep_last=0, engine=None):
    return checkpointer.save(engine or FakeEngine(), ckpt_dir, step, {"step": step}, {"zero_stage": 2}, keep_last)


def steps(ckpt_dir):
    return [int(p.name[4:]) for p in checkpointer.list_complete(ckpt_dir)]


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    """A fresh run (steps 5, 10, 12) in a directory that holds another run's step 20, keep_last=1: each new
    checkpoint survives, `latest` names it, and the later step 20 is left alone."""
    ckpts = tmp_path / "checkpoints"
    save(ckpts, 20)
    for s in (5, 10, 12):
        assert save(ckpts, s, keep_last=1).is_dir()
        assert (ckpts / "latest").read_text() == f"step{s:08d}"
        assert checkpointer.find_latest(ckpts) == ckpts / f"step{s:08d}"
    assert steps(ckpts) == [12, 20]
    save(ckpts, 14, keep_last=2)
    save(ckpts, 16, keep_last=2)
    assert steps(ckpts) == [14, 16, 20]


def test_damaged_checkpoints_are_recognised(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        save(ckpts, s)
    assert all(checkpointer.damage(ckpts / f"step{s:08d}") is None for s in (2, 4, 6))
    optim = ckpts / "step00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:300])  # truncated, metadata still present
    (ckpts / "step00000004" / "mp_rank_00_model_states.pt").unlink()
    assert "truncated" in checkpointer.damage(ckpts / "step00000006")
    assert "mp_rank_00_model_states.pt is missing" in checkpointer.damage(ckpts / "step00000004")
    found, problems = checkpointer.find_usable(ckpts)
    assert found == ckpts / "step00000002" and len(problems) == 2
    # a checkpoint from before the file list was recorded: the zip check still sees the truncation
    meta = checkpointer.read_meta(ckpts / "step00000006")
    meta.pop("files")
    checkpointer.atomic_write_text(ckpts / "step00000006" / checkpointer.META_FILE, json.dumps(meta))
    assert "not a readable torch file" in checkpointer.damage(ckpts / "step00000006")


def test_resume_falls_back_past_a_damaged_newest(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    save(ckpts, 3)
    save(ckpts, 6)
    (ckpts / "step00000006" / "mp_rank_00_model_states.pt").unlink()
    train = SimpleNamespace(resume="auto", init_from="")
    with caplog.at_level(logging.WARNING, logger="llada_scale"):
        assert resume.choose_resume_dir(train, ckpts) == ckpts / "step00000003"
    assert "skipping damaged checkpoint" in caplog.text and "step00000006" in caplog.text
    with pytest.raises(TrainError, match="the checkpoint is damaged"):  # named explicitly: refused, no fallback
        resume.choose_resume_dir(SimpleNamespace(resume=str(ckpts / "step00000006"), init_from=""), ckpts)
    (ckpts / "step00000003" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(TrainError, match="no loadable checkpoint"):
        resume.choose_resume_dir(train, ckpts)


@pytest.mark.parametrize("fail", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 470"),
                                  OSError(errno.ENOSPC, "No space left on device")])
def test_disk_full_during_save(tmp_path, fail):
    ckpts = tmp_path / "checkpoints"
    save(ckpts, 5)
    with pytest.raises(CheckpointError) as e:
        save(ckpts, 10, engine=FakeEngine(fail))
    msg = str(e.value)
    assert msg.startswith(f"no space left on device writing checkpoint {ckpts}/step00000010.tmp")
    assert f"the previous checkpoint {ckpts}/step00000005 is intact" in msg
    assert not (ckpts / "step00000010.tmp").exists() and steps(ckpts) == [5]
    assert checkpointer.find_latest(ckpts) == ckpts / "step00000005"


def test_other_save_failures_name_the_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*step00000001.tmp failed: PermissionError"):
        save(tmp_path / "c", 1, engine=FakeEngine(PermissionError(13, "Permission denied")))


def test_fresh_start_over_another_run_is_refused(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    assert resume.choose_resume_dir(SimpleNamespace(resume="none", init_from=""), ckpts) is None  # nothing there
    save(ckpts, 20)
    with pytest.raises(TrainError, match=r"train.resume=none, but .* already holds checkpoints of a run \(newest "
                                         r"step00000020\)"):
        resume.choose_resume_dir(SimpleNamespace(resume="none", init_from=""), ckpts)


def test_init_from_on_the_command_line_vs_a_checkpoint(tmp_path, caplog):
    """--init_from typed on the command line into a run directory whose checkpoint --resume auto would load
    instead: refused unless --resume is given too; the recipe's init_from is only logged."""
    run = tmp_path / "run"
    cfg = SimpleNamespace(run_dir=str(run), train=SimpleNamespace(init_from="runs/ar", resume="auto"))
    resume.check_init_from(cfg, cli_init_from=True, cli_resume=False)  # no checkpoint yet: fine
    save(run / "checkpoints", 8)
    with pytest.raises(TrainError, match="--init_from runs/ar was given, but .* holds checkpoint"):
        resume.check_init_from(cfg, cli_init_from=True, cli_resume=False)
    resume.check_init_from(cfg, cli_init_from=True, cli_resume=True)
    resume.check_init_from(cfg, cli_init_from=False, cli_resume=False)
    with caplog.at_level(logging.WARNING, logger="llada_scale"):
        assert resume.choose_resume_dir(cfg.train, run / "checkpoints") == run / "checkpoints" / "step00000008"
    assert "train.init_from=runs/ar is ignored" in caplog.text
