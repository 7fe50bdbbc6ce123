"""LLaDA's released format: import against a forward written from the published architecture, export loadable by
``transformers.AutoModel(trust_remote_code=True)`` with equal logits, bit-identical round trip, the llada-8b preset,
and one clear line (nothing written) for every kind of bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llada_scale.checkpoint as cio  # noqa: E402
from tests.checkpoint.test_convert import convert  # noqa: E402
from llada_scale.checkpoint.llada import model_config_from_llada  # noqa: E402
from llada_scale.data.tokenizer import Tokenizer  # noqa: E402
from llada_scale.model.transformer import ModelConfig, preset  # noqa: E402
from llada_scale.testing import assert_close_to_scale  # noqa: E402
from tiny_models import assert_same_checkpoint, llada_config, llada_reference, make_llada_dir, make_tokenizer, save_sharded  # noqa: E402


def _x(n=2, length=12, vocab=100, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", [dict(), dict(weight_tying=True, n_kv_heads=2, include_qkv_bias=True)],
                         ids=["llada8b-like", "tied-gqa-qkvbias"])
def test_import_llada_matches_reference_and_tokenizer(tmp_path, variant):
    cfg, sd = make_llada_dir(tmp_path / "llada", **variant)
    assert convert("import-llada", tmp_path / "llada", tmp_path / "ours", "--dtype", "fp32", "--quiet") == 0
    model = cio.build_model_from_checkpoint(tmp_path / "ours", progress=False)
    c = model.config
    assert (c.causal, c.mask_token_id, c.vocab_size, c.tie_embeddings, c.num_kv_heads, c.attention_bias) == \
        (False, cfg["mask_token_id"], 128, cfg["weight_tying"], cfg["n_kv_heads"], cfg["include_qkv_bias"])
    x = _x()
    with torch.no_grad():
        assert_close_to_scale(model(x), llada_reference(sd, cfg, x))
    # the tokenizer came along with its own mask token: no second one is added
    tok = Tokenizer.load(tmp_path / "ours")
    assert tok.mask_token == "<|mdm_mask|>" and tok.mask_token_id == cfg["mask_token_id"]
    assert tok.vocab_size == cfg["mask_token_id"] + 1
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert meta["tokenizer"]["mask_token_id"] == cfg["mask_token_id"] and meta["source"]["kind"] == "llada"


def test_export_llada_loads_with_transformers_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, _ = make_llada_dir(tmp_path / "llada", n_kv_heads=2, include_qkv_bias=True)
    ours = tmp_path / "ours"
    assert convert("import-llada", tmp_path / "llada", ours, "--dtype", "fp32", "--quiet") == 0
    out = tmp_path / "exported"
    assert convert("export-llada", ours, out, "--dtype", "fp32", "--max_shard_size", "100KB", "--quiet") == 0
    written = json.loads((out / "config.json").read_text())
    assert set(llada_config()) - {"transformers_version"} <= set(written)  # every key LLaDA's loaders read
    assert written["mask_token_id"] == cfg["mask_token_id"] and written["auto_map"]["AutoModel"]
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert "llada_scale" not in (out / "modeling_llada.py").read_text().split('"""', 2)[2]  # no import of ours

    model = cio.build_model_from_checkpoint(ours, progress=False)
    hf = transformers.AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(hf).__name__ == "LLaDAModelLM" and hf.config.mask_token_id == cfg["mask_token_id"]
    x = _x(length=20)
    with torch.no_grad():
        assert_close_to_scale(hf(x).logits, model(x))
        # bidirectional: changing the last token changes the first position's logits
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % 100
        assert not torch.allclose(hf(y).logits[:, 0], hf(x).logits[:, 0])
        # padding: an attention_mask hides padded keys
        pad = torch.ones_like(x)
        pad[:, 15:] = 0
        assert_close_to_scale(hf(x, attention_mask=pad).logits[:, :15], model(x[:, :15]))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.mask_token == "<|mdm_mask|>" and tok.convert_tokens_to_ids("<|mdm_mask|>") == cfg["mask_token_id"]

    # import-llada(export-llada(x)) == x, bit for bit
    back = tmp_path / "back"
    assert convert("import-llada", out, back, "--dtype", "fp32", "--quiet") == 0
    assert_same_checkpoint(ours, back)


def test_export_llada_adds_mask_token_to_minimind_tokenizer(tmp_path, tokenizer_path):
    """A model trained with the minimind tokenizer (mask token added by llada_scale at 6400): the exported
    tokenizer.json carries <|mask|> so AutoTokenizer and LLaDA-style samplers find it."""
    transformers = pytest.importorskip("transformers")
    from llada_scale.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=6464, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=64, causal=False, mask_token_id=6400)
    src = tmp_path / "src"
    tok = Tokenizer.load(tokenizer_path).identity()
    cio.save_safetensors(Transformer(cfg).state_dict(), str(src), {"format": "llada_scale", "model": cfg.to_dict(),
                                                                   "tokenizer": tok}, dtype="fp32", progress=False)
    assert convert("export-llada", src, tmp_path / "out", "--quiet") == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf_tok.mask_token == "<|mask|>" and hf_tok.mask_token_id == 6400
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == tok["eos_token_id"]


def test_llada8b_preset_matches_imported_config():
    """GSAI-ML/LLaDA-8B-Base's config.json values (public) map exactly onto preset('llada-8b')."""
    released = llada_config(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                            embedding_size=126464, vocab_size=126464, max_sequence_length=4096, rope_theta=500000.0,
                            rms_norm_eps=1e-05, weight_tying=False, mask_token_id=126336, eos_token_id=126081,
                            pad_token_id=126081)
    assert ModelConfig(**model_config_from_llada(released)) == preset("llada-8b")


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.mark.parametrize("change,fragment", [
    (dict(block_type="sequential"), "block_type='sequential'"),
    (dict(activation_type="swiglu"), "activation_type='swiglu'"),
    (dict(attention_layer_norm=True), "attention_layer_norm=True"),
    (dict(alibi=True, rope=False), "rope=False"),
    (dict(model_type="llama"), "use import-hf"),
])
def test_import_llada_refuses_variants(tmp_path, capsys, change, fragment):
    make_llada_dir(tmp_path / "llada", n_shards=1)
    cfg = json.loads((tmp_path / "llada" / "config.json").read_text())
    (tmp_path / "llada" / "config.json").write_text(json.dumps({**cfg, **change}))
    assert convert("import-llada", tmp_path / "llada", tmp_path / "out", "--quiet") == 2
    _one_line_error(capsys, fragment)
    assert not (tmp_path / "out").exists()


def test_import_llada_bad_files(tmp_path, capsys):
    """Missing config key, missing shard, a shard of the wrong shape, a tokenizer that does not fit: one line each,
    no output directory and no temporary directory left behind."""
    src = tmp_path / "llada"
    cfg, sd = make_llada_dir(src, n_shards=3)

    def check(*fragments, extra=()):
        assert convert("import-llada", src, tmp_path / "out", "--quiet", *extra) == 2
        _one_line_error(capsys, *fragments)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big_tok", "llada"]

    make_tokenizer(tmp_path / "big_tok", n_words=140)
    (src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "rope_theta"}))
    check("missing key(s) ['rope_theta']")
    (src / "config.json").write_text(json.dumps(cfg))
    shard = src / "model-00002-of-00003.safetensors"
    shard.rename(src / "moved")
    check("missing", "model-00002-of-00003.safetensors")
    (src / "moved").rename(shard)
    bad = dict(sd)
    bad["model.transformer.blocks.1.ff_out.weight"] = torch.zeros(64, 96)
    save_sharded(bad, src, 3)
    check("model.layers.1.mlp.down_proj.weight", "[64, 96] vs config [64, 160]")
    save_sharded(sd, src, 3)
    check("tokenizer.json has", "tokens but", "128 embedding rows", extra=("--tokenizer", tmp_path / "big_tok"))
    (src / "config.json").write_text(json.dumps({**cfg, "mask_token_id": 130}))
    check("mask_token_id 130 is outside the vocabulary (size 128)")
    (src / "config.json").write_text(json.dumps({**cfg, "mask_token_id": 120}))
    check("no token with the config's mask_token_id 120")
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<|eot_id|>", "eos_token": "<|endoftext|>"}))
    check("names mask token '<|eot_id|>'")


def test_export_llada_refuses_what_the_format_cannot_hold(tmp_path, capsys):
    from llada_scale.model.transformer import Transformer

    for i, kw in enumerate((dict(causal=True), dict(qk_norm=True), dict(head_dim=32),
                            dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))):
        cfg = ModelConfig(**{**dict(vocab_size=96, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                                    intermediate_size=96, causal=False, mask_token_id=95), **kw})
        src = tmp_path / f"src{i}"
        cio.save_safetensors(Transformer(cfg).state_dict(), str(src), {"format": "llada_scale", "model": cfg.to_dict()},
                             dtype="fp32", progress=False)
        assert convert("export-llada", src, tmp_path / f"out{i}", "--quiet") == 2
        _one_line_error(capsys, "cannot write LLaDA's format")
        assert not (tmp_path / f"out{i}").exists()
