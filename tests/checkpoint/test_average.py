"""``convert_checkpoint.py average``: uniform and weighted means equal the mean computed by hand, streamed
(consolidated sources, sharded output) and accumulated (other sources) paths agree, mismatched configs are
refused, and ``--best_k`` picks the checkpoints with the lowest logged validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llada_scale.checkpoint as cio
from llada_scale.checkpoint.average import best_checkpoints
from llada_scale.model.transformer import Transformer
from tests.checkpoint.test_convert import _save_ours, convert, tiny_cfg


def models(n, **kw):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(Transformer(tiny_cfg(**kw)))
    return out


def load(path):
    return cio.load_model_state(str(path), progress=False)[0]


def test_uniform_and_weighted_means(tmp_path, capsys):
    ms = models(3)
    src = [_save_ours(tmp_path / f"m{i}", m) for i, m in enumerate(ms)]
    assert convert("average", *src, tmp_path / "avg", "--quiet") == 0
    got = load(tmp_path / "avg")
    for k, v in ms[0].state_dict().items():
        ref = (v.double() + ms[1].state_dict()[k].double() + ms[2].state_dict()[k].double()) / 3
        torch.testing.assert_close(got[k].double(), ref, rtol=1e-6, atol=1e-7)
    # weights normalised to sum 1; several output shards; the model loads and runs
    assert convert("average", src[0], src[1], tmp_path / "w", "--weights", "3", "1", "--max_shard_size", "40KB",
                   "--quiet") == 0
    assert len(list((tmp_path / "w").glob("model-*.safetensors"))) > 1
    got = load(tmp_path / "w")
    for k, v in ms[0].state_dict().items():
        torch.testing.assert_close(got[k].double(), 0.75 * v.double() + 0.25 * ms[1].state_dict()[k].double(),
                                   rtol=1e-6, atol=1e-7)
    model = cio.build_model_from_checkpoint(str(tmp_path / "w"))
    assert model.config.to_dict() == ms[0].config.to_dict()
    meta = json.loads((tmp_path / "w" / "config.json").read_text())
    assert meta["source"]["weights"] == [0.75, 0.25] and meta["source"]["kind"] == "average"


def test_accumulated_path_equals_streamed(tmp_path):
    ms = models(2)
    src = [_save_ours(tmp_path / f"m{i}", m) for i, m in enumerate(ms)]
    assert convert("average", *src, tmp_path / "a", "--quiet") == 0
    # a .safetensors file source takes the load-one-at-a-time path
    files = [str(Path(s) / "model.safetensors") for s in src]
    assert convert("average", *files, tmp_path / "b", "--quiet") == 0
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_configs_and_bad_weights_refused(tmp_path, capsys):
    a = _save_ours(tmp_path / "a", models(1)[0])
    b = _save_ours(tmp_path / "b", models(1, num_layers=3)[0])
    assert convert("average", a, b, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another model config" in err and "num_layers" in err
    assert not (tmp_path / "out").exists()
    assert convert("average", a, a, tmp_path / "out", "--weights", "1") == 2
    assert "--weights needs 2 numbers" in capsys.readouterr().err
    assert convert("average", a) == 2


def test_best_k_picks_lowest_val_loss(tmp_path, capsys):
    run = tmp_path / "run"
    ms = models(4)
    losses = {100: 3.0, 200: 2.5, 300: 2.7, 400: 2.6}
    for (step, _), m in zip(losses.items(), ms):
        _save_ours(run / "checkpoints" / f"step{step:08d}", m)
    rows = [{"step": s, "train/loss": 9.0} for s in losses] + [{"step": s, "val/loss": v} for s, v in losses.items()]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken")
    picked = best_checkpoints(str(run), 2)
    assert [Path(p).name for p, _ in picked] == ["step00000200", "step00000400"]
    assert convert("average", "--best_k", "2", run, tmp_path / "best", "--quiet") == 0
    got = load(tmp_path / "best")
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(got[k].double(), (ms[1].state_dict()[k].double() + ms[3].state_dict()[k].double()) / 2,
                               rtol=1e-6, atol=1e-7)
    assert convert("average", "--best_k", "5", run, tmp_path / "x") == 2
    assert "4 checkpoint(s) with a logged val/loss" in capsys.readouterr().err
