"""A LoRA checkpoint records its base (issue 20): resuming or merging on another model of the same shape is refused
with one line; the base it was trained on still resumes and merges."""

import json

import torch

from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.training.lora import base_identity, check_base
from tests.training.test_lora import LORA, base_model  # noqa: F401  (fixture)
from tests.training.test_train import train


def test_base_identity_tells_weights_apart():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    a, b = Transformer(cfg), Transformer(cfg)
    ia, ib = base_identity(a, "a"), base_identity(b, "b")
    assert ia["sha256"] == base_identity(a, "again")["sha256"] and ia["sha256"] != ib["sha256"]
    with torch.no_grad():
        b.load_state_dict(a.state_dict())
        b.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-6  # one weight, one ulp-scale change
    assert base_identity(b, "b")["sha256"] != ia["sha256"]
    check_base(None, ia, "old checkpoint")  # written before the identity was recorded: accepted
    check_base(ia, base_identity(a, "moved"), "ckpt")  # same weights at another path: accepted


def test_resume_and_merge_refuse_another_base(tmp_path, pretrain_shards, base_model):  # noqa: F811
    import llada_scale.checkpoint as cio
    from convert_checkpoint import main as convert

    run = tmp_path / "run"
    r = train(run, pretrain_shards, f"train.init_from={base_model}", *LORA, "train.max_steps=2", "train.stop_at_step=1",
              ds="ds_configs/zero2.json", check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((run / "checkpoints" / "step00000001" / "llada_scale.json").read_text())
    assert len(meta["lora_base"]["sha256"]) == 64 and meta["lora_base"]["model"]["hidden_size"] == 64
    # another model of the same shape where the base was
    other = tmp_path / "other"
    torch.manual_seed(7)
    model_cfg = ModelConfig(**meta["lora_base"]["model"])
    cio.save_safetensors(Transformer(model_cfg).state_dict(), str(other), {"format": "llada_scale",
                                                                           "model": model_cfg.to_dict()},
                         dtype="fp32", progress=False)
    r = train(run, pretrain_shards, f"train.init_from={other}", *LORA, "train.max_steps=2",
              ds="ds_configs/zero2.json", check=False)
    err = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert r.returncode == 2 and len(err) == 1 and "was trained on the base" in err[0], r.stderr[-2000:]
    assert convert(["merge-lora", str(run), str(tmp_path / "bad"), "--base", str(other), "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()
    assert convert(["merge-lora", str(run), str(tmp_path / "merged"), "--quiet"]) == 0
