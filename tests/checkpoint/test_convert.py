"""Checkpoint conversion: ZeRO checkpoints written by real (gloo) processes -> consolidate -> same logits;
HF export/import; AR -> diffusion; clear errors (Nano-LLaDA / minimind import: tests/checkpoint/test_nano_llada.py).

Run as a script (``python tests/checkpoint/test_convert.py worker ...``) this file is the DeepSpeed worker that the
distributed tests spawn.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import llada_scale.checkpoint as cio  # noqa: E402
from llada_scale.model.transformer import ModelConfig, Transformer  # noqa: E402
from llada_scale.testing import assert_close_to_scale  # noqa: E402


TOKENIZER_DIR = Path(os.environ.get("LLADA_DATA", REPO.parent / "shared" / "data")) / "tokenizer" / "minimind"
TAG = "step00000002"


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                max_seq_len=64, init_std=0.2)
    return ModelConfig(**{**base, **kw})


def fixed_input() -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) * 7 % 90


# ---------------------------------------------------------------------------------------------- worker
def worker(stage: int, bf16: bool, out: str, tie: bool) -> None:
    """One rank: train 2 steps with ZeRO ``stage``, save a checkpoint + llada_scale.json, dump logits."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    torch.manual_seed(0)
    cfg = tiny_cfg(tie_embeddings=tie)
    model = Transformer(cfg)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "bf16": {"enabled": bf16}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x = torch.randint(0, 96, (2, 16), generator=g)
        logits = engine(x)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, 96), x[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    ckpt_dir = os.path.join(out, "checkpoints")
    engine.save_checkpoint(ckpt_dir, TAG)
    engine.eval()
    with torch.no_grad():
        logits = engine(fixed_input()).float()  # every rank runs the forward (ZeRO-3 gathers)
    if rank == 0:
        tok = {"path": str(TOKENIZER_DIR / "tokenizer.json")} if TOKENIZER_DIR.is_dir() else None
        meta = {"step": 2, "config": {"model": cfg.to_dict(), "run_name": "t"}, "tokenizer": tok,
                "zero_stage": stage, "world_size": world}
        with open(os.path.join(ckpt_dir, TAG, cio.META_FILE), "w") as f:
            json.dump(meta, f)
        torch.save(logits, os.path.join(out, "logits.pt"))
    engine.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp: Path, stage: int, bf16: bool, world: int, tie: bool = False) -> Path:
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}  # TORCH_EXTENSIONS_DIR is inherited: share the compiled-op cache
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", str(stage), str(int(bf16)), str(tmp),
                                       str(int(tie))], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    return tmp / "checkpoints" / TAG


def convert(*argv) -> int:
    import convert_checkpoint

    return convert_checkpoint.main([str(a) for a in argv])


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.distributed
def test_zero3_two_ranks_consolidate_same_logits(tmp_path):
    tag = run_workers(tmp_path, stage=3, bf16=False, world=2)
    expected = torch.load(tmp_path / "logits.pt")
    out = tmp_path / "cons"
    assert convert("consolidate", tag, out, "--quiet") == 0  # --dtype auto: the fp32 master weights, bit-exact
    model = cio.build_model_from_checkpoint(out, progress=False)
    with torch.no_grad():
        got = model(fixed_input())
    assert_close_to_scale(got, expected)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "llada_scale" and cfg["step"] == 2 and cfg["source"]["world_size"] == 2
    assert cfg["dtype"] == "fp32"
    if TOKENIZER_DIR.is_dir():
        assert (out / "tokenizer.json").is_file()
    # the checkpoints/ directory resolves through 'latest'; sharded output loads the same weights
    sharded = tmp_path / "sharded"
    assert convert("consolidate", tmp_path / "checkpoints", sharded, "--dtype", "fp32", "--max_shard_size", "40KB",
                   "--quiet") == 0
    assert (sharded / cio.SAFE_INDEX).is_file() and len(list(sharded.glob("model-*.safetensors"))) > 1
    a, _ = cio.load_model_state(out, progress=False)
    b, meta = cio.load_model_state(sharded, progress=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trainer's --init_from path: a tag directory directly
    c, meta = cio.load_model_state(tag, progress=False)
    assert meta["zero_stage"] == 3 and all(torch.equal(a[k], c[k]) for k in a) and meta["dtypes"] == ["fp32"]


@pytest.mark.distributed
def test_stage0_bf16_recovers_fp32_master(tmp_path):
    tag = run_workers(tmp_path, stage=0, bf16=True, world=1, tie=True)
    sd, meta = cio.load_model_state(tag, progress=False)
    w = sd["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())  # true fp32 master weights
    assert meta["dtypes"] == ["fp32"]  # what --dtype auto writes
    assert "lm_head.weight" not in sd
    model = cio.build_model_from_checkpoint(tag, dtype="bf16", progress=False)
    with torch.no_grad():
        got = model(fixed_input()).float()
    torch.testing.assert_close(got, torch.load(tmp_path / "logits.pt"), atol=0, rtol=0)


def _save_ours(path: Path, model: Transformer, tokenizer=None) -> Path:
    cio.save_safetensors(model.state_dict(), str(path), {"format": "llada_scale", "model": model.config.to_dict(),
                                                         "tokenizer": tokenizer}, dtype="fp32", progress=False)
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_export_hf_matches_transformers(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = Transformer(tiny_cfg(tie_embeddings=tie, rope_theta=5000.0, norm_eps=1e-6)).eval()
    src = _save_ours(tmp_path / "src", ours)
    assert convert("export-hf", src, tmp_path / "hf", "--dtype", "fp32", "--quiet") == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert_close_to_scale(hf(fixed_input()).logits, ours(fixed_input()))
    # and back: import-hf gives the same weights and config
    assert convert("import-hf", tmp_path / "hf", tmp_path / "back", "--dtype", "fp32", "--quiet") == 0
    back = cio.build_model_from_checkpoint(tmp_path / "back", progress=False)
    assert back.config.tie_embeddings == tie and back.config.rope_theta == 5000.0
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_export_hf_yarn_matches_transformers(tmp_path):
    """A YaRN model exports to HF Llama (rope_type yarn, every parameter explicit) with equal logits and imports
    back unchanged. HF's inverse frequencies equal ours up to float rounding (it blends 1/(s*b^x) and 1/b^x
    where minimind scales 1/b^x by (1 - ramp + ramp/s)), hence a tolerance rather than bit equality."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    rs = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.3}
    ours = Transformer(tiny_cfg(rope_theta=10000.0, norm_eps=1e-6, rope_scaling=rs)).eval()
    assert cio.yarn_hf_mismatch(16, 10000.0, ours.config.rope_scaling) is None
    src = _save_ours(tmp_path / "src", ours)
    assert convert("export-hf", src, tmp_path / "hf", "--dtype", "fp32", "--quiet") == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    expect = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
              "beta_slow": 1.0, "attention_factor": 1.3}
    assert cfg["rope_scaling"] == expect and cfg["rope_parameters"] == {**expect, "rope_theta": 10000.0}
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.arange(2 * 60).reshape(2, 60) * 7 % 90
    with torch.no_grad():  # 1-ulp frequency differences grow with position: slightly looser than plain RoPE
        torch.testing.assert_close(hf(x).logits, ours(x), atol=5e-5, rtol=1e-4)
    from llada_scale.model.rope import rope_inv_freq

    inv, mscale = rope_inv_freq(16, 10000.0, ours.config.rope_scaling)
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq, inv, rtol=1e-6, atol=0)
    assert hf.model.rotary_emb.attention_scaling == mscale == 1.3
    assert convert("import-hf", tmp_path / "hf", tmp_path / "back", "--dtype", "fp32", "--quiet") == 0
    back = cio.build_model_from_checkpoint(tmp_path / "back", progress=False)
    assert back.config.rope_scaling == ours.config.rope_scaling
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)


def test_yarn_hf_convention_difference(tmp_path, capsys):
    """Where HF's YaRN differs from minimind's (upper ramp bound clamped to head_dim - 1 vs head_dim/2 - 1),
    export-hf and import-hf refuse instead of writing a model whose frequencies would differ."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llada_scale.model.rope import rope_inv_freq

    rs = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048}
    ours = Transformer(tiny_cfg(rope_theta=100.0, rope_scaling=rs))
    why = cio.yarn_hf_mismatch(16, 100.0, ours.config.rope_scaling)
    assert why and "head_dim/2-1" in why
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32768,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 16.0,
                                                       "original_max_position_embeddings": 2048,
                                                       "attention_factor": 1.0})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    assert not torch.allclose(hf_inv, rope_inv_freq(16, 100.0, ours.config.rope_scaling)[0], rtol=1e-3)
    assert convert("export-hf", _save_ours(tmp_path / "src", ours), tmp_path / "hf", "--quiet") == 2
    assert "HF transformers" in capsys.readouterr().err
    with pytest.raises(cio.CheckpointError, match="cannot be imported exactly"):
        cio.model_config_from_hf({**cio.hf_config_from_model_config(tiny_cfg().to_dict()), "rope_theta": 100.0,
                                  "rope_scaling": {"rope_type": "yarn", "factor": 16.0,
                                                   "original_max_position_embeddings": 2048}})
    # HF semantics on import: a missing attention_factor means HF's 0.1 ln(factor) + 1, not minimind's 1.0
    hf = {**cio.hf_config_from_model_config(tiny_cfg().to_dict()),
          "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    got = cio.model_config_from_hf(hf)["rope_scaling"]
    assert got["attention_factor"] == pytest.approx(0.1 * math.log(4.0) + 1) and got["beta_fast"] == 32.0
    with pytest.raises(cio.CheckpointError, match="not supported"):
        cio.model_config_from_hf({**hf, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})


def test_export_hf_diffusion_bidirectional(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = Transformer(tiny_cfg(causal=False, mask_token_id=95)).eval()
    assert convert("export-hf", _save_ours(tmp_path / "src", ours), tmp_path / "hf", "--dtype", "fp32", "--quiet") == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["mask_token_id"] == 95 and cfg["llada_scale"]["causal"] is False
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = fixed_input()
    full = torch.ones(x.shape[0], 1, x.shape[1], x.shape[1], dtype=torch.bool)  # docs/EVAL.md recipe
    with torch.no_grad():
        assert_close_to_scale(hf(x, attention_mask=full).logits, ours(x))
    assert cio.build_model_from_checkpoint(tmp_path / "hf", progress=False).config.causal is False


def test_export_hf_refuses_what_no_hf_class_holds(tmp_path, capsys):
    """QK-norm exports as Qwen3 (tests/checkpoint/test_import_hf.py); QK-norm with q/k/v biases and weightless norms
    have no HF class: refused with one line."""
    for i, kw in enumerate((dict(qk_norm=True, attention_bias=True), dict(norm_weight=False))):
        src = _save_ours(tmp_path / f"src{i}", Transformer(tiny_cfg(**kw)))
        assert convert("export-hf", src, tmp_path / f"hf{i}", "--quiet") == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and ("QK-norm" in err or "weightless" in err)
        assert not (tmp_path / f"hf{i}").exists()  # nothing half-written


def test_ar_to_diffusion_adds_rows(tmp_path):
    torch.manual_seed(0)
    ar = Transformer(tiny_cfg()).eval()
    src = _save_ours(tmp_path / "ar", ar)
    assert convert("ar-to-diffusion", src, tmp_path / "dm", "--mask_token_id", "100", "--quiet") == 0
    dm = cio.build_model_from_checkpoint(tmp_path / "dm", progress=False)
    assert dm.config.vocab_size == 128 and dm.config.mask_token_id == 100 and dm.config.causal is False
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        old, new = ar.state_dict()[key], dm.state_dict()[key]
        assert torch.equal(new[:96], old)
        torch.testing.assert_close(new[100], old.mean(0))
    # mask id inside the vocabulary: no growth; --reset_head_row resets that row
    assert convert("ar-to-diffusion", src, tmp_path / "dm2", "--mask_token_id", "90", "--reset_head_row",
                   "--quiet") == 0
    dm2 = cio.build_model_from_checkpoint(tmp_path / "dm2", progress=False)
    assert dm2.config.vocab_size == 96
    keep = torch.arange(96) != 90
    torch.testing.assert_close(dm2.state_dict()["lm_head.weight"][90], ar.state_dict()["lm_head.weight"][keep].mean(0))


def test_ar_to_diffusion_needs_mask_id(tmp_path, capsys):
    src = _save_ours(tmp_path / "ar", Transformer(tiny_cfg()))
    assert convert("ar-to-diffusion", src, tmp_path / "dm", "--quiet") == 2
    assert "--mask_token_id" in capsys.readouterr().err


def test_shape_mismatch_and_missing_metadata_errors(tmp_path, capsys):
    src = _save_ours(tmp_path / "m", Transformer(tiny_cfg()))
    cfg = json.loads((src / "config.json").read_text())
    cfg["model"]["intermediate_size"] = 192
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cio.CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\[64, 128\]"):
        cio.build_model_from_checkpoint(src, progress=False)
    assert convert("export-hf", src, tmp_path / "hf", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mlp.gate_proj.weight" in err and err.count("\n") == 1
    # a DeepSpeed-looking directory without llada_scale.json
    fake = tmp_path / "tag"
    fake.mkdir()
    torch.save({"module": Transformer(tiny_cfg()).state_dict(), "buffer_names": []},
               fake / "mp_rank_00_model_states.pt")
    sd, meta = cio.load_model_state(fake, progress=False)
    assert meta["has_metadata"] is False and "model.norm.weight" in sd
    with pytest.raises(cio.CheckpointError, match="llada_scale.json"):
        cio.build_model_from_checkpoint(fake, progress=False)
    with pytest.raises(cio.CheckpointError, match="not a checkpoint"):
        cio.load_model_state(tmp_path)
    assert convert("consolidate", tmp_path / "nope", tmp_path / "o") == 2


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5] == "1")
