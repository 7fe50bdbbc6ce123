"""Hugging Face AR models -> llada_scale -> diffusion: tiny random Llama 3.x (llama3 rope scaling), Mistral, Qwen2.5
(q/k/v biases) and Qwen3 (QK-norm, head_dim != hidden/heads) built offline with transformers; equal causal logits
after import and after export back; ar-to-diffusion and a diffusion training step on the result; the trainer
initialised from an imported model whose vocabulary is not a multiple of 64; refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import llada_scale.checkpoint as cio  # noqa: E402
from tests.checkpoint.test_convert import convert  # noqa: E402
from llada_scale.testing import assert_close_to_scale  # noqa: E402

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def hf_config(family: str):
    if family == "llama3":
        return transformers.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=None)
    if family == "qwen2.5":
        return transformers.Qwen2Config(**COMMON, tie_word_embeddings=True, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6)
    return transformers.Qwen3Config(**COMMON, head_dim=32)  # 4 heads x 32 != hidden 64, like Qwen3-0.6B


def make_hf(path: Path, family: str, seed: int = 0):
    """A random HF model (every parameter perturbed, so biases and norms are not trivial), saved in 2+ shards."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path), max_shard_size="200KB")
    return model


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2.5", "qwen3"])
def test_import_hf_equal_causal_logits_and_back(tmp_path, family):
    hf = make_hf(tmp_path / "hf", family)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert convert("import-hf", tmp_path / "hf", tmp_path / "ours", "--dtype", "fp32", "--quiet") == 0
    ours = cio.build_model_from_checkpoint(tmp_path / "ours", progress=False)
    c = ours.config
    assert c.causal and c.attention_bias == (family == "qwen2.5") and c.qk_norm == (family == "qwen3")
    assert c.head_dim == (32 if family == "qwen3" else 16)
    x = torch.randint(0, 1000, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x).logits
        assert_close_to_scale(ours(x), expected)
    if family == "llama3":  # the scaling is really applied (positions past 64 x ... differ without it)
        import dataclasses

        from llada_scale.model.transformer import Transformer

        plain = Transformer(dataclasses.replace(c, rope_scaling=None))
        plain.load_state_dict(ours.state_dict())
        assert c.rope_scaling["type"] == "llama3"
        assert not torch.allclose(plain(x), expected, atol=1e-3)
    assert convert("export-hf", tmp_path / "ours", tmp_path / "back", "--dtype", "fp32", "--quiet") == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert_close_to_scale(back(x).logits, expected)

    # AR -> diffusion, then one diffusion training step on the result
    from llada_scale.objectives.config import ObjectiveConfig
    from llada_scale.objectives.losses import compute_loss

    assert convert("ar-to-diffusion", tmp_path / "ours", tmp_path / "dm", "--mask_token_id", 1000,
                   "--vocab_multiple", 8, "--quiet") == 0
    dm = cio.build_model_from_checkpoint(tmp_path / "dm", progress=False).train()
    assert (dm.config.causal, dm.config.vocab_size, dm.config.mask_token_id) == (False, 1008, 1000)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(2))
    none = torch.zeros_like(ids, dtype=torch.bool)
    batch = {"input_ids": ids, "position_ids": torch.arange(32).expand(2, 32), "document_ids": torch.zeros_like(ids),
             "prompt_mask": none, "padding_mask": none}
    opt = torch.optim.AdamW(dm.parameters(), lr=1e-3)
    loss, _ = compute_loss(dm, batch, ObjectiveConfig(name="diffusion", random_length_prob=0.0), False, 1000,
                           torch.Generator().manual_seed(0))
    loss.backward()
    before = dm.model.layers[0].self_attn.q_proj.weight.detach().clone()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, dm.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("change,fragment", [
    (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"]), "supported: llama"),
    (dict(model_type="llada"), "use import-llada"),
    (dict(attention_bias=True), "o_proj"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "'linear' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(sliding_window=4096, use_sliding_window=True), "sliding-window"),
])
def test_import_hf_refuses(tmp_path, capsys, change, fragment):
    make_hf(tmp_path / "hf", "llama3")
    capsys.readouterr()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **change}))
    assert convert("import-hf", tmp_path / "hf", tmp_path / "out", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_import_hf_missing_or_bad_shard(tmp_path, capsys):
    make_hf(tmp_path / "hf", "qwen2.5")
    capsys.readouterr()
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    shards[0].rename(tmp_path / "moved")
    assert convert("import-hf", tmp_path / "hf", tmp_path / "out", "--quiet") == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "moved").rename(shards[0])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    assert convert("import-hf", tmp_path / "hf", tmp_path / "out", "--quiet") == 2
    err = capsys.readouterr().err
    assert "mlp.up_proj.weight" in err and "[96, 64] vs config [128, 64]" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_trainer_init_from_imported_qwen_a2d(tmp_path, pretrain_shards):
    """import-hf (vocab 6500, not a multiple of 64, tied, q/k/v biases) -> ar-to-diffusion with the minimind
    tokenizer's mask id 6400 -> one diffusion step of the trainer: the model keeps its 6500 rows (the tokenizer
    alone would give 6464) and its weights."""
    from llada_scale.testing import run_ranks, train_metrics

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=6500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, rms_norm_eps=1e-6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(tmp_path / "hf"))
    assert convert("import-hf", tmp_path / "hf", tmp_path / "ar", "--dtype", "fp32", "--quiet") == 0
    assert convert("ar-to-diffusion", tmp_path / "ar", tmp_path / "dm", "--mask_token_id", 6400, "--reset_head_row",
                   "--dtype", "fp32", "--quiet") == 0
    run = tmp_path / "run"
    run_ranks(["-m", "llada_scale.train", "--config", "configs/diffusion_pretrain_tiny.yaml", f"run_dir={run}",
               f"data.train_shards={pretrain_shards}", f"train.init_from={tmp_path / 'dm'}", "model.preset=tiny",
               "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "model.attention_bias=true",
               "model.tie_embeddings=true", "model.rope_theta=1e6", "model.norm_eps=1e-6", "data.seq_len=64",
               "data.num_workers=0", "train.wandb=off", "train.val_every=0", "train.log_every=1", "train.num_samples=0",
               "train.max_steps=1", "train.micro_batch_size=2", "train.global_batch_size=2"], 1)
    assert train_metrics(run)[1]["train/loss"] < 20
    sd, meta = cio.load_model_state(run, progress=False)
    assert meta["config"]["model"]["vocab_size"] == 6500 and sd["model.embed_tokens.weight"].shape == (6500, 64)


REAL_CONFIGS = {  # the published config.json values (no weights needed)
    "Qwen2.5-0.5B": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, max_window_layers=24, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True, vocab_size=151936,
                         hidden_act="silu", bos_token_id=151643, eos_token_id=151643),
    "Qwen3-0.6B": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False, head_dim=128,
                       hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_scaling=None,
                       rope_theta=1000000, sliding_window=None, use_sliding_window=False, tie_word_embeddings=True,
                       vocab_size=151936, hidden_act="silu"),
    "Llama-3.2-1B": dict(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
                         head_dim=64, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_map_exactly(name):
    """Released configs map onto our backbone with the same parameter count as transformers' own model (both on
    the meta device); Qwen2.5-0.5B is exactly the qwen2.5-0.5b preset; Qwen3-0.6B keeps head_dim 128."""
    from llada_scale.model.transformer import ModelConfig, Transformer, preset

    hf_cfg = REAL_CONFIGS[name]
    mc = ModelConfig(**cio.model_config_from_hf(hf_cfg))
    with torch.device("meta"):
        ours = Transformer(mc).num_params()
        theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**hf_cfg)).parameters())
    assert ours == theirs
    if name == "Qwen2.5-0.5B":
        assert mc == preset("qwen2.5-0.5b")
    if name == "Qwen3-0.6B":
        assert (mc.head_dim, mc.num_heads, mc.hidden_size, mc.qk_norm) == (128, 16, 1024, True)
