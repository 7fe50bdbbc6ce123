"""Faults at every writer (issue 20), simulated fast by failing writes with ENOSPC: metrics.jsonl never ends in a
half line, build_shards and the converters exit 2 with one line and leave the previous output as it was; a .gz
whose checksum fails is refused (its rows may be garbled)."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from llada_scale.data import build as build_mod
from llada_scale.model.transformer import Transformer
from llada_scale.training import metrics as metrics_mod
from tests.checkpoint.test_convert import _save_ours, convert, tiny_cfg
from tests.data.test_build import DOCS, _build

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def test_metrics_never_end_in_a_half_line(tmp_path, monkeypatch, caplog):
    path = tmp_path / "metrics.jsonl"
    assert metrics_mod.append_line(path, json.dumps({"step": 1, "loss": 1.0}), 1)
    real = os.write

    def half_then_full(fd, data):  # the disk fills up in the middle of the line
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with caplog.at_level(logging.WARNING, logger="llada_scale"):
        assert not metrics_mod.append_line(path, json.dumps({"step": 2, "loss": 0.5}), 2)
    assert "No space left on device" in caplog.text and "step 2 not written" in caplog.text
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'  # cut back to the whole line
    assert metrics_mod.append_line(path, json.dumps({"step": 3}), 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 3]


def test_build_shards_disk_full_keeps_the_previous_build(tokenizer_path, tmp_path, monkeypatch, capsys):
    import build_shards as cli

    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "out"
    _build(tokenizer_path, [src], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    def full(output, *a, **k):
        os.makedirs(output, exist_ok=True)
        (Path(output) / "train-000000.tar").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(output) / "train-000000.tar"))

    monkeypatch.setattr(build_mod, "write_shard_dir", full)
    rc = cli.main(["--input", str(src), "--tokenizer", str(tokenizer_path), "--output", str(out), "--kind",
                   "pretrain", "--overwrite", "--num_workers", "1", "--no_progress", "--seed", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no space left on device" in err[0] and str(out) in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "out.building").exists()


def test_gzip_checksum_failure_is_refused(tokenizer_path, tmp_path):
    gz = bytearray(gzip.compress(("\n".join(DOCS) + "\n").encode()))
    gz[-8] ^= 0xFF  # the CRC32 in the trailer: every byte decompresses, the check at the end fails
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(gz))
    with pytest.raises(build_mod.BuildError, match="gzip checksum does not match .* may be garbled"):
        _build(tokenizer_path, [tmp_path / "crc.jsonl.gz"], tmp_path / "a")
    assert not (tmp_path / "a" / "index.json").exists()


@pytest.mark.parametrize("command", ["consolidate", "export-hf"])
def test_converter_disk_full_is_one_line_and_keeps_the_old_output(tmp_path, monkeypatch, capsys, command):
    torch.manual_seed(0)
    src = _save_ours(tmp_path / "src", Transformer(tiny_cfg()))
    out = tmp_path / "out"
    extra = ["--any_source"] if command == "consolidate" else []
    assert convert(command, src, out, *extra, "--quiet") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full(*a, **k):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")  # what safetensors raises

    monkeypatch.setattr("safetensors.torch.save_file", full)
    assert convert(command, src, out, *extra, "--force", "--quiet") == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("warning")]
    assert len(err) == 1 and "no space left on device" in err[0] and "left as it was" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
