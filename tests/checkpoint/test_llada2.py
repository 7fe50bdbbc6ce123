"""LLaDA2.x release format: tiny random checkpoints built here (per-expert and dFactory merged layouts), import
against the per-token reference, export loadable by ``AutoModelForCausalLM(trust_remote_code=True)`` with equal
logits, bit-identical round trip, and one line for every variant outside the release."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llada_scale.checkpoint as cio  # noqa: E402
from tests.checkpoint.test_convert import convert  # noqa: E402
from tests.model.test_llada2_moe import reference_logits  # noqa: E402
from tiny_models import assert_same_checkpoint, make_tokenizer, save_sharded  # noqa: E402


def llada2_config(**kw) -> dict:
    """LLaDA2.0-mini's config.json keys with tiny shapes."""
    cfg = {"architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0,
           "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
           "num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 48, "first_k_dense_replace": 1,
           "hidden_act": "silu", "max_position_embeddings": 256, "model_type": "llada2_moe",
           "moe_intermediate_size": 8, "norm_topk_prob": True, "num_experts_per_tok": 3, "norm_head": False,
           "num_attention_heads": 4, "num_experts": 8, "num_key_value_heads": 2, "rope_theta": 600000,
           "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "transformers_version": "4.52.3", "use_bias": False, "use_rmsnorm": True, "rms_norm_eps": 1e-06,
           "head_dim": 16, "num_shared_experts": 1, "use_cache": False, "use_qkv_bias": False,
           "embedding_dropout": 0.0, "norm_softmax": False, "output_dropout": 0.0, "vocab_size": 128, "rotary_dim": 8,
           "using_split_qkv_in_self_attention": False, "router_dtype": "fp32", "moe_router_enable_expert_bias": True,
           "routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2, "score_function": "sigmoid",
           "initializer_range": 0.02, "max_window_layers": 28, "output_router_logits": False, "pad_token_id": 100,
           "partial_rotary_factor": 0.5, "use_sliding_window": False}
    cfg.update(kw)
    return cfg


def release_state(cfg: dict, seed: int = 0) -> dict:
    """Random weights under the release's names (per-expert), norms around 1, a non-zero expert bias."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    d, hd, h, kv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    sd = {"model.word_embeddings.weight": r(cfg["vocab_size"], d), "model.norm.weight": 1 + r(d),
          "lm_head.weight": r(cfg["vocab_size"], d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": 1 + r(d), p + "post_attention_layernorm.weight": 1 + r(d),
               p + "attention.query_key_value.weight": r((h + 2 * kv) * hd, d), p + "attention.dense.weight": r(d, h * hd),
               p + "attention.query_layernorm.weight": 1 + r(hd), p + "attention.key_layernorm.weight": 1 + r(hd)}
        if i < cfg["first_k_dense_replace"]:
            f = cfg["intermediate_size"]
            sd |= {p + "mlp.gate_proj.weight": r(f, d), p + "mlp.up_proj.weight": r(f, d), p + "mlp.down_proj.weight": r(d, f)}
            continue
        f, s = cfg["moe_intermediate_size"], cfg["moe_intermediate_size"] * cfg["num_shared_experts"]
        sd |= {p + "mlp.gate.weight": r(cfg["num_experts"], d), p + "mlp.gate.expert_bias": r(cfg["num_experts"]),
               p + "mlp.shared_experts.gate_proj.weight": r(s, d), p + "mlp.shared_experts.up_proj.weight": r(s, d),
               p + "mlp.shared_experts.down_proj.weight": r(d, s)}
        for e in range(cfg["num_experts"]):
            q = f"{p}mlp.experts.{e}."
            sd |= {q + "gate_proj.weight": r(f, d), q + "up_proj.weight": r(f, d), q + "down_proj.weight": r(d, f)}
    return sd


def merged(sd: dict, cfg: dict) -> dict:
    """dFactory's layout: mlp.experts.{gate,up,down}_proj stacked [E, out, in] (no .weight)."""
    out = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"model.layers.{i}.mlp.experts.{proj}"] = torch.stack(
                [sd[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(cfg["num_experts"])])
    return out


def make_llada2_dir(out: Path, layout: str = "per-expert", n_shards: int = 3, **kw) -> tuple[dict, dict]:
    """A release-format directory; returns (config, fp32 state dict as saved, release names)."""
    out.mkdir(parents=True, exist_ok=True)
    specials = make_tokenizer(out, mask_token="<|mask|>")
    tc = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tc, "mask_token": "<|mask|>"}, indent=2))
    cfg = llada2_config(pad_token_id=specials["<|endoftext|>"], **kw)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = release_state(cfg)
    save_sharded(merged(sd, cfg) if layout == "merged" else sd, out, n_shards)
    return cfg, {k: v.to(torch.bfloat16).float() for k, v in sd.items()}


def to_ours(sd: dict, cfg: dict) -> dict:
    """The release's names -> ours, written out by hand (independent of llada_scale.checkpoint.llada2)."""
    ren = {"attention.query_key_value": "self_attn.qkv_proj", "attention.dense": "self_attn.o_proj",
           "attention.query_layernorm": "self_attn.q_norm", "attention.key_layernorm": "self_attn.k_norm"}
    out = {}
    for k, v in merged(sd, cfg).items():
        k = k.replace("model.word_embeddings", "model.embed_tokens")
        for a, b in ren.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def _ids(n=2, length=9):
    return torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", ["per-expert", "merged"])
def test_import_llada2_matches_reference(tmp_path, layout):
    cfg, sd = make_llada2_dir(tmp_path / "rel", layout)
    assert convert("import-llada2", tmp_path / "rel", tmp_path / "ours", "--quiet") == 0
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert meta["dtype"] == "bf16" and meta["model"]["model_type"] == "llada2_moe"  # the source's dtype
    model = cio.build_model_from_checkpoint(tmp_path / "ours", progress=False)
    assert type(model).__name__ == "LLaDA2MoeModel"
    assert model.config.mask_token_id == 105 and model.config.vocab_size == 128
    x = _ids()
    with torch.no_grad():
        logits = model(x)
    ours = to_ours(sd, cfg)
    for b in range(2):
        ref = reference_logits(model, x[b].tolist(), state=ours)
        torch.testing.assert_close(logits[b].double(), ref, rtol=1e-5, atol=1e-5)
    a, _ = cio.load_model_state(tmp_path / "ours", progress=False)
    assert all(torch.equal(a[k], ours[k]) for k in ours)  # the expert bias survives exactly (kept float32)


def test_merged_and_per_expert_layouts_import_identically(tmp_path):
    make_llada2_dir(tmp_path / "a", "per-expert")
    make_llada2_dir(tmp_path / "b", "merged", n_shards=2)
    for name in ("a", "b"):
        assert convert("import-llada2", tmp_path / name, tmp_path / f"o{name}", "--dtype", "fp32", "--quiet") == 0
    a, _ = cio.load_model_state(tmp_path / "oa", progress=False)
    b, _ = cio.load_model_state(tmp_path / "ob", progress=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_llada2_loads_with_transformers_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, _ = make_llada2_dir(tmp_path / "rel")
    ours = tmp_path / "ours"
    assert convert("import-llada2", tmp_path / "rel", ours, "--quiet") == 0
    out = tmp_path / "exported"
    assert convert("export-llada2", ours, out, "--max_shard_size", "20KB", "--quiet") == 0
    written = json.loads((out / "config.json").read_text())
    assert set(cfg) <= set(written) and written["mask_token_id"] == 105
    assert {k: written[k] for k in cfg if k != "auto_map"} == {k: v for k, v in cfg.items() if k != "auto_map"}
    assert len(list(out.glob("model-*.safetensors"))) > 1
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == set(release_state(cfg))  # the release's exact tensor names
    assert "llada_scale" not in (out / "modeling_llada2_moe.py").read_text().split('"""', 2)[2]

    model = cio.build_model_from_checkpoint(ours, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True,
                                                           torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LLaDA2MoeModelLM"
    x = _ids(length=12)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)
        pad = torch.ones_like(x)
        pad[:, 9:] = 0
        torch.testing.assert_close(hf(x, attention_mask=pad).logits[:, :9], model(x[:, :9]), rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.mask_token == "<|mask|>" and tok.chat_template

    back = tmp_path / "back"
    assert convert("import-llada2", out, back, "--quiet") == 0
    assert_same_checkpoint(ours, back)


@pytest.mark.parametrize("change, fragment", [
    (dict(score_function="softmax"), "score_function='softmax' is a variant outside"),
    (dict(moe_router_enable_expert_bias=False), "moe_router_enable_expert_bias"),
    (dict(some_new_switch=1), "unknown key(s) ['some_new_switch']"),
    (dict(model_type="llada"), "not a LLaDA2 MoE config"),
    (dict(rotary_dim=16), "rotary_dim 16"),
    (dict(n_group=3), "n_group"),
])
def test_import_llada2_refuses_variants(tmp_path, capsys, change, fragment):
    make_llada2_dir(tmp_path / "rel", **change)
    assert convert("import-llada2", tmp_path / "rel", tmp_path / "out", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_import_llada2_refuses_missing_key_expert_and_mask(tmp_path, capsys):
    cfg, _ = make_llada2_dir(tmp_path / "rel")
    cfg.pop("num_experts")
    (tmp_path / "rel" / "config.json").write_text(json.dumps(cfg))
    assert convert("import-llada2", tmp_path / "rel", tmp_path / "out", "--quiet") == 2
    assert "missing key(s) ['num_experts']" in capsys.readouterr().err

    cfg, sd = make_llada2_dir(tmp_path / "rel2", n_shards=1)
    sd.pop("model.layers.2.mlp.experts.5.up_proj.weight")
    save_sharded(sd, tmp_path / "rel2", 1)
    (tmp_path / "rel2" / "model.safetensors.index.json").unlink()
    import shutil
    shutil.move(tmp_path / "rel2" / "model-00001-of-00001.safetensors", tmp_path / "rel2" / "model.safetensors")
    assert convert("import-llada2", tmp_path / "rel2", tmp_path / "out", "--quiet") == 2
    assert "experts [5] missing" in capsys.readouterr().err

    make_llada2_dir(tmp_path / "rel3")
    tc = json.loads((tmp_path / "rel3" / "tokenizer_config.json").read_text())
    tc.pop("mask_token")
    (tmp_path / "rel3" / "tokenizer_config.json").write_text(json.dumps(tc))
    assert convert("import-llada2", tmp_path / "rel3", tmp_path / "out", "--quiet") == 2
    assert "--mask_token" in capsys.readouterr().err
    assert convert("import-llada2", tmp_path / "rel3", tmp_path / "out", "--quiet", "--mask_token", "<|mask|>") == 0



def test_llada2_without_tokenizer_warns_on_stderr(tmp_path, capsys):
    """No tokenizer next to the release (mask id from config.json): the import records none and says so on stderr,
    like import-llada, so that stdout keeps only the converter's result lines; so does the export of that model."""
    make_llada2_dir(tmp_path / "rel", mask_token_id=105)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "rel" / f).unlink()
    assert convert("import-llada2", tmp_path / "rel", tmp_path / "out", "--quiet") == 0
    out, err = capsys.readouterr()
    assert "no tokenizer.json next to the checkpoint" in err and "no tokenizer" not in out
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["tokenizer"] is None and meta["model"]["mask_token_id"] == 105
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert convert("export-llada2", tmp_path / "out", tmp_path / "exported", "--quiet") == 0
    out, err = capsys.readouterr()
    assert "no tokenizer recorded" in err and "no tokenizer" not in out
    assert not (tmp_path / "exported" / "tokenizer.json").exists()

def test_llada2_tokenizer_given_as_a_bare_file_name(tmp_path, monkeypatch):
    """`--tokenizer tokenizer.json` relative to the working directory is that tokenizer, not "no tokenizer"
    (its directory used to come out as "", which read as none given)."""
    make_llada2_dir(tmp_path / "rel", mask_token_id=105)
    monkeypatch.chdir(tmp_path / "rel")
    assert convert("import-llada2", tmp_path / "rel", tmp_path / "out", "--tokenizer", "tokenizer.json", "--quiet") == 0
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["tokenizer"] is not None and (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("preset, widths", [
    ("llada2-mini", dict(num_hidden_layers=20, hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
                         num_attention_heads=16)),
    ("llada2-flash", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=9216, moe_intermediate_size=1024,
                          num_attention_heads=32)),
])
def test_presets_match_the_released_configs(preset, widths):
    """dFactory's configs/model_configs/llada2_{mini,flash}/config.json (model_type llada2_moe_veomni) read by the
    importer give exactly the presets (routing, rope, norms, vocabulary)."""
    from llada_scale.checkpoint.llada2 import config_from_llada2
    from llada_scale.model.registry import llada2_preset

    raw = llada2_config(model_type="llada2_moe_veomni", num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                        num_key_value_heads=4, head_dim=128, rotary_dim=64, vocab_size=157184, pad_token_id=156892,
                        max_position_embeddings=16384, **widths)
    got = config_from_llada2(raw, "config.json", mask_token_id=156895).to_dict()
    want = llada2_preset(preset).to_dict()
    for k in ("hf_extra", "init_std"):
        got.pop(k), want.pop(k)
    assert got == want
