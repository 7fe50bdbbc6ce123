"""LoRA on the LLaDA2 MoE backbone through peft: adapters on the fused attention projection, the SwiGLUs and every
routed expert (peft target_parameters), router frozen; merged weights give the adapted logits; the recipe
configs/sft_llada2_mini_lora.yaml at a tiny shape, ZeRO-2 and ZeRO-3: import-llada2 -> LoRA block-diffusion SFT ->
merge-lora -> export-llada2 -> transformers loads it with the merged model's logits."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from llada_scale.testing import run_ranks
from llada_scale.training.lora import LoRAConfig, apply_lora, is_lora_key, merge_lora
from tests.model.test_llada2_moe import tiny_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
TARGETS = ["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"]


def test_lora_adapts_experts_router_frozen_and_merges():
    base = tiny_model()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=2, alpha=4, target_modules=TARGETS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n in trainable)
    assert sum(".mlp.experts." in n for n in trainable) == 2 * 3 * 2  # 2 MoE layers x 3 stacks x (A, B)
    assert not any(".gate." in n for n in trainable)  # the router is never adapted
    x = torch.randint(0, 95, (2, 7))
    model(x).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        adapted = model(x)
        assert not torch.allclose(adapted, base(x), atol=1e-3)
    merged = merge_lora(model)
    assert set(merged.state_dict()) == set(base.state_dict())
    for k, v in base.state_dict().items():
        if ".gate." in k or "norm" in k or "embed" in k or "lm_head" in k:
            assert torch.equal(merged.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)


def test_experts_need_dropout_zero_and_a_moe_model():
    with pytest.raises(ValueError, match="dropout must be 0"):
        apply_lora(tiny_model(), LoRAConfig(rank=2, dropout=0.1, target_modules=["experts"]))
    from llada_scale.model.transformer import ModelConfig, Transformer
    with pytest.raises(ValueError, match="no MoE layers"):
        apply_lora(Transformer(ModelConfig(num_layers=1)), LoRAConfig(rank=2, target_modules=["experts"]))


@pytest.mark.distributed
@pytest.mark.parametrize("ds", ["ds_configs/zero2.json", "ds_configs/zero3.json"])
def test_llada2_lora_sft_recipe_end_to_end(tmp_path, ds, tiny_sft_shards):
    import llada_scale.checkpoint as cio
    from convert_checkpoint import main as convert

    sys.path.insert(0, str(REPO / "tests" / "checkpoint"))
    from test_llada2 import make_llada2_dir

    transformers = pytest.importorskip("transformers")
    cfg, _ = make_llada2_dir(tmp_path / "rel", n_shards=2)
    models = tmp_path / "models"
    assert convert(["import-llada2", str(tmp_path / "rel"), str(models / "llada2-mini"), "--dtype", "fp32",
                    "--quiet"]) == 0
    shards = tiny_sft_shards(models / "llada2-mini")
    run = tmp_path / "run"
    shape = {"num_layers": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4, "num_kv_heads": 2,
             "head_dim": 16, "moe_intermediate_size": 8, "num_experts": 8, "num_experts_per_tok": 3, "n_group": 4,
             "topk_group": 2, "max_seq_len": 256, "norm_eps": 1e-6, "rope_theta": 600000.0}
    run_ranks(["-m", "llada_scale.train", "--config", "configs/sft_llada2_mini_lora.yaml", "--deepspeed_config",
               ds, f"run_dir={run}", f"data.train_shards={shards}",
               "model.preset=none", *[f"model.{k}={v}" for k, v in shape.items()], "data.seq_len=32",
               "data.num_workers=0", "train.wandb=off", "train.val_every=0", "train.log_every=1",
               "train.num_samples=0", "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=2",
               "optim.warmup_steps=0", "optim.lr=1e-2", "train.lora.rank=4"], 1, env={"LLADA_MODELS": str(models)})
    adapters, meta = cio.load_model_state(run, progress=False)
    # adapters, plus the routers' expert biases (buffers, saved because balancing may move them)
    assert adapters and all(is_lora_key(k) or k.endswith(".mlp.gate.expert_bias") for k in adapters)
    assert any(".mlp.experts." in k for k in adapters)
    assert meta["config"]["model"]["hf_extra"]["transformers_version"] == "4.52.3"  # inherited from init_from
    assert convert(["merge-lora", str(run), str(tmp_path / "merged"), "--dtype", "fp32", "--quiet"]) == 0
    assert convert(["export-llada2", str(tmp_path / "merged"), str(tmp_path / "out"), "--quiet"]) == 0
    merged = cio.build_model_from_checkpoint(tmp_path / "merged", progress=False)
    base = cio.build_model_from_checkpoint(models / "llada2-mini", progress=False)
    for k, v in base.state_dict().items():
        if ".mlp.gate." in k:
            assert torch.equal(merged.state_dict()[k], v), k  # router and bias untouched
    assert not torch.equal(merged.state_dict()["model.layers.1.mlp.experts.up_proj"],
                           base.state_dict()["model.layers.1.mlp.experts.up_proj"])
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    same = [k for k in cfg if k not in ("auto_map", "torch_dtype")]  # written in fp32, the merged dtype
    assert {k: written[k] for k in same} == {k: cfg[k] for k in same} and written["torch_dtype"] == "float32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True,
                                                           dtype=torch.float32).eval()
    x = torch.randint(0, 106, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, merged(x), atol=1e-5, rtol=1e-5)
