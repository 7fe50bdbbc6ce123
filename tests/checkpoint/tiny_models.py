"""Tiny checkpoints for the conversion tests, built offline: a LLaDA-format directory (LLaDA's config keys and
parameter names, sharded safetensors, a word-level tokenizer with LLaDA's special tokens and chat template)
and Hugging Face Llama / Mistral / Qwen2 / Qwen3 models from ``transformers`` configs; plus a LLaDA forward
written from the published architecture description (not from llada_scale's model code)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

# LLaDA-8B-Instruct's chat template (Llama-3 style headers, bos before the first message).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ("user assistant system hello world what is two plus the a of and to in is you that it he was for on are as "
         "with his they I at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who oil its now find long down day did get come "
         "made may part").split()


def make_tokenizer(out: Path, mask_token: str | None = "<|mdm_mask|>", n_words: int = 100,
                   template: str = LLADA_CHAT_TEMPLATE) -> dict:
    """A word-level tokenizers JSON with LLaDA's special tokens (ids after the words), the mask token last, a
    tokenizer_config.json with bos/eos and the chat template. Returns {token: id} of the special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = (list(dict.fromkeys(WORDS)) + [f"w{i}" for i in range(n_words)])[:n_words - 1]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = SPECIALS + ([mask_token] if mask_token else [])
    tok.add_special_tokens(specials)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>", "chat_template": template, "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return {t: tok.token_to_id(t) for t in specials}


def llada_config(**kw) -> dict:
    """LLaDA-8B-Base's config.json keys with tiny shapes (overridable)."""
    cfg = {"activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
           "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
           "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
           "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
           "embedding_dropout": 0.0, "embedding_size": 128, "eos_token_id": 100, "flash_attention": False,
           "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
           "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
           "layer_norm_with_affine": True, "mask_token_id": 105, "max_sequence_length": 256, "mlp_hidden_size": 160,
           "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4,
           "n_layers": 2, "pad_token_id": 100, "precision": "amp_bf16", "residual_dropout": 0.0,
           "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
           "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 128,
           "weight_tying": False}
    cfg.update(kw)
    return cfg


def llada_state(cfg: dict, seed: int = 0) -> dict:
    """Random weights in LLaDA's names for ``cfg`` (norm weights around 1, q/k/v biases when configured)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    d, ff, rows = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    kv = cfg["n_kv_heads"] * (d // cfg["n_heads"])
    p = "model.transformer."
    sd = {p + "wte.weight": r(rows, d), p + "ln_f.weight": 1 + r(d)}
    if not cfg["weight_tying"]:
        sd[p + "ff_out.weight"] = r(rows, d)
    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        sd |= {b + "attn_norm.weight": 1 + r(d), b + "ff_norm.weight": 1 + r(d), b + "q_proj.weight": r(d, d),
               b + "k_proj.weight": r(kv, d), b + "v_proj.weight": r(kv, d), b + "attn_out.weight": r(d, d),
               b + "ff_proj.weight": r(ff, d), b + "up_proj.weight": r(ff, d), b + "ff_out.weight": r(d, ff)}
        if cfg.get("include_qkv_bias"):
            sd |= {b + "q_proj.bias": r(d), b + "k_proj.bias": r(kv), b + "v_proj.bias": r(kv)}
    return sd


def save_sharded(sd: dict, out: Path, n_shards: int, dtype=torch.bfloat16) -> None:
    """HF-style shards model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    keys = sorted(sd)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k].to(dtype).contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_llada_dir(out: Path, n_shards: int = 3, seed: int = 0, **cfg_kw) -> tuple[dict, dict]:
    """A complete LLaDA-format directory (config, shards, tokenizer). Returns (config, fp32 state dict as saved)."""
    out.mkdir(parents=True, exist_ok=True)
    specials = make_tokenizer(out)
    cfg = llada_config(mask_token_id=specials["<|mdm_mask|>"], eos_token_id=specials["<|endoftext|>"],
                       pad_token_id=specials["<|endoftext|>"], **cfg_kw)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = llada_state(cfg, seed)
    save_sharded(sd, out, n_shards)
    return cfg, {k: v.to(torch.bfloat16).float() for k, v in sd.items()}


def llada_reference(sd: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward from its description (paper Sec. 2 + the released LLaDALlamaBlock): pre-RMSNorm blocks,
    RoPE on q/k over (first half, second half) pairs, full bidirectional softmax attention written out,
    gate = silu(ff_proj), ff_out(gate * up_proj); final ln_f and ff_out (or wte when tied)."""
    p = "model.transformer."
    eps, d, h = cfg["rms_norm_eps"], cfg["d_model"], cfg["n_heads"]
    hd, kvh = d // h, cfg["n_kv_heads"]

    def rms(t, w):
        return w * (t * (t.pow(2).mean(-1, keepdim=True) + eps).rsqrt())

    def rope(t):  # t [B, H, L, hd]
        n = t.shape[2]
        freq = cfg["rope_theta"] ** (-torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(n).float()[:, None] * freq[None]
        c, s = ang.cos(), ang.sin()
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    def lin(t, name):
        out = t @ sd[name + ".weight"].T
        return out + sd[name + ".bias"] if name + ".bias" in sd else out

    z = sd[p + "wte.weight"][x]
    bsz, n, _ = z.shape
    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        a = rms(z, sd[b + "attn_norm.weight"])
        q = lin(a, b + "q_proj").view(bsz, n, h, hd).transpose(1, 2)
        k = lin(a, b + "k_proj").view(bsz, n, kvh, hd).transpose(1, 2).repeat_interleave(h // kvh, 1)
        v = lin(a, b + "v_proj").view(bsz, n, kvh, hd).transpose(1, 2).repeat_interleave(h // kvh, 1)
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / hd ** 0.5, -1) @ v
        z = z + att.transpose(1, 2).reshape(bsz, n, d) @ sd[b + "attn_out.weight"].T
        m = rms(z, sd[b + "ff_norm.weight"])
        z = z + (F.silu(m @ sd[b + "ff_proj.weight"].T) * (m @ sd[b + "up_proj.weight"].T)) @ sd[b + "ff_out.weight"].T
    z = rms(z, sd[p + "ln_f.weight"])
    return z @ (sd[p + "wte.weight"] if cfg["weight_tying"] else sd[p + "ff_out.weight"]).T


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Two consolidated checkpoints hold the same tensors bit for bit (names, dtypes, values), the same model
    config and byte-identical tokenizer files (``tokenizer.json``, ``tokenizer_config.json``)."""
    import llada_scale.checkpoint as cio

    sa, ma = cio.load_model_state(a, progress=False)
    sb, mb = cio.load_model_state(b, progress=False)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma["model"] == mb["model"]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (Path(a) / f).read_bytes() == (Path(b) / f).read_bytes(), f
