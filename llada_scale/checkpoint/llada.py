"""LLaDA's released checkpoint format (GSAI-ML/LLaDA-8B-Base, LLaDA-8B-Instruct) in and out.

The format, as published on the hub (``config.json`` with ``model_type: "llada"``, ``architectures:
["LLaDAModelLM"]``, ``auto_map`` to ``configuration_llada.py`` / ``modeling_llada.py``, sharded safetensors):

=====================================================  ==========================================================
LLaDA name (``model.transformer.`` prefix)             ours
=====================================================  ==========================================================
``wte.weight``                                         ``model.embed_tokens.weight``
``blocks.N.attn_norm.weight`` / ``ff_norm.weight``     ``model.layers.N.input_layernorm`` / ``post_attention_layernorm``
``blocks.N.{q,k,v}_proj.{weight,bias}``                ``model.layers.N.self_attn.{q,k,v}_proj``
``blocks.N.attn_out.weight``                           ``model.layers.N.self_attn.o_proj.weight``
``blocks.N.ff_proj`` / ``up_proj`` / ``ff_out``        ``model.layers.N.mlp.gate_proj`` / ``up_proj`` / ``down_proj``
``ln_f.weight``                                        ``model.norm.weight``
``ff_out.weight`` (absent with ``weight_tying``)       ``lm_head.weight``
=====================================================  ==========================================================

The llama block is ``x + attn_out(attn(rope(q), rope(k), v))`` then ``x + ff_out(silu(ff_proj(h)) * up_proj(h))``
with pre-RMSNorms, bidirectional attention (ML-GSAI/LLaDA ``modeling_llada.py``, ``LLaDALlamaBlock``), which is
our backbone with ``causal=False``. Config keys: ``d_model``, ``n_heads``, ``n_kv_heads``, ``n_layers``,
``mlp_hidden_size`` (or ``mlp_ratio``), ``embedding_size`` (rows; >= ``vocab_size``), ``max_sequence_length``,
``rope_theta``, ``rms_norm_eps``, ``weight_tying``, ``include_qkv_bias``, ``layer_norm_with_affine``,
``mask_token_id`` (126336 for LLaDA-8B). Any other variant (``block_type`` sequential, ALiBi, LayerNorm, full-width
QK layer norm, biases outside q/k/v, scaled logits, block groups) is refused with one line.

:func:`import_llada` streams the checkpoint shard by shard (every key and shape is checked from the headers
first); :func:`export_llada` writes LLaDA's format plus our own ``trust_remote_code`` files
(:mod:`llada_scale.checkpoint.llada_remote`) so that ``transformers.AutoModel.from_pretrained(DIR,
trust_remote_code=True)`` loads the model offline. ``import_llada(export_llada(x))`` is bit-identical to ``x``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys

from llada_scale.checkpoint.convert import (_export_tokenizer, _import_tokenizer, check_tokenizer_vocab,
                                            consolidated_config)
from llada_scale.checkpoint.files import (CONFIG_FILE, FORMAT, SAFE_INDEX, CheckpointError, atomic_write_text,
                                          read_json, resolve_dtype, save_safetensors, tokenizer_dir)
from llada_scale.checkpoint.streaming import scan_weights, staged_output, stream_convert
from llada_scale.checkpoint.weights import (check_state_dict, consolidated_meta, expected_shapes, load_model_state,
                                            model_config_from_meta, resolve_checkpoint, tokenizer_path_from_meta)

__all__ = ["model_config_from_llada", "llada_config_from_model_config", "llada_to_ours", "ours_to_llada",
           "import_llada", "export_llada"]

_PREFIX = "model.transformer."
_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "ff_norm.weight": "post_attention_layernorm.weight",
          "q_proj.weight": "self_attn.q_proj.weight", "k_proj.weight": "self_attn.k_proj.weight",
          "v_proj.weight": "self_attn.v_proj.weight", "q_proj.bias": "self_attn.q_proj.bias",
          "k_proj.bias": "self_attn.k_proj.bias", "v_proj.bias": "self_attn.v_proj.bias",
          "attn_out.weight": "self_attn.o_proj.weight", "ff_proj.weight": "mlp.gate_proj.weight",
          "up_proj.weight": "mlp.up_proj.weight", "ff_out.weight": "mlp.down_proj.weight"}
_TOP = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
        "ff_out.weight": "lm_head.weight"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
# Variant switches of LLaDA's (OLMo-derived) config and the only values we implement.
_FIXED = {"block_type": ("llama",), "activation_type": ("silu",), "layer_norm_type": ("rms",), "rope": (True,),
          "alibi": (False,), "attention_layer_norm": (False,), "include_bias": (False,), "scale_logits": (False,),
          "input_emb_norm": (False,), "block_group_size": (1,), "bias_for_layer_norm": (None, False)}
# Keys whose defaults differ between versions of configuration_llada.py: they must be spelled out.
_REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size", "block_type", "activation_type", "layer_norm_type",
             "rope", "weight_tying", "rope_theta", "rms_norm_eps", "max_sequence_length")
_REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llada_remote")
_REMOTE_FILES = ("configuration_llada.py", "modeling_llada.py")
_AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
             "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}


def _log(msg: str) -> None:
    print(msg, flush=True)


def llada_to_ours(name: str) -> str | None:
    """LLaDA parameter name -> ours (None for names outside the format, reported as unexpected by the caller)."""
    if not name.startswith(_PREFIX):
        return name  # unknown: kept as is so the shape check names it
    rest = name[len(_PREFIX):]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return _TOP.get(rest, name)


def ours_to_llada(name: str) -> str:
    """Our parameter name -> LLaDA's. Raises CheckpointError for a name LLaDA's format has no place for."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _BLOCK_BACK:
        return f"{_PREFIX}blocks.{m.group(1)}.{_BLOCK_BACK[m.group(2)]}"
    if name in _TOP_BACK:
        return _PREFIX + _TOP_BACK[name]
    raise CheckpointError(f"tensor {name} has no place in LLaDA's format")


def model_config_from_llada(cfg: dict, source: str = "config.json") -> dict:
    """Map LLaDA's ``config.json`` dict to a :class:`ModelConfig` dict (``causal=False``).

    Raises:
        CheckpointError: not a LLaDA config, a missing required key, or a variant we do not implement (one line
            naming the key, its value and what is supported).
    """
    if cfg.get("model_type") != "llada":
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not 'llada' (LLaDAModelLM); for "
                              "HF Llama / Mistral / Qwen directories use import-hf")
    missing = [k for k in _REQUIRED if k not in cfg]
    if "mlp_hidden_size" not in cfg and "mlp_ratio" not in cfg:
        missing.append("mlp_hidden_size")
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing} (configuration_llada.py's defaults differ between "
                              "versions, so they must be given)")
    for key, allowed in _FIXED.items():
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{source}: {key}={value!r} is a LLaDA variant llada_scale does not implement "
                                  f"(supported: {key} in {list(allowed)})")
    for key in ("attention_dropout", "residual_dropout", "embedding_dropout"):
        if cfg.get(key):
            print(f"warning: {source}: {key}={cfg[key]} is ignored (llada_scale trains without dropout)",
                  file=sys.stderr)
    d, heads = cfg["d_model"], cfg["n_heads"]
    if d % heads:
        raise CheckpointError(f"{source}: d_model {d} is not divisible by n_heads {heads}")
    kv = cfg.get("n_kv_heads")
    mqa = cfg.get("multi_query_attention")
    if kv is None:
        kv = 1 if mqa else heads
    elif mqa is not None and kv != (1 if mqa else heads):
        raise CheckpointError(f"{source}: multi_query_attention={mqa} contradicts n_kv_heads={kv}")
    rows = cfg.get("embedding_size") or cfg["vocab_size"]
    if rows < cfg["vocab_size"]:
        raise CheckpointError(f"{source}: embedding_size {rows} < vocab_size {cfg['vocab_size']}")
    mask = cfg.get("mask_token_id")
    if mask is None:
        raise CheckpointError(f"{source}: no mask_token_id (LLaDA-8B: 126336); add it to config.json")
    return {"vocab_size": rows, "hidden_size": d, "num_layers": cfg["n_layers"], "num_heads": heads,
            "num_kv_heads": kv, "intermediate_size": cfg.get("mlp_hidden_size") or cfg["mlp_ratio"] * d,
            "max_seq_len": cfg["max_sequence_length"], "rope_theta": float(cfg["rope_theta"]), "rope_scaling": None,
            "norm_eps": float(cfg["rms_norm_eps"]), "tie_embeddings": bool(cfg["weight_tying"]), "causal": False,
            "qk_norm": False, "norm_weight": bool(cfg.get("layer_norm_with_affine", True)), "mask_token_id": mask,
            "init_std": float(cfg.get("init_std", 0.02)), "attention_bias": bool(cfg.get("include_qkv_bias")),
            "head_dim": d // heads}


def llada_config_from_model_config(mc, tokenizer: dict | None = None, torch_dtype: str = "bfloat16") -> dict:
    """Our :class:`ModelConfig` -> LLaDA's ``config.json`` dict (with ``auto_map`` to our remote-code files).

    Raises:
        CheckpointError: a model LLaDA's format cannot hold (causal / AR, QK-norm, rope scaling, head_dim other
            than hidden_size / num_heads, no mask token).
    """
    why = None
    if mc.causal:
        why = "it is causal (AR); LLaDA's format holds mask predictors: run ar-to-diffusion first"
    elif mc.qk_norm:
        why = "it uses per-head QK-norm (Qwen3 style); use export-hf (Qwen3 config with mask_token_id)"
    elif mc.rope_scaling:
        why = f"it uses {mc.rope_scaling['type']} rope scaling; use export-hf"
    elif mc.head_dim * mc.num_heads != mc.hidden_size:
        why = f"head_dim {mc.head_dim} x {mc.num_heads} heads != hidden_size {mc.hidden_size}; use export-hf"
    elif mc.mask_token_id is None:
        why = "it records no mask_token_id"
    if why:
        raise CheckpointError(f"cannot write LLaDA's format: {why}")
    tok = tokenizer if isinstance(tokenizer, dict) else {}
    eos = tok.get("eos_token_id")
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "auto_map": dict(_AUTO_MAP),
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
        "block_group_size": 1, "block_type": "llama", "d_model": mc.hidden_size, "embedding_dropout": 0.0,
        "embedding_size": mc.vocab_size, "eos_token_id": eos, "flash_attention": False, "include_bias": False,
        "include_qkv_bias": bool(mc.attention_bias), "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "normal", "init_std": mc.init_std, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": bool(mc.norm_weight), "mask_token_id": mc.mask_token_id,
        "max_sequence_length": mc.max_seq_len, "mlp_hidden_size": mc.intermediate_size, "mlp_ratio": 4,
        "multi_query_attention": None, "n_heads": mc.num_heads, "n_kv_heads": mc.num_kv_heads,
        "n_layers": mc.num_layers, "pad_token_id": tok.get("pad_token_id", eos), "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": mc.norm_eps, "rope": True, "rope_full_precision": True,
        "rope_theta": mc.rope_theta, "scale_logits": False, "torch_dtype": torch_dtype, "use_cache": False,
        "vocab_size": mc.vocab_size, "weight_tying": bool(mc.tie_embeddings),
    }


def _check_tokenizer(tok_dir: str, mc, source: str) -> str:
    """Check the tokenizer in ``tok_dir`` against the model config; return the mask token's string.

    Raises:
        CheckpointError: more tokens than embedding rows, no token with id ``mask_token_id``, or a
            ``tokenizer_config.json`` naming another mask token.
    """
    path = os.path.join(tok_dir, "tokenizer.json")
    token = check_tokenizer_vocab(path, mc.vocab_size, source).id_to_token(mc.mask_token_id)
    tc_path = os.path.join(tok_dir, "tokenizer_config.json")
    named = read_json(tc_path).get("mask_token") if os.path.isfile(tc_path) else None
    named = named.get("content") if isinstance(named, dict) else named
    if token is None:
        raise CheckpointError(f"{path} has no token with the config's mask_token_id {mc.mask_token_id}; the "
                              "tokenizer is not this model's")
    if named and named != token:
        raise CheckpointError(f"{tc_path} names mask token {named!r} but id {mc.mask_token_id} is {token!r}")
    return token


def import_llada(hf_dir: str, out_dir: str, *, dtype: str = "auto", max_shard_size: str = "5GB",
                 force: bool = False, quiet: bool = False, tokenizer: str | None = None, max_seq_len: int = 0) -> None:
    """Read a LLaDA checkpoint directory and write our consolidated format, one shard at a time.

    Every tensor name and shape is checked against the config from the safetensors headers, and the tokenizer
    against the config's vocabulary and mask token, before anything is written; the output appears complete or
    not at all (:func:`llada_scale.checkpoint.streaming.staged_output`). The tokenizer files are copied with
    ``mask_token`` recorded, so training uses LLaDA's mask token (126336) and never adds a second one.
    ``dtype="auto"`` keeps the stored tensors' dtype (bf16 for the released LLaDA-8B;
    :func:`llada_scale.checkpoint.files.resolve_dtype`).

    Raises:
        CheckpointError: not a LLaDA directory or an unsupported variant, a missing shard, a tensor of the wrong
            shape / missing / unexpected, a tokenizer that does not fit, a non-empty ``out_dir`` without ``force``.
    """
    from llada_scale.model.transformer import ModelConfig

    hf_dir = os.path.abspath(hf_dir)
    cfg_path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{hf_dir} has no {CONFIG_FILE}; expected a LLaDA checkpoint directory")
    try:
        mc = ModelConfig(**model_config_from_llada(read_json(cfg_path), cfg_path))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    if max_seq_len:
        mc.max_seq_len = max_seq_len
    tensors = scan_weights(hf_dir)
    dt, origin = resolve_dtype(dtype, (t.dtype for t in tensors.values()))
    tok_src = tokenizer or (hf_dir if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None)
    mask_token = _check_tokenizer(tokenizer_dir(tok_src), mc, cfg_path) \
        if tok_src else None
    with staged_output(out_dir, force, inputs=(hf_dir,)) as tmp:
        ident = _import_tokenizer(tok_src, tmp, out_dir, mask_token)
        config = consolidated_config(mc, dt, ident, source={"path": hf_dir, "kind": "llada"})
        files = stream_convert(tensors, llada_to_ours, expected_shapes(mc), tmp, dtype=dt,
                               max_shard_size=max_shard_size, metadata={FORMAT: json.dumps(config)},
                               progress=not quiet, source=hf_dir)
        atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))
    n = sum(math.prod(t.shape) for t in tensors.values())
    _log(f"wrote {out_dir}: {len(files)} weight file(s), {n / 1e6:.2f}M parameters, dtype {origin}, "
         f"mask_token_id {mc.mask_token_id}, vocab {mc.vocab_size}")


def _has_token(path: str, token: str) -> bool:
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(path).token_to_id(token) is not None


def export_llada(source: str, out_dir: str, *, dtype: str = "auto", max_shard_size: str = "5GB", force: bool = False,
                 quiet: bool = False, tokenizer: str | None = None) -> None:
    """Write a diffusion model in LLaDA's format: ``config.json`` (LLaDA keys + ``auto_map``), safetensors in
    LLaDA's names, the tokenizer (``mask_token`` recorded) and our ``configuration_llada.py`` /
    ``modeling_llada.py``. A consolidated source is streamed shard by shard; other sources are loaded whole.
    ``dtype="auto"`` keeps the source's stored dtype (fp32 for a DeepSpeed checkpoint's master weights).

    Raises:
        CheckpointError: a model LLaDA's format cannot hold (see :func:`llada_config_from_model_config`), weights
            that do not fit the recorded config, a non-empty ``out_dir`` without ``force``.
    """
    kind, resolved = resolve_checkpoint(source)
    if kind == "safetensors":
        sd, meta, tensors = None, consolidated_meta(resolved), scan_weights(resolved)
        stored = (t.dtype for t in tensors.values())
    else:
        sd, meta = load_model_state(resolved, progress=not quiet)
        stored = meta["dtypes"]
    mc = model_config_from_meta(meta, resolved)
    dt, origin = resolve_dtype(dtype, stored)
    llada_cfg = llada_config_from_model_config(mc, meta.get("tokenizer"), str(dt).replace("torch.", ""))
    tok_src = tokenizer or tokenizer_path_from_meta(meta)
    with staged_output(out_dir, force, inputs=(source,)) as tmp:
        tok = _export_tokenizer(tok_src, tmp, mc.mask_token_id)
        if tok is not None and tok.backend == "hf" and \
                not _has_token(os.path.join(tmp, "tokenizer.json"), tok.mask_token):
            tok._hf.save(os.path.join(tmp, "tokenizer.json"))  # with the mask token our wrapper added
        if sd is None:
            files = stream_convert(tensors, ours_to_llada,
                                   {ours_to_llada(k): v for k, v in expected_shapes(mc).items()}, tmp, dtype=dt,
                                   max_shard_size=max_shard_size, progress=not quiet, source=resolved)
        else:
            check_state_dict(sd, mc, resolved)
            files = save_safetensors({ours_to_llada(k): v for k, v in sd.items()}, tmp, None, max_shard_size, dt,
                                     progress=not quiet)
        for f in _REMOTE_FILES:
            shutil.copyfile(os.path.join(_REMOTE_DIR, f), os.path.join(tmp, f))
        atomic_write_text(os.path.join(tmp, "generation_config.json"), json.dumps(
            {"_from_model_config": True, "eos_token_id": llada_cfg["eos_token_id"],
             "pad_token_id": llada_cfg["pad_token_id"]}, indent=2))
        atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(llada_cfg, indent=2, sort_keys=True))
    _log(f"wrote LLaDA-format mask predictor to {out_dir}: {len(files)} weight file(s)"
         f"{' + ' + SAFE_INDEX if len(files) > 1 else ''}, dtype {origin}; load with "
         f"transformers.AutoModel.from_pretrained({out_dir!r}, trust_remote_code=True)")
