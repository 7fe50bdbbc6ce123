#!/usr/bin/env python
"""Convert llada_scale checkpoints between formats (one process, no deepspeed launcher needed).

Subcommands (each has its own --help):

  consolidate CKPT OUT_DIR         DeepSpeed tag dir (ZeRO 0-3, any world size) -> safetensors + config.json
                                   + the tokenizer files named by the checkpoint's tokenizer identity
  export-hf SRC OUT_DIR            our model (tag dir or consolidated) -> HF LlamaForCausalLM directory
  import-hf HF_DIR OUT_DIR         local HF Llama-family directory -> our consolidated format
  import-nano-llada PT OUT_DIR     Nano-LLaDA diffusion / minimind AR ``.pt`` state dict -> consolidated
  ar-to-diffusion SRC OUT_DIR      AR model -> LLaDA mask predictor (adds the mask-token rows, causal=false)

The consolidated format: ``config.json`` = ``{"format": "llada_scale", "format_version": 1, "model":
ModelConfig dict, "tokenizer": identity | null, "step", "run_config", "source", "dtype"}`` next to
``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above
``--max_shard_size``). Every file is written under a temporary name and moved into place (os.replace).
Errors print one line ``error: ...`` and exit with status 2. See docs/EVAL.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llada_scale import checkpoint_io as cio  # noqa: E402
from llada_scale.checkpoint_io import CheckpointError  # noqa: E402

FORMAT_VERSION = 1


def _log(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _prepare_out(out_dir: str, force: bool) -> None:
    if os.path.isfile(out_dir):
        raise CheckpointError(f"output {out_dir} is a file; give a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise CheckpointError(f"output directory {out_dir} is not empty; pass --force to overwrite")
    os.makedirs(out_dir, exist_ok=True)


def _model_cfg(meta: dict, source: str):
    return cio.model_config_from_meta(meta, source)


def _tokenizer_identity(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        from llada_scale.tokenizer import Tokenizer

        return Tokenizer.load(path).identity()
    except Exception as e:  # noqa: BLE001 - tokenizer is optional metadata here
        _warn(f"could not load tokenizer {path}: {e}")
        return None


def _copy_tokenizer(meta: dict, out_dir: str, override: str | None) -> dict | None:
    """Copy tokenizer files into out_dir; return the identity to record (None when there is none)."""
    ident = meta.get("tokenizer")
    src = override or cio.tokenizer_path_from_meta(meta)
    if override:
        ident = _tokenizer_identity(override) or ident
    if not src:
        where = (ident or {}).get("path") if isinstance(ident, dict) else None
        _warn("no tokenizer copied" + (f" (recorded path {where} does not exist)" if where else
                                        " (the checkpoint records none)") + "; pass --tokenizer PATH")
        return ident
    copied = cio.copy_tokenizer_files(src, out_dir)
    if copied:
        _log(f"copied tokenizer files {copied} from {src}")
    return ident


def write_consolidated(state_dict: dict, model_cfg, out_dir: str, *, dtype: str, max_shard_size: str,
                       tokenizer: dict | None, step=None, run_config=None, source: dict | None = None,
                       progress: bool = True) -> list[str]:
    """Check ``state_dict`` against ``model_cfg`` and write our consolidated format into ``out_dir``.

    Raises:
        CheckpointError: keys/shapes do not fit the config (message names them), bad dtype/size.
    """
    cio.check_state_dict(state_dict, model_cfg, source=(source or {}).get("path", "checkpoint"))
    dt = cio.parse_dtype(dtype)
    config = {
        "format": cio.FORMAT, "format_version": FORMAT_VERSION, "model": model_cfg.to_dict(), "tokenizer": tokenizer,
        "step": step, "run_config": run_config, "source": source or {},
        "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt],
    }
    files = cio.save_safetensors(state_dict, out_dir, config, max_shard_size, dt, progress=progress)
    n = sum(v.numel() for v in state_dict.values())
    _log(f"wrote {out_dir}: {len(files)} weight file(s), {n / 1e6:.2f}M parameters, dtype {config['dtype']}")
    return files


# ------------------------------------------------------------------------------------------------ commands
def cmd_consolidate(args) -> None:
    kind, resolved = cio.resolve_checkpoint(args.checkpoint)
    if kind != "deepspeed" and not args.any_source:
        raise CheckpointError(f"{args.checkpoint} is a {kind} checkpoint, not a DeepSpeed tag directory "
                              "(pass --any_source to re-consolidate it anyway)")
    _prepare_out(args.out_dir, args.force)
    sd, meta = cio.load_model_state(resolved, progress=not args.quiet)
    cfg = _model_cfg(meta, resolved)
    tok = _copy_tokenizer(meta, args.out_dir, args.tokenizer)
    source = {"path": resolved, "kind": meta["format"], "zero_stage": meta.get("zero_stage"),
              "world_size": meta.get("world_size")}
    write_consolidated(sd, cfg, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer=tok,
                       step=meta.get("step"), run_config=meta.get("config"), source=source, progress=not args.quiet)


def cmd_export_hf(args) -> None:
    _prepare_out(args.out_dir, args.force)
    sd, meta = cio.load_model_state(args.source, progress=not args.quiet)
    cfg = _model_cfg(meta, meta["path"])
    dt = cio.parse_dtype(args.dtype)
    hf = cio.hf_config_from_model_config(cfg.to_dict(), torch_dtype=str(dt).replace("torch.", ""))
    cio.check_state_dict(sd, cfg, meta["path"])
    tok = meta.get("tokenizer") or {}
    for key, hf_key in (("eos_token_id", "eos_token_id"), ("bos_token_id", "bos_token_id"),
                        ("pad_token_id", "pad_token_id")):
        if isinstance(tok, dict) and tok.get(key) is not None:
            hf[hf_key] = tok[key]
    _copy_tokenizer(meta, args.out_dir, args.tokenizer)
    files = cio.save_safetensors(sd, args.out_dir, None, args.max_shard_size, dt, progress=not args.quiet,
                                 metadata={"format": "pt"})
    cio.atomic_write_text(os.path.join(args.out_dir, "config.json"), json.dumps(hf, indent=2, sort_keys=True))
    gen = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in hf:
            gen[k] = hf[k]
    cio.atomic_write_text(os.path.join(args.out_dir, "generation_config.json"), json.dumps(gen, indent=2))
    kind = "diffusion (causal=false, load with the causal mask removed; see docs/EVAL.md)" if not cfg.causal else "AR"
    _log(f"wrote HF LlamaForCausalLM {kind} to {args.out_dir}: {len(files)} weight file(s)")


def cmd_import_hf(args) -> None:
    kind, resolved = cio.resolve_checkpoint(args.hf_dir)
    if kind != "hf":
        raise CheckpointError(f"{args.hf_dir} is not a Hugging Face model directory (config.json with model_type)")
    _prepare_out(args.out_dir, args.force)
    sd, meta = cio.load_model_state(resolved, progress=not args.quiet)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    cfg = _model_cfg(meta, resolved)
    if args.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=args.max_seq_len)
    tok_src = args.tokenizer or (resolved if os.path.isfile(os.path.join(resolved, "tokenizer.json")) else None)
    tok = None
    if tok_src:
        tok = _tokenizer_identity(tok_src)
        cio.copy_tokenizer_files(tok_src, args.out_dir)
    write_consolidated(sd, cfg, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer=tok,
                       source={"path": resolved, "kind": "hf"}, progress=not args.quiet)


# Nano-LLaDA diffusion Model (JayCheng113/Nano-LLaDA scripts/train/diffusion.py) key names -> ours.
_NANO_BLOCK = {"attn.c_q.weight": "self_attn.q_proj.weight", "attn.c_k.weight": "self_attn.k_proj.weight",
               "attn.c_v.weight": "self_attn.v_proj.weight", "attn.c_proj.weight": "self_attn.o_proj.weight",
               "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
               "mlp.down_proj.weight": "mlp.down_proj.weight"}


def _unwrap_pt(obj, path: str) -> dict:
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model", "module"):
            if isinstance(obj.get(key), dict) and any(torch.is_tensor(v) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (expected a dict of tensors, or one under "
                              "'model_state_dict' / 'state_dict' / 'model')")
    out = {}
    for k, v in obj.items():
        if not torch.is_tensor(v):
            continue
        for p in ("_orig_mod.", "module."):
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def detect_arch(sd: dict) -> str:
    """``"nano-llada"`` (token_emb / blocks.N.attn.c_q keys) or ``"minimind"`` (HF-style model.layers keys).

    Raises:
        CheckpointError: neither layout, or a MoE minimind checkpoint.
    """
    if any(".mlp.experts." in k or k.endswith(".mlp.gate.weight") for k in sd):
        raise CheckpointError("mixture-of-experts minimind checkpoints are not supported (dense SwiGLU only)")
    if "token_emb.weight" in sd and any(k.startswith("blocks.") for k in sd):
        return "nano-llada"
    if "model.embed_tokens.weight" in sd and any(k.startswith("model.layers.") for k in sd):
        return "minimind"
    raise CheckpointError(f"unrecognised state dict layout (first keys {sorted(sd)[:4]}); expected Nano-LLaDA "
                          "(token_emb.weight, blocks.N.attn.c_q.weight, ...) or minimind "
                          "(model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight, ...)")


def convert_nano_state(sd: dict, arch: str, *, num_heads: int, rope_theta: float, norm_eps: float,
                       max_seq_len: int, mask_token_id: int | None, causal: bool | None,
                       rope_scaling: dict | None = None):
    """Map a Nano-LLaDA / minimind state dict to ours. Returns ``(state_dict, ModelConfig)``.

    nano-llada (the ``Model`` of Nano-LLaDA ``scripts/train/diffusion.py``): weightless RMSNorm everywhere
    (``F.rms_norm`` without weight), an RMSNorm right after the token embedding, QK-norm after RoPE, MHA,
    untied head, bidirectional. Mapped exactly: the embedding norm is folded into the embedding rows
    (``E_i / rms(E_i)``, a lookup commutes with a row-wise norm); a weightless per-head RMSNorm commutes
    with RoPE (a rotation keeps the norm), so our QK-norm-before-RoPE gives the same q, k; config
    ``qk_norm=True, norm_weight=False, causal=False``.

    minimind (``MiniMindForCausalLM``, jingyaogong/minimind ``model/model_minimind.py``): HF Llama names,
    GQA, weighted RMSNorm, optional weighted ``q_norm``/``k_norm`` before RoPE, tied embeddings
    (``lm_head.weight`` equal to the embedding is dropped and ``tie_embeddings=True``); causal.

    ``rope_scaling`` (a ``ModelConfig.rope_scaling`` YaRN dict, see :func:`resolve_nano_rope_scaling`) is
    recorded as is: both repos compute YaRN like ``llada_scale.model.rope_inv_freq``.

    Raises:
        CheckpointError: missing/odd keys (named), head count not dividing the width, bad mask id, invalid
            rope_scaling.
    """
    from llada_scale.model import ModelConfig

    sd = {k: v.float() for k, v in sd.items() if k not in ("freqs_cos", "freqs_sin", "cos", "sin")
          and not k.endswith(("freqs_cos", "freqs_sin"))}
    out: dict[str, torch.Tensor] = {}
    if arch == "nano-llada":
        emb = sd.pop("token_emb.weight")
        e64 = emb.double()
        out["model.embed_tokens.weight"] = (e64 * torch.rsqrt(e64.pow(2).mean(-1, keepdim=True) + norm_eps)).float()
        if "lm_head.weight" not in sd:
            raise CheckpointError("Nano-LLaDA state dict has no lm_head.weight")
        out["lm_head.weight"] = sd.pop("lm_head.weight")
        layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
        for i in layers:
            for theirs, ours in _NANO_BLOCK.items():
                key = f"blocks.{i}.{theirs}"
                if key not in sd:
                    raise CheckpointError(f"Nano-LLaDA state dict lacks {key}")
                out[f"model.layers.{i}.{ours}"] = sd.pop(key)
        if sd:
            raise CheckpointError(f"unexpected Nano-LLaDA keys {sorted(sd)[:4]} (norm weights? biases?)")
        hidden = out["model.embed_tokens.weight"].shape[1]
        if hidden % num_heads:
            raise CheckpointError(f"--num_heads {num_heads} does not divide the hidden size {hidden}")
        vocab = out["model.embed_tokens.weight"].shape[0]
        kv = out["model.layers.0.self_attn.k_proj.weight"].shape[0] // (hidden // num_heads)
        cfg = dict(vocab_size=vocab, hidden_size=hidden, num_layers=len(layers), num_heads=num_heads, num_kv_heads=kv,
                   intermediate_size=out["model.layers.0.mlp.gate_proj.weight"].shape[0], qk_norm=True,
                   norm_weight=False, tie_embeddings=False, causal=False if causal is None else causal)
        if mask_token_id is None and not cfg["causal"]:
            if vocab == 6401:  # minimind's 6400 tokens + <|mask|> (Nano-LLaDA adds it as id 6400)
                mask_token_id = 6400
            else:
                raise CheckpointError(f"cannot tell the mask token id for vocab {vocab}; pass --mask_token_id")
    else:
        out = dict(sd)
        emb = out["model.embed_tokens.weight"]
        head = out.get("lm_head.weight")
        tie = head is None or (head.shape == emb.shape and torch.equal(head, emb))
        if tie:
            out.pop("lm_head.weight", None)
        qk = "model.layers.0.self_attn.q_norm.weight" in out
        hidden = emb.shape[1]
        if qk:
            head_dim = out["model.layers.0.self_attn.q_norm.weight"].shape[0]
            num_heads = out["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim
        head_dim = hidden // num_heads
        if hidden % num_heads or out["model.layers.0.self_attn.q_proj.weight"].shape[0] != hidden:
            raise CheckpointError(f"q_proj rows {out['model.layers.0.self_attn.q_proj.weight'].shape[0]} != hidden "
                                  f"{hidden} or --num_heads {num_heads} does not divide it (head_dim must be "
                                  "hidden/heads)")
        layers = sorted({int(k.split(".")[2]) for k in out if k.startswith("model.layers.")})
        cfg = dict(vocab_size=emb.shape[0], hidden_size=hidden, num_layers=len(layers), num_heads=num_heads,
                   num_kv_heads=out["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                   intermediate_size=out["model.layers.0.mlp.gate_proj.weight"].shape[0], qk_norm=qk,
                   norm_weight=True, tie_embeddings=tie, causal=True if causal is None else causal)
    try:
        mc = ModelConfig(**cfg, rope_theta=rope_theta, rope_scaling=rope_scaling, norm_eps=norm_eps,
                         max_seq_len=max_seq_len, mask_token_id=mask_token_id)
    except ValueError as e:
        raise CheckpointError(f"cannot build a model config: {e}") from None
    cio.check_state_dict(out, mc, source=f"{arch} state dict")
    return out, mc


# minimind MiniMindConfig / Nano-LLaDA diffusion.py: the RoPE table length when not recorded
_SOURCE_TABLE_LEN = 32768


def resolve_nano_rope_scaling(args, recorded: dict | None, arch: str) -> dict | None:
    """The ``ModelConfig.rope_scaling`` of a Nano-LLaDA / minimind checkpoint (None = plain RoPE).

    ``--rope_scaling auto`` reads ``inference_rope_scaling`` from the argparse namespace Nano-LLaDA saves in its
    checkpoints (``{"model_state_dict": ..., "args": vars(args)}``); no record means plain RoPE. Both repos build
    ``{"factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1,
    "attention_factor": 1.0}`` (the --rope_* defaults here) and apply it only when their RoPE table is longer than
    original_max_position_embeddings: minimind's table has ``max_position_embeddings`` rows, Nano-LLaDA's
    ``max(max_position_embeddings, 2 * seq_len)`` (from the record, else --source_max_position_embeddings,
    default 32768); a shorter table gives plain RoPE, as in the source.

    Raises:
        CheckpointError: nano-llada with attention_factor != 1 (its QK-norm comes after RoPE and cancels the
            cos/sin scale; ours comes before, so that would not be exact).
    """
    recorded = recorded if isinstance(recorded, dict) else {}
    said = recorded.get("inference_rope_scaling")
    mode = args.rope_scaling
    if mode == "auto":
        mode = "yarn" if said else "none"
    elif said is not None and bool(said) != (mode == "yarn"):
        _warn(f"--rope_scaling {mode} overrides the checkpoint's recorded inference_rope_scaling={said}")
    if mode == "none":
        return None
    table = args.source_max_position_embeddings
    if table is None and recorded.get("max_position_embeddings") is not None:
        table = int(recorded["max_position_embeddings"])
        if arch == "nano-llada" and recorded.get("seq_len"):
            table = max(table, 2 * int(recorded["seq_len"]))
    table = table or _SOURCE_TABLE_LEN
    if table <= args.original_max_position_embeddings:
        _warn(f"the source's RoPE table ({table} positions) does not exceed original_max_position_embeddings "
              f"{args.original_max_position_embeddings}, so it applied no YaRN; importing with plain RoPE")
        return None
    if arch == "nano-llada" and args.rope_attention_factor != 1.0:
        raise CheckpointError("--rope_attention_factor != 1 cannot be imported exactly for nano-llada (its QK-norm "
                              "follows RoPE and cancels the scale; ours precedes it)")
    return {"type": "yarn", "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_max_position_embeddings,
            "beta_fast": args.rope_beta_fast, "beta_slow": args.rope_beta_slow,
            "attention_factor": args.rope_attention_factor}


def cmd_import_nano(args) -> None:
    if not os.path.isfile(args.pt_file):
        raise CheckpointError(f"{args.pt_file} does not exist")
    _prepare_out(args.out_dir, args.force)
    try:
        obj = torch.load(args.pt_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {args.pt_file} as a weights-only torch file: {e}") from None
    sd = _unwrap_pt(obj, args.pt_file)
    arch = detect_arch(sd) if args.arch == "auto" else args.arch
    if args.hidden_act != "silu":
        raise CheckpointError(f"--hidden_act {args.hidden_act}: only silu (SwiGLU) maps onto our MLP")
    rope_scaling = resolve_nano_rope_scaling(args, obj.get("args") if isinstance(obj, dict) else None, arch)
    causal = {"auto": None, "true": True, "false": False}[args.causal]
    sd, mc = convert_nano_state(sd, arch, num_heads=args.num_heads, rope_theta=args.rope_theta,
                                norm_eps=args.norm_eps, max_seq_len=args.max_seq_len,
                                mask_token_id=args.mask_token_id, causal=causal, rope_scaling=rope_scaling)
    tok = None
    if args.tokenizer:
        tok = _tokenizer_identity(args.tokenizer)
        cio.copy_tokenizer_files(args.tokenizer, args.out_dir)
    _log(f"detected {arch}: {mc.num_layers} layers, hidden {mc.hidden_size}, heads {mc.num_heads}/{mc.num_kv_heads}, "
         f"vocab {mc.vocab_size}, qk_norm={mc.qk_norm}, norm_weight={mc.norm_weight}, causal={mc.causal}, "
         f"rope_scaling={mc.rope_scaling}")
    write_consolidated(sd, mc, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer=tok,
                       source={"path": os.path.abspath(args.pt_file), "kind": arch}, progress=not args.quiet)


def ar_to_diffusion_state(sd: dict, mc, mask_token_id: int, vocab_multiple: int, reset_head_row: bool):
    """Turn an AR state dict/config into a LLaDA mask predictor. Returns ``(state_dict, ModelConfig)``.

    The vocabulary grows (``llada_scale.model.resize_vocab``, new rows = mean of the old rows) to the next
    multiple of ``vocab_multiple`` above ``mask_token_id`` when the mask id is outside it; with
    ``reset_head_row`` the mask token's embedding and head rows are (re)set to the mean of all other rows
    even when they exist (an AR model never trained them). ``causal`` becomes False.

    Raises:
        CheckpointError: negative mask id or vocab_multiple < 1.
    """
    from llada_scale.model import resize_vocab

    if mask_token_id < 0 or vocab_multiple < 1:
        raise CheckpointError(f"mask_token_id must be >= 0 and vocab_multiple >= 1 (got {mask_token_id}, "
                              f"{vocab_multiple})")
    vocab = mc.vocab_size
    if mask_token_id >= vocab:
        vocab = -(-(mask_token_id + 1) // vocab_multiple) * vocab_multiple
        sd = resize_vocab(sd, vocab, init_rows="mean")
        _log(f"vocabulary grown {mc.vocab_size} -> {vocab} (new rows = mean of existing rows)")
    elif reset_head_row:
        sd = dict(sd)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in sd:
                w = sd[key].clone()
                keep = torch.ones(w.shape[0], dtype=torch.bool)
                keep[mask_token_id] = False
                w[mask_token_id] = w[keep].float().mean(0).to(w.dtype)
                sd[key] = w
        _log(f"reset the embedding/head rows of token {mask_token_id} to the mean row")
    return sd, dataclasses.replace(mc, vocab_size=vocab, causal=False, mask_token_id=mask_token_id)


def cmd_ar_to_diffusion(args) -> None:
    _prepare_out(args.out_dir, args.force)
    sd, meta = cio.load_model_state(args.source, progress=not args.quiet)
    mc = _model_cfg(meta, meta["path"])
    if not mc.causal:
        _warn(f"{meta['path']} is already a diffusion model (causal=false); converting anyway")
    mask = args.mask_token_id
    tok_ident = meta.get("tokenizer")
    if args.tokenizer:
        tok_ident = _tokenizer_identity(args.tokenizer) or tok_ident
    if mask is None:
        mask = (tok_ident or {}).get("mask_token_id") if isinstance(tok_ident, dict) else None
        if mask is None:
            raise CheckpointError("no mask token id: the checkpoint records no tokenizer; pass --mask_token_id N "
                                  "or --tokenizer PATH")
    sd, mc = ar_to_diffusion_state(sd, mc, mask, args.vocab_multiple, args.reset_head_row)
    tok = _copy_tokenizer(meta, args.out_dir, args.tokenizer) if (args.tokenizer or meta.get("tokenizer")) else None
    run_cfg = meta.get("config")
    if isinstance(run_cfg, dict):
        run_cfg = {**run_cfg, "model": mc.to_dict()}
    write_consolidated(sd, mc, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       tokenizer=tok or tok_ident, step=meta.get("step"), run_config=run_cfg,
                       source={"path": meta["path"], "kind": meta["format"], "converted": "ar-to-diffusion"},
                       progress=not args.quiet)
    _log(f"mask_token_id {mask}, vocab {mc.vocab_size}, causal=false")


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(p, dtype_default="bf16"):
        p.add_argument("--dtype", default=dtype_default, choices=["bf16", "fp32", "fp16"],
                       help=f"dtype of the written weights (default {dtype_default})")
        p.add_argument("--max_shard_size", default="5GB",
                       help="largest weight file; above it write HF-style shards + model.safetensors.index.json "
                            "(e.g. 5GB, 500MB, 2GiB; default 5GB)")
        p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--tokenizer", default=None,
                       help="tokenizer directory/file to copy and record (default: the one the checkpoint names)")

    p = sub.add_parser("consolidate", help="DeepSpeed tag dir (ZeRO 0-3, any world size) -> safetensors",
                       description="Merge a DeepSpeed checkpoint tag directory (any ZeRO stage, any number of "
                                   "ranks) into fp32 weights with deepspeed's zero_to_fp32 and write them as "
                                   "safetensors + config.json + tokenizer files. A checkpoints/ or run directory "
                                   "resolves to its 'latest' tag.")
    p.add_argument("checkpoint", help="runs/<name>/checkpoints/<tag> (or checkpoints/ with a 'latest' file)")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--any_source", action="store_true",
                   help="also accept consolidated/HF sources (re-shard / re-type them)")
    common(p)
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("export-hf", help="our model -> HF LlamaForCausalLM directory",
                       description="Write config.json (LlamaConfig) + safetensors loadable by "
                                   "transformers.LlamaForCausalLM. Key names are unchanged. Diffusion models record "
                                   "mask_token_id and llada_scale.causal=false; load them with the causal mask "
                                   "removed (docs/EVAL.md). QK-norm and weightless-norm models are refused.")
    p.add_argument("source", help="tag dir, consolidated dir or .safetensors file")
    p.add_argument("out_dir", help="output directory")
    common(p)
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="local HF Llama-family directory -> consolidated",
                       description="Read a local Hugging Face llama / mistral / qwen3 directory (config.json + "
                                   "safetensors or pytorch_model.bin) and write our consolidated format. Refuses "
                                   "what our backbone cannot represent (biases, rope scaling other than YaRN, other "
                                   "activations).")
    p.add_argument("hf_dir", help="HF model directory")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--max_seq_len", type=int, default=0, help="override max_seq_len (default: max_position_embeddings)")
    common(p)
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("import-nano-llada", help="Nano-LLaDA / minimind .pt state dict -> consolidated",
                       description="Import a Nano-LLaDA diffusion Model state dict (token_emb, blocks.N.attn.c_q, "
                                   "...) or a minimind MiniMindForCausalLM state dict (HF names, optional "
                                   "q_norm/k_norm, tied head). Shapes are read from the tensors; the flags give what "
                                   "a state dict does not record.")
    p.add_argument("pt_file", help="torch .pt file: a state dict or {'model_state_dict'|'state_dict'|'model': ...}")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--arch", default="auto", choices=["auto", "nano-llada", "minimind"],
                   help="source architecture (default: detect from key names)")
    p.add_argument("--num_heads", type=int, default=8, help="attention heads (not in the state dict; default 8)")
    p.add_argument("--rope_theta", type=float, default=1e6, help="RoPE base (both repos default to 1e6)")
    p.add_argument("--norm_eps", type=float, default=1e-5,
                   help="RMSNorm eps (Nano-LLaDA 1e-5; recent minimind 1e-6; default 1e-5)")
    p.add_argument("--max_seq_len", type=int, default=512, help="max_seq_len to record (default 512)")
    p.add_argument("--mask_token_id", type=int, default=None,
                   help="mask token id (default for nano-llada with vocab 6401: 6400)")
    p.add_argument("--causal", default="auto", choices=["auto", "true", "false"],
                   help="override causal (default: nano-llada false, minimind true)")
    p.add_argument("--hidden_act", default="silu", help="the source MLP activation; only silu is supported")
    p.add_argument("--rope_scaling", default="auto", choices=["auto", "none", "yarn"],
                   help="whether the source used YaRN (--inference-rope-scaling); auto (default): the "
                        "inference_rope_scaling recorded in the .pt's 'args' (Nano-LLaDA saves them), else none")
    p.add_argument("--rope_factor", type=float, default=16.0, help="YaRN factor (both repos use 16)")
    p.add_argument("--original_max_position_embeddings", type=int, default=2048,
                   help="YaRN original context length (both repos use 2048)")
    p.add_argument("--rope_beta_fast", type=float, default=32.0, help="YaRN beta_fast (default 32)")
    p.add_argument("--rope_beta_slow", type=float, default=1.0, help="YaRN beta_slow (default 1)")
    p.add_argument("--rope_attention_factor", type=float, default=1.0,
                   help="YaRN cos/sin scale (both repos use 1.0; nano-llada accepts only 1.0)")
    p.add_argument("--source_max_position_embeddings", type=int, default=None,
                   help="rows of the source's RoPE table; YaRN applies only above original_max_position_embeddings "
                        "(default: from the .pt's args, Nano-LLaDA max(max_position_embeddings, 2*seq_len); "
                        "else 32768)")
    common(p, dtype_default="fp32")
    p.set_defaults(func=cmd_import_nano)

    p = sub.add_parser("ar-to-diffusion", help="AR model -> LLaDA mask predictor",
                       description="Add the mask token (grow embedding/head rows via llada_scale.model.resize_vocab "
                                   "when it is outside the vocabulary), record mask_token_id and causal=false.")
    p.add_argument("source", help="tag dir, consolidated dir or .safetensors file of an AR model")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--mask_token_id", type=int, default=None,
                   help="mask token id (default: the recorded tokenizer's mask_token_id)")
    p.add_argument("--vocab_multiple", type=int, default=64, help="round a grown vocabulary up to this (default 64)")
    p.add_argument("--reset_head_row", action="store_true",
                   help="reset the mask token's embedding and head rows to the mean row even if they exist")
    common(p, dtype_default="fp32")
    p.set_defaults(func=cmd_ar_to_diffusion)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        msg = str(e).strip("'\"")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
