"""Checkpoint integrity (issue 20): SHA-256 digests written with every checkpoint and converter output and verified
before use (a flipped byte of the same size is caught, resume falls back past it, loaders refuse it with one
line), imported checksum files, truncated headers, and what ``--force`` may replace."""

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch

import llada_scale.checkpoint as cio
from llada_scale.checkpoint import checkpointer, integrity
from llada_scale.checkpoint.streaming import scan_weights
from llada_scale.model.transformer import Transformer
from llada_scale.training import resume
from tests.checkpoint.test_checkpointer import save
from tests.checkpoint.test_convert import _save_ours, convert, tiny_cfg


def flip(path: Path, where: float = 0.6) -> None:
    """Flip one byte in place (same size)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_flipped_byte_in_a_checkpoint_is_caught_and_resume_falls_back(tmp_path, caplog, victim):
    ckpts = tmp_path / "checkpoints"
    for s in (2, 4):
        save(ckpts, s)
    meta = checkpointer.read_meta(ckpts / "step00000004")
    assert set(meta["sha256"]) == set(meta["files"]) and len(meta["sha256"]) == 2
    assert checkpointer.damage(ckpts / "step00000004") is None
    flip(ckpts / "step00000004" / victim)
    why = checkpointer.damage(ckpts / "step00000004")
    assert why and victim in why and "SHA-256" in why
    assert checkpointer.damage(ckpts / "step00000004", verify=False) is None  # sizes and zip directory still fine
    cfg = type("T", (), {"resume": "auto", "init_from": None})()
    with caplog.at_level(logging.WARNING, logger="llada_scale"):
        assert resume.choose_resume_dir(cfg, ckpts) == ckpts / "step00000002"
    assert victim in caplog.text and "previous" in caplog.text
    # a damaged tag given by name is refused; the converters refuse it with one line naming the file
    cfg.resume = str(ckpts / "step00000004")
    with pytest.raises(resume.TrainError, match=victim):
        resume.choose_resume_dir(cfg, ckpts)
    with pytest.raises(cio.CheckpointError, match=victim):
        integrity.verify_source("deepspeed", str(ckpts / "step00000004"))
    os.environ["LLADA_SCALE_VERIFY"] = "0"
    try:
        integrity.verify_source("deepspeed", str(ckpts / "step00000004"))  # the opt-out skips it
    finally:
        del os.environ["LLADA_SCALE_VERIFY"]


def test_converter_output_records_and_checks_digests(tmp_path, capsys):
    torch.manual_seed(0)
    src = _save_ours(tmp_path / "src", Transformer(tiny_cfg()))
    out = tmp_path / "out"
    assert convert("consolidate", src, out, "--any_source", "--dtype", "fp32", "--quiet") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"output: {out}"  # the real path, not the staging one
    sums = integrity.read_sums(str(out / integrity.SUMS_FILE))
    assert set(sums) == {"config.json", "model.safetensors"}
    assert sums["model.safetensors"] == integrity.sha256_file(str(out / "model.safetensors"))
    cio.load_model_state(str(out), progress=False)
    flip(out / "model.safetensors")
    integrity._verified.clear()
    with pytest.raises(cio.CheckpointError, match=r"model\.safetensors does not match its SHA-256"):
        cio.load_model_state(str(out), progress=False)
    import llada_scale

    with pytest.raises(cio.CheckpointError, match="SHA-256"):
        llada_scale.load(str(out), device="cpu")
    assert convert("export-hf", out, tmp_path / "hf", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and not (tmp_path / "hf").exists()
    assert convert("export-hf", out, tmp_path / "hf", "--quiet", "--no_verify") == 0


def test_imported_checksum_files_and_truncated_headers(tmp_path):
    torch.manual_seed(0)
    src = _save_ours(tmp_path / "hf", Transformer(tiny_cfg()))
    good = integrity.sha256_file(str(src / "model.safetensors"))
    (src / "model.safetensors.sha256").write_text(f"{good}  model.safetensors\n")
    assert "model.embed_tokens.weight" in scan_weights(str(src))
    (src / "model.safetensors.sha256").write_text(f"{good}\n")  # a bare digest names its own file
    assert "model.embed_tokens.weight" in scan_weights(str(src))
    (src / "model.safetensors.sha256").write_text(f"{'0' * 64}  model.safetensors\n")
    integrity._verified.clear()
    with pytest.raises(cio.CheckpointError, match="does not match its SHA-256"):
        scan_weights(str(src))
    (src / "model.safetensors.sha256").unlink()
    # an index that records digests (metadata.sha256) is verified too
    (src / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"sha256": {"model.safetensors": "f" * 64}},
        "weight_map": {k: "model.safetensors" for k in scan_weights(str(src))}}))
    with pytest.raises(cio.CheckpointError, match="metadata.sha256"):
        cio.load_model_state(str(src), progress=False)
    (src / "model.safetensors.index.json").unlink()
    # a truncated header is one line naming the file
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:20])
    for reader in (lambda: scan_weights(str(src)), lambda: cio.load_model_state(str(src), progress=False)):
        with pytest.raises(cio.CheckpointError, match="cannot read .*model.safetensors") as e:
            reader()
        assert "\n" not in str(e.value)


def test_force_never_deletes_foreign_files_or_the_input(tmp_path, capsys):
    torch.manual_seed(0)
    src = _save_ours(tmp_path / "src", Transformer(tiny_cfg()))
    # a run directory (checkpoints + metrics) holding the input: refused, nothing deleted
    run = tmp_path / "run"
    save(run / "checkpoints", 10)
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    tag = run / "checkpoints" / "step00000010"
    assert convert("consolidate", tag, run, "--force", "--quiet") == 2
    assert "input" in capsys.readouterr().err
    assert convert("consolidate", src, run, "--any_source", "--force", "--quiet") == 2
    assert "training run directory" in capsys.readouterr().err
    assert tag.is_dir() and (run / "metrics.jsonl").is_file()
    assert convert("consolidate", src, src, "--any_source", "--force", "--quiet") == 2  # output == input
    # a foreign directory: --force replaces our format's files only
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    assert convert("consolidate", src, out, "--any_source", "--quiet") == 2  # not empty, no --force
    assert convert("consolidate", src, out, "--any_source", "--force", "--quiet") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors", "notes.txt"]
    cio.load_model_state(str(out), progress=False)
    # a directory this tool wrote (every file in its SHA256SUMS) is replaced as a whole
    own = tmp_path / "own"
    assert convert("consolidate", src, own, "--any_source", "--quiet", "--max_shard_size", "20KB") == 0
    assert (own / "model.safetensors.index.json").is_file()
    # a stale staging directory of a killed run (dead pid on this host) is removed by the next run
    stale = tmp_path / f".own.tmp-{socket.gethostname()}-999999999-abc"
    stale.mkdir()
    assert convert("consolidate", src, own, "--any_source", "--force", "--quiet") == 0
    assert sorted(p.name for p in own.iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors"]
    assert not stale.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".own.")]


def test_retention_keeps_older_checkpoints_when_the_new_one_does_not_check(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    save(ckpts, 2)
    real = checkpointer.damage
    monkeypatch.setattr(checkpointer, "damage", lambda d, verify=None: "a file vanished" if d.name.endswith("4")
                        else real(d, verify))
    save(ckpts, 4, keep_last=1)
    assert [p.name for p in checkpointer.list_complete(ckpts)] == ["step00000002", "step00000004"]
    monkeypatch.undo()
    save(ckpts, 6, keep_last=1)
    assert [p.name for p in checkpointer.list_complete(ckpts)] == ["step00000006"]
