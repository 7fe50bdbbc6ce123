"""Import Nano-LLaDA (diffusion and AR) and minimind (AR) ``.pt`` state dicts into the consolidated format.

Never guessed: shapes are read from the tensors; the constants that tensors cannot fix (head count, RoPE base,
RMSNorm eps, YaRN, bidirectional or causal attention) come from the ``args`` Nano-LLaDA's trainers save in their
checkpoints (``{"model_state_dict": ..., "args": vars(args)}``, see :func:`recorded_settings`), else from the
arguments of :func:`import_nano_llada` (the ``import-nano-llada`` subcommand of ``tools/convert_checkpoint.py``),
which are then required. A flag that contradicts the record is refused with both values.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from llada_scale.checkpoint.convert import _log, _prepare_out, _tokenizer_identity, _warn, write_consolidated
from llada_scale.checkpoint.files import CheckpointError, copy_tokenizer_files
from llada_scale.checkpoint.streaming import staged_output
from llada_scale.checkpoint.weights import check_state_dict
from llada_scale.model.transformer import ModelConfig

__all__ = ["detect_arch", "convert_nano_state", "recorded_settings", "resolve_nano_rope_scaling", "import_nano_llada"]

# Arguments only Nano-LLaDA's diffusion trainers take (scripts/train/diffusion.py, train_sft_diffusion.py). Its AR
# trainers (train_pretrain.py, train_sft_minimind.py) save the same tensor names and a 6401-row vocabulary, so
# the saved args are the only record of which attention a checkpoint was trained with.
_DIFFUSION_ARGS = ("iid_mask_eps", "mask_schedule", "init_from_minimind")


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


def _rope_buffer(key: str) -> bool:
    """A RoPE table some trainers save with the weights (not a weight: dropped on import)."""
    return key in ("freqs_cos", "freqs_sin", "cos", "sin") or key.endswith(("freqs_cos", "freqs_sin"))


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
    recorded as is: both repos compute YaRN like ``llada_scale.model.rope.rope_inv_freq``.

    Raises:
        CheckpointError: missing/odd keys (named), head count not dividing the width, bad mask id, invalid
            rope_scaling.
    """
    sd = {k: v.float() for k, v in sd.items() if not _rope_buffer(k)}
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
    check_state_dict(out, mc, source=f"{arch} state dict")
    return out, mc


# minimind MiniMindConfig / Nano-LLaDA diffusion.py: the RoPE table length when not recorded
_SOURCE_TABLE_LEN = 32768


def nano_sft_heads(hidden: int) -> int:
    """The head count Nano-LLaDA's ``train_sft_diffusion.py`` gives a model it initialises from a checkpoint
    (``infer_hparams_from_state_dict``, which ignores ``--num-attention-heads``): the first of 16, 12, 10, 8, 6,
    4, 2, 1, 32, 24 dividing ``hidden`` into heads of 32-128 dims (hidden 512 -> 16), else 8 or 1."""
    for cand in (16, 12, 10, 8, 6, 4, 2, 1, 32, 24):
        if hidden % cand == 0 and hidden // cand in (32, 48, 64, 80, 96, 128):
            return cand
    return 8 if hidden % 8 == 0 else 1


def recorded_settings(record: dict | None, hidden: int) -> dict:
    """The model constants a Nano-LLaDA checkpoint's saved ``args`` fix (keys present only when recorded).

    ``num_heads`` (``num_attention_heads``; for ``train_sft_diffusion.py`` runs started from a checkpoint
    (``load_from``), :func:`nano_sft_heads` instead, which is what that trainer used), ``rope_theta``,
    ``norm_eps`` (``rms_norm_eps``), ``hidden_act``, ``causal`` (False when the args are a diffusion trainer's,
    see :data:`_DIFFUSION_ARGS`; True for the AR trainers', which take ``--lr`` (train_pretrain.py) or
    ``--accumulation-steps`` without diffusion arguments (train_sft_minimind.py); absent otherwise),
    ``max_seq_len`` (``seq_len`` / ``max_seq_len``), and ``source`` (a short description for messages).
    """
    if not isinstance(record, dict) or not record:
        return {}
    out: dict = {}
    diffusion = any(k in record for k in _DIFFUSION_ARGS)
    sft_diffusion = diffusion and "final_decay_ratio" in record  # train_sft_diffusion.py
    if sft_diffusion and record.get("load_from"):
        out["num_heads"] = nano_sft_heads(hidden)
    elif record.get("num_attention_heads") is not None:
        out["num_heads"] = int(record["num_attention_heads"])
    for key, ours, cast in (("rope_theta", "rope_theta", float), ("rms_norm_eps", "norm_eps", float),
                            ("hidden_act", "hidden_act", str)):
        if record.get(key) is not None:
            out[ours] = cast(record[key])
    length = record.get("seq_len") or record.get("max_seq_len")
    if length:
        out["max_seq_len"] = int(length)
    ar = not diffusion and ("lr" in record or "accumulation_steps" in record)
    if diffusion or ar:
        out["causal"] = ar
    kind = "diffusion SFT" if sft_diffusion else "diffusion" if diffusion else "AR" if ar else "(unknown)"
    out["source"] = f"Nano-LLaDA {kind} trainer args saved in the file"
    return out


def resolve_nano_rope_scaling(args, recorded: dict | None, arch: str) -> dict | None:
    """The ``ModelConfig.rope_scaling`` of a Nano-LLaDA / minimind checkpoint (None = plain RoPE).

    ``args`` holds the rope options of :func:`import_nano_llada` (``rope_scaling``, ``rope_factor``,
    ``original_max_position_embeddings``, ``rope_beta_fast``, ``rope_beta_slow``, ``rope_attention_factor``,
    ``source_max_position_embeddings``).

    ``--rope_scaling auto`` reads ``inference_rope_scaling`` from the argparse namespace Nano-LLaDA saves in its
    checkpoints (``{"model_state_dict": ..., "args": vars(args)}``); without a record the flag is required, and a
    flag contradicting the record is refused. Both repos build
    ``{"factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1,
    "attention_factor": 1.0}`` (the --rope_* defaults here) and apply it only when their RoPE table is longer than
    original_max_position_embeddings: minimind's table has ``max_position_embeddings`` rows, Nano-LLaDA's
    ``max(max_position_embeddings, 2 * seq_len)`` (from the record, else --source_max_position_embeddings,
    default 32768); a shorter table gives plain RoPE, as in the source.

    Raises:
        CheckpointError: ``auto`` without a record, a flag contradicting the record, nano-llada with
            attention_factor != 1 (its QK-norm comes after RoPE and cancels the cos/sin scale; ours comes before,
            so that would not be exact).
    """
    recorded = recorded if isinstance(recorded, dict) else {}
    said = recorded.get("inference_rope_scaling")
    mode = args.rope_scaling
    if mode == "auto":
        if said is None:
            raise CheckpointError("the file records no inference_rope_scaling (no Nano-LLaDA 'args'): pass "
                                  "--rope_scaling none (plain RoPE) or yarn (the source ran with "
                                  "--inference-rope-scaling)")
        mode = "yarn" if said else "none"
    elif said is not None and bool(said) != (mode == "yarn"):
        raise CheckpointError(f"--rope_scaling {mode} contradicts the checkpoint's recorded "
                              f"inference_rope_scaling={said}; drop the flag")
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


def _settle(name: str, flag, recorded: dict, key: str, required: str):
    """A constant from the flag and/or the record: equal or one of them; contradicting -> refuse; neither ->
    refuse with ``required`` (how to find the value)."""
    have = key in recorded
    if flag is not None and have and flag != recorded[key]:
        raise CheckpointError(f"{name} {flag} contradicts the checkpoint's recorded {key}={recorded[key]} "
                              f"({recorded.get('source')}); drop the flag")
    if flag is not None:
        return flag
    if have:
        return recorded[key]
    raise CheckpointError(f"the file records no {key} (no Nano-LLaDA 'args' in it) and the tensors cannot tell it: "
                          f"pass {name} ({required})")


def import_nano_llada(pt_file: str, out_dir: str, *, arch: str = "auto", num_heads: int | None = None,
                      rope_theta: float | None = None, norm_eps: float | None = None, max_seq_len: int | None = None,
                      mask_token_id: int | None = None, causal: str = "auto", hidden_act: str | None = None,
                      rope_scaling: str = "auto", rope_factor: float = 16.0,
                      original_max_position_embeddings: int = 2048, rope_beta_fast: float = 32.0,
                      rope_beta_slow: float = 1.0, rope_attention_factor: float = 1.0,
                      source_max_position_embeddings: int | None = None, dtype: str = "auto",
                      max_shard_size: str = "5GB", force: bool = False, quiet: bool = False,
                      tokenizer: str | None = None) -> None:
    """Import a Nano-LLaDA diffusion or AR model, or a minimind ``MiniMindForCausalLM`` state dict.

    ``arch``: ``auto`` (:func:`detect_arch`), ``nano-llada`` or ``minimind``. Each of ``num_heads``,
    ``rope_theta``, ``norm_eps``, ``hidden_act``, ``causal`` (``auto``/``true``/``false``) and ``rope_scaling``
    comes from the file's record (:func:`recorded_settings`; minimind's q_norm fixes the head count; the minimind
    layout is causal) or from the argument; without either it is refused, and an argument that contradicts the
    record is refused. ``max_seq_len``: argument, else the recorded training length, else 512. The rope options
    are described in :func:`resolve_nano_rope_scaling`, the mapping in :func:`convert_nano_state`.
    ``dtype="auto"`` writes the dtype of the file's weights (fp32 when they mix dtypes); the one derived tensor,
    Nano-LLaDA's normalised embedding, is computed in fp64 and rounded once to it.

    Raises:
        CheckpointError: missing or unreadable file, unknown layout, a constant neither recorded nor given, a
            flag contradicting the record, options that do not fit the tensors.
    """
    if not os.path.isfile(pt_file):
        raise CheckpointError(f"{pt_file} does not exist")
    _prepare_out(out_dir, force, (pt_file,))
    try:
        obj = torch.load(pt_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {pt_file} as a weights-only torch file: {e}") from None
    sd = _unwrap_pt(obj, pt_file)
    stored = {v.dtype for k, v in sd.items() if v.is_floating_point() and not _rope_buffer(k)}
    arch = detect_arch(sd) if arch == "auto" else arch
    args_record = obj.get("args") if isinstance(obj, dict) else None
    emb = sd.get("token_emb.weight", sd.get("model.embed_tokens.weight"))
    rec = recorded_settings(args_record, int(emb.shape[1]) if emb is not None else 0)
    if arch == "minimind":
        rec.setdefault("causal", True)  # MiniMindForCausalLM: the layout itself is the AR model
        rec.setdefault("source", "minimind layout")
        qn, q = sd.get("model.layers.0.self_attn.q_norm.weight"), sd.get("model.layers.0.self_attn.q_proj.weight")
        if qn is not None and q is not None:
            rec["num_heads"] = q.shape[0] // qn.shape[0]
            rec["source"] = "q_norm / q_proj shapes"
    causal_flag = {"auto": None, "true": True, "false": False}[causal]
    heads = _settle("--num_heads", num_heads, rec, "num_heads",
                    "Nano-LLaDA pretraining default 8; its diffusion SFT of a hidden-512 model uses 16")
    theta = _settle("--rope_theta", None if rope_theta is None else float(rope_theta), rec, "rope_theta",
                    "Nano-LLaDA and minimind default 1e6")
    eps = _settle("--norm_eps", None if norm_eps is None else float(norm_eps), rec, "norm_eps",
                  "Nano-LLaDA 1e-5, recent minimind 1e-6")
    act = _settle("--hidden_act", hidden_act, rec, "hidden_act", "both repos default to silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act}: only silu (SwiGLU) maps onto our MLP")
    is_causal = _settle("--causal", causal_flag, rec, "causal",
                        "true for Nano-LLaDA's AR trainers train_pretrain.py / train_sft_minimind.py, false for "
                        "its diffusion models")
    seq = max_seq_len if max_seq_len is not None else rec.get("max_seq_len", 512)
    rope_opts = SimpleNamespace(rope_scaling=rope_scaling, rope_factor=rope_factor,
                                original_max_position_embeddings=original_max_position_embeddings,
                                rope_beta_fast=rope_beta_fast, rope_beta_slow=rope_beta_slow,
                                rope_attention_factor=rope_attention_factor,
                                source_max_position_embeddings=source_max_position_embeddings)
    scaling = resolve_nano_rope_scaling(rope_opts, args_record, arch)
    sd, mc = convert_nano_state(sd, arch, num_heads=heads, rope_theta=theta, norm_eps=eps,
                                max_seq_len=seq, mask_token_id=mask_token_id, causal=is_causal,
                                rope_scaling=scaling)
    with staged_output(out_dir, force, inputs=(pt_file,)) as tmp:
        tok = None
        if tokenizer:
            tok = _tokenizer_identity(tokenizer)
            copy_tokenizer_files(tokenizer, tmp)
        _log(f"detected {arch} ({rec.get('source', 'no record: flags')}): {mc.num_layers} layers, hidden "
             f"{mc.hidden_size}, heads {mc.num_heads}/{mc.num_kv_heads}, vocab {mc.vocab_size}, rope_theta "
             f"{mc.rope_theta}, norm_eps {mc.norm_eps}, qk_norm={mc.qk_norm}, norm_weight={mc.norm_weight}, "
             f"causal={mc.causal}, rope_scaling={mc.rope_scaling}")
        write_consolidated(sd, mc, tmp, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tok,
                           source={"path": os.path.abspath(pt_file), "kind": arch}, progress=not quiet,
                           source_dtypes=stored)
