"""lm-evaluation-harness: our shipped tasks run end to end through ``python -m llada_scale.eval.harness`` on a tiny
checkpoint offline; bad model_args fail in one line before any model loads; the model class's loglikelihood,
loglikelihood_rolling and generate_until agree with computations done another way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from llada_scale.eval import harness  # noqa: E402
from llada_scale.sampling import diffusion_generate, log_likelihood  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {"ar": tiny_checkpoint(True), "dm": tiny_checkpoint(False), "ar_short": tiny_checkpoint(True, 16)}


def test_cli_end_to_end_offline(ckpts, tmp_path, capsys):
    """Two shipped tasks (likelihood and generation) on the diffusion checkpoint through lm-eval's own CLI."""
    rc = harness.main(["--model_args", f"pretrained={ckpts['dm']},mc_samples=2,gen_length=8,block_length=8",
                       "--tasks", "llada_piqa,llada_gsm8k", "--limit", "2", "--output_path", str(tmp_path)])
    assert rc == 0
    assert "llada_piqa" in capsys.readouterr().out
    res = json.loads(next(Path(tmp_path).rglob("results_*.json")).read_text())
    assert set(res["results"]) == {"llada_piqa", "llada_gsm8k"}
    assert 0 <= res["results"]["llada_piqa"]["acc,none"] <= 1
    assert "exact_match,strict-match" in res["results"]["llada_gsm8k"]
    assert res["config"]["model"] == "llada_scale" and res["n-samples"]["llada_piqa"]["effective"] == 2


def test_bad_model_args_fail_in_one_line_before_loading(ckpts, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(harness.api, "load", no_load)
    dm = ckpts["dm"]
    for extra, msg in ((["--model_args", f"pretrained={dm},mc_sample=4"], "unknown model_arg(s) mc_sample"),
                       (["--model_args", f"pretrained={dm},cache=triple"], "cache='triple': choose one of prefix, dual"),
                       (["--model_args", f"pretrained={dm},mc_samples=x"], "mc_samples='x' must be an integer"),
                       (["--model_args", "mc_samples=4"], "needs pretrained=CHECKPOINT"),
                       (["--model_args", f"pretrained={dm}/nope"], "does not exist"),
                       (["--model_args", f"pretrained={dm}", "--limit", "-3"], "--limit must be >= 0")):
        assert harness.main([*extra, "--tasks", "llada_piqa"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError, match="unknown model_arg"):
        harness.LladaScaleLM(pretrained=ckpts["dm"], nope=1)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_ar_loglikelihood_exact_with_greedy_flag(ckpts):
    lm = harness.LladaScaleLM(pretrained=ckpts["ar"], batch_size=2)
    m = lm.m
    ctx = "The history of"
    ids = m.tokenizer.encode(ctx)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(m.module(torch.tensor([ids]))[0, -1, :m.tokenizer.vocab_size].argmax()))
    greedy_text = m.decode(ids[len(m.tokenizer.encode(ctx)):])
    out = lm.loglikelihood([_req("loglikelihood", ctx, greedy_text), _req("loglikelihood", ctx, " Rome")],
                           disable_tqdm=True)
    c, a = m.encode_pair(ctx, " Rome")
    assert out[1][0] == pytest.approx(log_likelihood(m.module, c, a, causal=True), abs=1e-6)
    assert out[0][1] is (m.encode_pair(ctx, greedy_text)[1] == ids[len(m.tokenizer.encode(ctx)):])
    assert out[1][1] is False


def test_diffusion_is_greedy_by_decoding(ckpts):
    lm = harness.LladaScaleLM(pretrained=ckpts["dm"], mc_samples=2)
    m = lm.m
    ctx = m.tokenizer.encode("Once upon a time")
    res = diffusion_generate(m.module, [ctx], mask_token_id=m.mask_token_id, gen_length=3, block_length=3, steps=3,
                             suppress_token_ids=m.suppress_token_ids)
    greedy = res.tokens[0]
    assert lm._greedy([(ctx, greedy), (ctx, [(t + 1) % 6000 for t in greedy])]) == [True, False]
    out = lm._loglikelihood_tokens([(None, ctx, greedy)], disable_tqdm=True)
    assert out[0][1] is True and out[0][0] < 0


def test_rolling_scores_every_token_once(ckpts, monkeypatch):
    """max_seq_len 16: a ~40-token text is cut into windows; every token is scored exactly once, and with one
    window the result equals the exact chain rule after the prefix token."""
    lm = harness.LladaScaleLM(pretrained=ckpts["ar_short"])
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age"
    tokens = lm.tok_encode(text)
    seen = []
    real = lm.m.log_likelihood_ids
    monkeypatch.setattr(lm.m, "log_likelihood_ids", lambda pairs, **kw: (seen.extend(pairs), real(pairs, **kw))[1])
    total = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)], disable_tqdm=True)[0]
    assert [t for _, cont in seen for t in cont] == tokens and len(seen) >= 2
    assert all(len(c) + len(a) <= 16 for c, a in seen)
    assert total == pytest.approx(sum(log_likelihood(lm.m.module, c, a, causal=True) for c, a in seen), abs=1e-5)
    short = "It was the best"
    one = lm.loglikelihood_rolling([_req("loglikelihood_rolling", short)], disable_tqdm=True)[0]
    assert one == pytest.approx(log_likelihood(lm.m.module, [lm.prefix_token_id], lm.tok_encode(short), causal=True),
                                abs=1e-5)


def test_generate_until_honours_stop_sequences(ckpts):
    lm = harness.LladaScaleLM(pretrained=ckpts["ar"], gen_length=12)
    free = lm.generate_until([_req("generate_until", "Once upon a time", {"until": []})], disable_tqdm=True)[0]
    assert len(free) > 4
    stop = free[2:4]
    cut = lm.generate_until([_req("generate_until", "Once upon a time", {"until": [stop, "zzz"]})],
                            disable_tqdm=True)[0]
    assert cut == free[:free.find(stop)]
    assert harness.cut_at_stops("a\nb Question: c", ["Question:", "\n"]) == "a"
    dm = harness.LladaScaleLM(pretrained=ckpts["dm"], block_length=8)
    assert dm._gen_length({"max_gen_toks": 10}) == 16  # rounded up to a block
    outs = dm.generate_until([_req("generate_until", "Hello", {"until": ["\n"], "max_gen_toks": 8})] * 3,
                             disable_tqdm=True)
    assert len(set(outs)) == 1 and all("\n" not in o for o in outs)


def test_model_args_out_of_range_are_refused():
    """0, NaN and inf in numeric model_args, and steps above gen_length, are refused like the API refuses them
    (they used to be replaced by defaults or passed on)."""
    for extra, msg in (({"temperature": "nan"}, "temperature must be a finite number"),
                       ({"cfg_scale": "inf"}, "cfg_scale must be a finite number"),
                       ({"gen_length": "0"}, "gen_length must be an integer >= 1"),
                       ({"steps": "0"}, "steps must be an integer >= 1"),
                       ({"gen_length": "8", "steps": "64"}, "steps must be an integer >= 1 and <= 8"),
                       ({"block_length": "0"}, "block_length must be an integer >= 1"),
                       ({"threshold": "0"}, "threshold must be > 0")):
        with pytest.raises(ValueError, match=msg):
            harness.parse_model_args({"pretrained": "x", **extra})
    assert harness.parse_model_args({"pretrained": "x", "gen_length": "8", "steps": "8"})["steps"] == 8
