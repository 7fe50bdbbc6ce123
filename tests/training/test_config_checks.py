"""Recipes, overrides and DeepSpeed configs that used to be accepted and ignored or misread, or came out as
tracebacks: every field type-checked, ranges and choices checked before anything runs, unknown DeepSpeed
sections refused, and the entry point's one-line error contract (exit 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llada_scale.training.config import ConfigError, load_config
from llada_scale.training.engine import TrainError, build_ds_config

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "configs" / "diffusion_pretrain_tiny.yaml")


@pytest.mark.parametrize("override,message", [
    ('model.causal="false"', "model.causal must be true or false (a YAML bool, unquoted), not 'false'"),
    ("train.max_steps=2.5", "train.max_steps must be an integer, not 2.5"),
    ("train.max_steps=-5", "train.max_steps must be >= 1, not -5"),
    ("optim.betas=0.9", "optim.betas must be a list of two numbers"),
    ("optim.schedule=cosin", "optim.schedule must be one of wsd, cosine, constant, not 'cosin'"),
    ("data.seq_len=512", "data.seq_len=512 is longer than the model's max_seq_len=256"),
    ("train.wandb=maybe", "train.wandb must be one of auto, online, offline, off"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("data.num_workers=two", "data.num_workers must be an integer, not 'two'"),
    ("train.early_stop_patience=3", "train.early_stop_patience needs validation"),
    ("train=5", "section train must be a mapping"),
])
def test_bad_values_are_refused(override, message):
    extra = ["train.val_every=0"] if override.startswith("train.early_stop") else []
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [*extra, override])
    assert message in str(e.value)


def test_values_that_are_fine(monkeypatch):
    """1e4 is an integer, integral floats too; ${VAR} values of non-string fields are read as YAML."""
    monkeypatch.setenv("LLADA_TEST_CAUSAL", "false")
    cfg = load_config(RECIPE, ["train.max_steps=1e4", "train.save_every=100.0", "model.causal=${LLADA_TEST_CAUSAL}",
                               "optim.lr=3e-4", "optim.betas=[0.9, 0.99]", "train.val_every=${LLADA_UNSET_X:-5}"])
    assert cfg.train.max_steps == 10000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.save_every == 100 and cfg.model.causal is False and cfg.train.val_every == 5
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.lr == 3e-4


def test_yaml_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(str(bad))


def _ds(tmp_path, obj) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj))
    return str(p)


@pytest.mark.parametrize("ds,message", [
    ({"zero_optimizaton": {"stage": 2}}, "unknown DeepSpeed section(s) 'zero_optimizaton' (did you mean "
                                         "'zero_optimization'?)"),
    ({"zero_optimization": {"stage": "2"}}, "zero_optimization.stage must be the integer 0, 1, 2 or 3, not '2'"),
    ({"zero_optimization": {"stage": 2, "overlap_comms": True}}, "zero_optimization is not valid for DeepSpeed"),
    ({"bf16": {"enabled": "yes"}}, "bf16 must be"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_deepspeed_config(tmp_path, ds, message):
    cfg = load_config(RECIPE, ["train.global_batch_size=8", "train.micro_batch_size=4"])
    with pytest.raises(TrainError) as e:
        build_ds_config(_ds(tmp_path, ds), cfg, 1, torch.device("cpu"))
    assert message in str(e.value)


def test_shipped_deepspeed_configs_pass():
    cfg = load_config(RECIPE, ["train.global_batch_size=8", "train.micro_batch_size=4"])
    for f in sorted((REPO / "ds_configs").glob("*.json")):
        build_ds_config(str(f), cfg, 1, torch.device("cpu"))


def test_auto_zero_flags_resolve_by_device():
    """overlap_comm / contiguous_gradients "auto": off on CPU (both measured slower there), on for CUDA."""
    import unittest.mock as mock

    cfg = load_config(RECIPE, ["train.global_batch_size=8", "train.micro_batch_size=4"])
    path = str(REPO / "ds_configs" / "zero2.json")
    for device, expected in (("cpu", False), ("cuda", True)):
        with mock.patch("llada_scale.training.engine._bf16_auto", return_value=expected):  # no CUDA runtime here
            z = build_ds_config(path, cfg, 1, torch.device(device))["zero_optimization"]
        assert z["overlap_comm"] is expected and z["contiguous_gradients"] is expected


def test_user_error_one_line():
    """What train.py prints as one line (exit 2) and what keeps its traceback; a loader worker's error (re-raised
    by torch with the worker's traceback in its message) is reduced to its own message."""
    from torch._utils import ExceptionWrapper

    from llada_scale.data.shards import ShardError
    from llada_scale.model.transformer import ModelConfig
    from llada_scale.train import user_error

    with pytest.raises(ValueError) as e:
        ModelConfig(hidden_size=100, num_heads=3)
    assert user_error(e.value).startswith("hidden_size 100 is not divisible by num_heads 3")
    assert user_error(ValueError("a library's ValueError")) is None  # raised outside the package: traceback
    assert user_error(ZeroDivisionError("bug")) is None
    try:
        raise ShardError("/data/train-000003.tar: token id 9000 is outside the model's vocabulary")
    except ShardError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ShardError) as e:
        wrapped.reraise()
    assert "Traceback" in str(e.value)
    assert user_error(e.value) == "/data/train-000003.tar: token id 9000 is outside the model's vocabulary"


def test_entry_point_one_line_for_a_list_yaml(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    r = subprocess.run([sys.executable, "-m", "llada_scale.train", "--config", str(bad)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "must hold a mapping" in r.stderr


def test_options_may_follow_the_overrides():
    from llada_scale.train import parse_args

    a = parse_args(["--config", "x.yaml", "optim.lr=1e-3", "--resume", "none", "train.max_steps=5",
                    "--init_from", "runs/ar"])
    assert a.overrides == ["optim.lr=1e-3", "train.max_steps=5", "train.resume=none", "train.init_from=runs/ar"]
    assert a.cli_init_from and a.cli_resume
    assert not parse_args(["--config", "x.yaml", "train.max_steps=5"]).cli_init_from
