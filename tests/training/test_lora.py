"""LoRA through peft: only adapters train (frozen base unchanged bit for bit), merged weights give the adapted
model's logits, activation checkpointing gives the same gradients, and the trainer saves adapter-only checkpoints
that resume exactly (ZeRO-2) and merge with ``convert_checkpoint.py merge-lora`` (ZeRO-2, and ZeRO-3 on an imported
LLaDA model through the SFT recipe)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.testing import assert_close_to_scale, run_ranks, train_metrics as metrics
from llada_scale.training.lora import LoRAConfig, apply_lora, is_lora_key, merge_lora
from tests.training.test_train import train

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=128, causal=False, mask_token_id=95, attention_bias=True), **kw})


def _train(model, steps, ckpt=False):
    """A few AdamW steps on a fixed random regression of the logits; per-layer checkpointing when ``ckpt``."""
    if ckpt:
        for layer in model.model.layers:
            fwd = layer.forward
            layer.forward = lambda *a, fwd=fwd: checkpoint(fwd, *a, use_reentrant=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 95, (2, 16), generator=g)
        loss = F.cross_entropy(model(x).reshape(-1, 96), torch.roll(x, 1, 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def test_only_adapters_train_and_merge_matches():
    torch.manual_seed(0)
    model = Transformer(tiny())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 95, (2, 16))
    with torch.no_grad():
        before = model(x)
    model = apply_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=TARGETS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_key(n) for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # B = 0: starts at the base model
    _train(model, 3)
    sd = model.state_dict()
    for k, v in base.items():  # every frozen tensor (peft moves adapted ones under base_layer) is unchanged
        name = k if k in sd else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(sd[name], v), k
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.lora_B.default.weight"], torch.zeros(64, 4))
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, before, atol=1e-4)
        merged = merge_lora(model)
        assert set(merged.state_dict()) == set(base)
        assert_close_to_scale(merged(x), adapted)


def test_lora_with_activation_checkpointing_same_gradients():
    """torch.utils.checkpoint (non-reentrant) around each layer: same losses and adapter weights after 2 steps
    (the frozen base gives the checkpointed inputs no grad; reentrant checkpointing would drop the adapters' grads)."""
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = apply_lora(Transformer(tiny()), cfg)
        loss = _train(model, 2, ckpt=ckpt)
        results.append((loss.item(), {k: v for k, v in model.state_dict().items() if is_lora_key(k)}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for k, v in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], v, atol=1e-6, rtol=1e-6)


def test_lora_config_validation():
    with pytest.raises(ValueError, match="not projections"):
        LoRAConfig(rank=4, target_modules=["qkv"])
    with pytest.raises(ValueError, match="rank >= 0"):
        LoRAConfig(rank=-1)


# ------------------------------------------------------------------------------------------- trainer (DeepSpeed)
LORA = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.save_every=0", "optim.warmup_steps=0",
        "optim.lr=1e-2", "train.lora.rank=4", "train.lora.alpha=8",
        "train.lora.target_modules=[q_proj,v_proj,gate_proj,down_proj]"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny diffusion model in the consolidated format (the recipe's tiny shape, minimind's padded vocab)."""
    import llada_scale.checkpoint as cio

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=6464, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=256, causal=False, mask_token_id=6400, init_std=0.05)
    out = tmp_path_factory.mktemp("lora") / "base"
    cio.save_safetensors(Transformer(cfg).state_dict(), str(out), {"format": "llada_scale", "model": cfg.to_dict()},
                         dtype="fp32", progress=False)
    return out


def _run(run_dir, shards, base, ds, *extra):
    return train(run_dir, shards, f"train.init_from={base}", *LORA, *extra, ds=ds)


@pytest.mark.distributed
def test_trainer_lora_checkpoints_adapters_and_merges(tmp_path, pretrain_shards, base_model):
    """ZeRO-2 (ZeRO-3: test_llada_lora_sft_recipe_end_to_end): stop after step 1 and resume (the base comes from
    init_from again) == uninterrupted; the checkpoint holds only adapters; merge-lora == the adapted model."""
    import llada_scale.checkpoint as cio
    from convert_checkpoint import main as convert

    run, ds = tmp_path / "run", "ds_configs/zero2.json"
    _run(run, pretrain_shards, base_model, ds, "train.max_steps=2", "train.stop_at_step=1")
    _run(run, pretrain_shards, base_model, ds, "train.max_steps=2")
    full = tmp_path / "full"
    _run(full, pretrain_shards, base_model, ds, "train.max_steps=2")
    assert metrics(full)[2]["train/loss"] == pytest.approx(metrics(run)[2]["train/loss"], rel=1e-5)
    assert sorted(metrics(run)) == [1, 2]
    adapters, meta = cio.load_model_state(run, progress=False)
    assert adapters and all(is_lora_key(k) for k in adapters), sorted(adapters)[:4]  # adapters only on disk
    assert meta["config"]["train"]["lora"]["rank"] == 4

    assert convert(["merge-lora", str(run), str(tmp_path / "merged"), "--dtype", "fp32", "--quiet"]) == 0
    merged = cio.build_model_from_checkpoint(tmp_path / "merged", progress=False)
    base = cio.build_model_from_checkpoint(base_model, progress=False)
    for k, v in base.state_dict().items():  # untargeted weights are the frozen base, bit for bit
        if not any(t in k for t in ("q_proj", "v_proj", "gate_proj", "down_proj")):
            assert torch.equal(merged.state_dict()[k], v), k
    adapted = apply_lora(base, LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                            "down_proj"]))
    adapted.load_state_dict(adapters, strict=False)
    x = torch.randint(0, 6400, (2, 32))
    with torch.no_grad():
        assert_close_to_scale(merged(x), adapted(x))
        assert not torch.allclose(merged(x), cio.build_model_from_checkpoint(base_model, progress=False)(x),
                                  atol=1e-4)


@pytest.mark.distributed
def test_llada_lora_sft_recipe_end_to_end(tmp_path, tiny_sft_shards):
    """configs/sft_llada8b_lora.yaml at a tiny shape under ZeRO-3: import-llada (embedding 136 rows: not a multiple
    of 64, mask token <|mdm_mask|> inside the tokenizer) -> SFT shards rendered with the imported chat template ->
    2 LoRA steps -> merge-lora -> export-llada -> transformers loads it with the merged model's logits."""
    import llada_scale.checkpoint as cio
    from convert_checkpoint import main as convert

    sys.path.insert(0, str(REPO / "tests" / "checkpoint"))
    from tiny_models import make_llada_dir

    transformers = pytest.importorskip("transformers")
    cfg, _ = make_llada_dir(tmp_path / "llada", n_shards=2, embedding_size=136, vocab_size=136)
    models = tmp_path / "models"
    assert convert(["import-llada", str(tmp_path / "llada"), str(models / "llada-8b-instruct"), "--quiet"]) == 0
    shards = tiny_sft_shards(models / "llada-8b-instruct")
    run = tmp_path / "run"
    env = {"LLADA_MODELS": str(models)}
    run_ranks(["-m", "llada_scale.train", "--config", "configs/sft_llada8b_lora.yaml", "--deepspeed_config",
               "ds_configs/zero3.json", f"run_dir={run}", f"data.train_shards={shards}",
               "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4",
               "model.intermediate_size=160", "model.max_seq_len=256", "data.seq_len=32", "data.num_workers=0",
               "train.wandb=off", "train.val_every=0", "train.log_every=1", "train.num_samples=0", "train.max_steps=2",
               "train.micro_batch_size=2", "train.global_batch_size=2", "optim.warmup_steps=0", "optim.lr=1e-2"],
              1, env=env)
    adapters, meta = cio.load_model_state(run, progress=False)
    assert all(is_lora_key(k) for k in adapters)
    assert meta["config"]["model"]["vocab_size"] == 136 and meta["config"]["model"]["mask_token_id"] == 105
    assert meta["tokenizer"]["mask_token_id"] == 105 and meta["tokenizer"]["vocab_size"] == 106  # no second mask
    assert convert(["merge-lora", str(run), str(tmp_path / "merged"), "--dtype", "fp32", "--quiet"]) == 0
    assert convert(["export-llada", str(tmp_path / "merged"), str(tmp_path / "out"), "--dtype", "fp32",
                    "--quiet"]) == 0
    merged = cio.build_model_from_checkpoint(tmp_path / "merged", progress=False)
    hf = transformers.AutoModel.from_pretrained(str(tmp_path / "out"), trust_remote_code=True).eval()
    x = torch.randint(0, 106, (2, 16))
    with torch.no_grad():
        assert_close_to_scale(hf(x).logits, merged(x))


def test_lm_head_adapter_is_refused():
    """The head is applied from its weight matrix (chunked loss, samplers), so a LoRA adapter on lm_head would
    be bypassed silently: refuse it."""
    with pytest.raises(ValueError, match="cannot include lm_head"):
        LoRAConfig(rank=4, target_modules=["q_proj", "lm_head"])
