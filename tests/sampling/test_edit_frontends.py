"""The editing decoder through its front ends: ``Model.generate(sampler="edit", ...)`` equals
:func:`llada_scale.sampling.edit.edit_generate`, presets and knobs reach it, other samplers refuse its knobs;
tools/chat.py ``--sampler edit --watch``; the lm-eval harness model args."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

import llada_scale
from llada_scale.sampling import truncate_at
from llada_scale.sampling.edit import edit_generate

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import chat  # noqa: E402


@pytest.fixture(scope="module")
def bd(tiny_checkpoint):
    return tiny_checkpoint(False, 160, run_config={"objective": {"name": "sft", "block_length": 4}})


def test_api_edit_sampler_equals_edit_generate(bd):
    m = llada_scale.load(bd)
    prompts = ["Hello there", "The history of Rome"]
    out = m.generate(prompts, gen_length=10, sampler="edit", editing_threshold=0.0, max_post_steps=3, batch_size=2)
    ids = [m.tokenizer.encode(p) for p in prompts]
    ref = edit_generate(m.module, ids, mask_token_id=m.mask_token_id, gen_length=10, block_length=4, threshold=0.7,
                        editing_threshold=0.0, max_post_steps=3, suppress_token_ids=m.suppress_token_ids,
                        eos_token_id=m.stop_ids[0])
    assert out == [m.decode(truncate_at(t, m.stop_ids)) for t in ref.tokens]
    res = m.generate_ids(ids, gen_length=10, sampler="edit", preset="speed")
    speed = edit_generate(m.module, ids, mask_token_id=m.mask_token_id, gen_length=10, block_length=4,
                          threshold=0.5, editing_threshold=0.0, max_post_steps=16,
                          suppress_token_ids=m.suppress_token_ids)
    assert res.nfe == speed.nfe and res.extra["edits"] == speed.extra["edits"]
    frames = []
    m.generate("hi", gen_length=8, sampler="edit", callback=lambda s, t, c, e: frames.append((t.shape, e.shape)))
    assert frames and frames[0] == ((1, 8), (1, 8))
    with pytest.raises(ValueError, match="only apply to sampler='edit'"):
        m.generate("hi", gen_length=8, sampler="block", editing_threshold=0.1)
    with pytest.raises(ValueError, match="cache"):
        m.generate("hi", gen_length=8, sampler="edit", cache="dual")
    with pytest.raises(ValueError, match="preset"):
        m.generate("hi", gen_length=8, sampler="edit", preset="fast")


def test_chat_edit_watch(bd, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    rc = chat.main([bd, "--gen_length", "8", "--sampler", "edit", "--preset", "speed", "--watch"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("model> ") == 1
    assert any(line.startswith("[step") for line in out.splitlines())
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert chat.main([bd, "--gen_length", "8", "--sampler", "edit", "--editing_threshold", "none"]) == 0


def test_harness_model_args_reach_the_edit_sampler(bd, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llada_scale.eval import harness

    opts = harness.parse_model_args({"pretrained": bd, "sampler": "edit", "editing_threshold": "none",
                                     "preset": "quality"})
    assert opts["editing_threshold"] is None and opts["preset"] == "quality"
    with pytest.raises(ValueError, match="editing_threshold"):
        harness.parse_model_args({"pretrained": bd, "editing_threshold": "high"})
    lm = harness.LladaScaleLM(pretrained=bd, sampler="edit", editing_threshold="0.0", max_post_steps=2)
    seen = {}
    real = llada_scale.api.Model.generate_ids
    monkeypatch.setattr(llada_scale.api.Model, "generate_ids",
                        lambda self, ids, **kw: (seen.update(kw), real(self, ids, **kw))[1])
    outs = lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                       arguments=("Hello", {"until": ["\n"], "max_gen_toks": 6}))], disable_tqdm=True)
    assert len(outs) == 1 and seen["sampler"] == "edit" and seen["gen_length"] == 6
    assert (seen["editing_threshold"], seen["max_post_steps"], seen["preset"]) == (0.0, 2, None)
