"""Every argument of the API checked (issue 20): wrong types, 0 / NaN / inf, steps above the answer length, lone
surrogates, sizes that cannot fit in memory: one-line ValueError before any work; load() on a CUDA device
without CUDA, a LoRA run and a LLaDA-format directory say what to run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import llada_scale
import llada_scale.checkpoint as cio
from llada_scale.sampling import validate


@pytest.fixture(scope="module")
def dm(tiny_checkpoint):
    return llada_scale.load(tiny_checkpoint(False), device="cpu")


@pytest.fixture(scope="module")
def ar(tiny_checkpoint):
    return llada_scale.load(tiny_checkpoint(True), device="cpu")


BAD_GENERATE = [
    (dict(gen_length=0), "gen_length must be an integer >= 1"),
    (dict(gen_length=8.0), "gen_length must be an integer"),
    (dict(gen_length=True), "gen_length must be an integer"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(gen_length=8, steps=800), "steps must be an integer >= 1 and <= 8, got 800"),
    (dict(block_length=0), "block_length must be an integer >= 1"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature="0.5"), "temperature must be a number"),
    (dict(cfg_scale=math.inf), "cfg_scale must be a finite number"),
    (dict(threshold=0.0), "threshold must be > 0"),
    (dict(threshold=1.5), "threshold must be <= 1"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(callback="print"), "callback must be callable"),
    (dict(allow_extrapolation="yes"), "allow_extrapolation must be True or False"),
    (dict(gen_length=10**9, allow_extrapolation=True), "need at least .* GiB on cpu"),
]


@pytest.mark.parametrize("kw,match", BAD_GENERATE)
def test_generate_refuses_bad_arguments(dm, ar, kw, match):
    for model in (dm, ar):
        with pytest.raises(ValueError, match=match) as e:
            model.generate("hello", **kw)
        assert "\n" not in str(e.value)


def test_text_and_likelihood_arguments(dm, ar):
    for model in (dm, ar):
        with pytest.raises(ValueError, match="prompt is not valid Unicode"):
            model.generate("hi \udcff there")
        with pytest.raises(ValueError, match="prompts must be"):
            model.generate([])
        with pytest.raises(ValueError, match="prompt must be a str"):
            model.generate([b"bytes"])
        with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] is not valid Unicode"):
            model.chat([{"role": "user", "content": "\ud800"}])
        with pytest.raises(ValueError, match=r"messages\[0\] must be a dict with role"):
            model.chat([{"role": "robot", "content": "hi"}])
        with pytest.raises(ValueError, match="continuation is not valid Unicode"):
            model.log_likelihood("a", "\udc80")
        for kw, match in ((dict(mc_samples=0), "mc_samples must be an integer >= 1"),
                          (dict(cfg_scale=math.nan), "cfg_scale must be a finite"),
                          (dict(batch_size=10**9), "need at least .* GiB")):
            with pytest.raises(ValueError, match=match):
                model.log_likelihood("the", " cat", **kw)
    # good arguments still work (and steps == gen_length, the documented default, is accepted)
    assert isinstance(dm.generate("hello", gen_length=8, steps=8)[0], str)


def test_fits_estimate_scales_with_the_request():
    cfg = type("C", (), dict(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=32, vocab_size=1000))()
    validate.check_fits(cfg, 1, 100, torch.device("cpu"), "x")  # tiny: fits
    free = validate.available_bytes(torch.device("cpu"))
    assert free and free > 0
    rows = free // (100 * 8 * 1000) + 1  # the logits alone exceed the free memory
    with pytest.raises(ValueError, match="lower batch_size"):
        validate.check_fits(cfg, rows, 100, torch.device("cpu"), "x")


def test_load_explains_what_to_run_first(tiny_checkpoint, tmp_path, monkeypatch):
    path = tiny_checkpoint(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(cio.CheckpointError, match="CUDA is not available"):
        llada_scale.load(path, device="cuda")
    llada = tmp_path / "llada"
    llada.mkdir()
    (llada / "config.json").write_text(json.dumps({"model_type": "llada", "architectures": ["LLaDAModelLM"]}))
    with pytest.raises(cio.CheckpointError, match="import-llada"):
        llada_scale.load(str(llada), device="cpu")
    tag = tmp_path / "run" / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tag / "llada_scale.json").write_text(json.dumps({"config": {"train": {"lora": {"rank": 8}}}}))
    (tag.parent / "latest").write_text(tag.name)
    with pytest.raises(cio.CheckpointError, match="merge-lora"):
        llada_scale.load(str(tmp_path / "run"), device="cpu")
