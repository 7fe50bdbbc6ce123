"""tools/eval_diffusion.py on a LLaDA2 MoE checkpoint: the llada2 sampler (the release's generate()) and the block
likelihood are its defaults, tasks run through lm-eval, and settings the sampler cannot honour are refused in one
line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from tests.eval.test_eval_cli import SMALL, evaluate  # noqa: E402

import llada_scale.checkpoint as cio  # noqa: E402
from llada_scale.model.llada2_moe import LLaDA2Config, LLaDA2MoeModel  # noqa: E402


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer_path):
    from llada_scale.data.tokenizer import Tokenizer

    tok = Tokenizer.load(str(tokenizer_path))
    torch.manual_seed(0)
    cfg = LLaDA2Config(vocab_size=tok.padded_vocab_size(), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=48, moe_intermediate_size=8, num_experts=8,
                       num_experts_per_tok=2, n_group=4, topk_group=2, max_seq_len=512,
                       mask_token_id=tok.mask_token_id)
    out = tmp_path_factory.mktemp("moe") / "llada2"
    cio.save_safetensors(LLaDA2MoeModel(cfg).state_dict(), str(out),
                         {"format": "llada_scale", "model": cfg.to_dict(), "tokenizer": tok.identity()},
                         dtype="fp32", progress=False)
    return out


def test_llada2_checkpoint_defaults_to_its_sampler(moe_dir, tmp_path):
    out = tmp_path / "res.json"
    assert evaluate("--checkpoint", moe_dir, "--tasks", "gsm8k,piqa", "--limit", "2", "--output", out, *SMALL) == 0
    res = json.loads(out.read_text())
    (info,) = res["models"].values()
    assert (info["sampler"], info["likelihood"]) == ("llada2", "block"), info
    for task in ("gsm8k", "piqa"):
        (m,) = res["results"][task].values()
        assert m["n"] == 2 and m["nfe"] > 0, (task, m)


def test_llada2_sampler_refuses_cfg(moe_dir, capsys):
    assert evaluate("--checkpoint", moe_dir, "--tasks", "gsm8k", "--cfg_scale", "1.0", *SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llada2 sampler does not support --cfg_scale" in err[0], err
