"""Checkpoint conversion between formats, as Python functions (``tools/convert_checkpoint.py`` is the CLI).

=================  ==========================================================================================
function           what it writes
=================  ==========================================================================================
consolidate        DeepSpeed tag dir (ZeRO 0-3, any world size) -> our consolidated format + tokenizer files
export_hf          our model -> HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` directory
import_hf          local HF Llama / Mistral / Qwen2 / Qwen2.5 / Qwen3 directory -> consolidated (streamed)
ar_to_diffusion    AR model -> LLaDA mask predictor (adds the mask-token rows, ``causal=false``)
=================  ==========================================================================================

(Nano-LLaDA / minimind ``.pt`` import: :mod:`llada_scale.checkpoint.nano_llada`; LLaDA's released format in and
out: :mod:`llada_scale.checkpoint.llada`; merging LoRA adapters: ``merge_lora_checkpoint`` in
:mod:`llada_scale.training.lora`.)

The consolidated format: ``config.json`` = ``{"format": "llada_scale", "format_version": 1, "model":
ModelConfig dict, "tokenizer": identity | null, "step", "run_config", "source", "dtype"}`` next to
``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above
``max_shard_size``). Every file is written under a temporary name and moved into place (os.replace). Every
function raises :class:`llada_scale.checkpoint.files.CheckpointError` with one line on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import torch

from llada_scale.checkpoint.files import (FORMAT, CheckpointError, atomic_write_text, copy_tokenizer_files,
                                          dtype_name, parse_dtype, read_json, resolve_dtype, save_safetensors)
from llada_scale.checkpoint.streaming import check_output_dir, scan_weights, staged_output, stream_convert
from llada_scale.checkpoint.hf import hf_config_from_model_config, model_config_from_hf
from llada_scale.checkpoint.weights import (check_state_dict, expected_shapes, load_model_state,
                                            model_config_from_meta, resolve_checkpoint, tokenizer_path_from_meta)
from llada_scale.model.transformer import ModelConfig, resize_vocab

__all__ = ["FORMAT_VERSION", "consolidated_config", "write_consolidated", "consolidate", "export_hf", "import_hf",
           "check_tokenizer_vocab", "ar_to_diffusion", "ar_to_diffusion_state"]

FORMAT_VERSION = 1


def _log(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _prepare_out(out_dir: str, force: bool, inputs: tuple = ()) -> None:
    check_output_dir(out_dir, force, inputs)
    os.makedirs(out_dir, exist_ok=True)


def _tokenizer_identity(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        from llada_scale.data.tokenizer import Tokenizer

        return Tokenizer.load(path).identity()
    except Exception as e:  # noqa: BLE001 - tokenizer is optional metadata here
        _warn(f"could not load tokenizer {path}: {e}")
        return None


def _copy_tokenizer(meta: dict, out_dir: str, override: str | None) -> dict | None:
    """Copy tokenizer files into out_dir; return the identity to record (None when there is none)."""
    ident = meta.get("tokenizer")
    src = override or tokenizer_path_from_meta(meta)
    if override:
        ident = _tokenizer_identity(override) or ident
    if not src:
        where = (ident or {}).get("path") if isinstance(ident, dict) else None
        _warn("no tokenizer copied" + (f" (recorded path {where} does not exist)" if where else
                                        " (the checkpoint records none)") + "; pass --tokenizer PATH")
        return ident
    copied = copy_tokenizer_files(src, out_dir)
    if copied:
        _log(f"copied tokenizer files {copied} from {src}")
    return ident


def _write_tokenizer(tok_src: str, out_dir: str, mask_token: str) -> None:
    """Copy tokenizer files and record ``mask_token`` in ``tokenizer_config.json`` (HF's field), so that both
    :class:`llada_scale.data.tokenizer.Tokenizer` and ``AutoTokenizer`` use the model's own mask token."""
    copy_tokenizer_files(tok_src, out_dir)
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    tc = read_json(tc_path) if os.path.isfile(tc_path) else {}
    if tc.get("mask_token") is None:
        tc["mask_token"] = mask_token
        atomic_write_text(tc_path, json.dumps(tc, indent=2, ensure_ascii=False))


def _import_tokenizer(tok_src: str | None, staging: str, out_dir: str, mask_token: str | None) -> dict | None:
    """Copy a released checkpoint's tokenizer into ``staging`` (see :func:`_write_tokenizer`) and return the identity
    to record, its path under the final ``out_dir``; with no ``tok_src``, warn on stderr and return None."""
    if not tok_src:
        _warn("no tokenizer.json next to the checkpoint; pass --tokenizer PATH to copy one")
        return None
    from llada_scale.data.tokenizer import Tokenizer

    _write_tokenizer(tok_src, staging, mask_token)
    ident = Tokenizer.load(staging).identity()
    ident["path"] = os.path.join(os.path.abspath(out_dir), os.path.basename(ident["path"]))
    return ident


def _export_tokenizer(tok_src: str | None, staging: str, mask_token_id: int):
    """Copy our model's tokenizer into an exported release directory ``staging`` with its mask token recorded
    (:func:`_write_tokenizer`); returns the loaded :class:`llada_scale.data.tokenizer.Tokenizer`, or None after a
    warning on stderr when there is no ``tok_src``.

    Raises:
        CheckpointError: the tokenizer's mask token id is not the model's ``mask_token_id``.
    """
    if not tok_src:
        _warn("no tokenizer recorded; pass --tokenizer PATH to include one")
        return None
    from llada_scale.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_src)
    if tok.mask_token_id != mask_token_id:
        raise CheckpointError(f"tokenizer {tok_src} has mask token id {tok.mask_token_id} but the model "
                              f"{mask_token_id}; pass --tokenizer with the model's tokenizer")
    _write_tokenizer(tok_src, staging, tok.mask_token)
    return tok


def consolidated_config(model_cfg, dtype: str | torch.dtype, tokenizer: dict | None, step=None, run_config=None,
                        source: dict | None = None) -> dict:
    """The ``config.json`` dict of our consolidated format (see the module docstring); ``dtype`` is the one
    written (``"bf16"|"fp32"|"fp16"`` or a torch dtype, not ``"auto"``)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": model_cfg.to_dict(), "tokenizer": tokenizer,
        "step": step, "run_config": run_config, "source": source or {}, "dtype": dtype_name(parse_dtype(dtype)),
    }


def write_consolidated(state_dict: dict, model_cfg, out_dir: str, *, dtype: str, max_shard_size: str,
                       tokenizer: dict | None, step=None, run_config=None, source: dict | None = None,
                       progress: bool = True, source_dtypes=None) -> list[str]:
    """Check ``state_dict`` against ``model_cfg`` and write our consolidated format into ``out_dir``.

    ``dtype``: ``"auto"`` writes the source's dtype (:func:`llada_scale.checkpoint.files.resolve_dtype`):
    ``source_dtypes`` when given (the stored dtypes of a source that was upcast on loading, ``meta["dtypes"]``
    of :func:`load_model_state`), else the dtypes of ``state_dict``. The printed line names the dtype written and
    where it came from.

    Raises:
        CheckpointError: keys/shapes do not fit the config (message names them), bad dtype/size.
    """
    check_state_dict(state_dict, model_cfg, source=(source or {}).get("path", "checkpoint"))
    if source_dtypes is None:
        source_dtypes = {v.dtype for v in state_dict.values() if torch.is_tensor(v)}
    dt, origin = resolve_dtype(dtype, source_dtypes)
    config = consolidated_config(model_cfg, dt, tokenizer, step, run_config, source)
    files = save_safetensors(state_dict, out_dir, config, max_shard_size, dt, progress=progress)
    n = sum(v.numel() for v in state_dict.values())
    _log(f"wrote {out_dir}: {len(files)} weight file(s), {n / 1e6:.2f}M parameters, dtype {origin}")
    return files

# ------------------------------------------------------------------------------------------------ commands
def consolidate(checkpoint: str, out_dir: str, *, dtype: str = "auto", max_shard_size: str = "5GB",
                force: bool = False, quiet: bool = False, tokenizer: str | None = None,
                any_source: bool = False) -> None:
    """Merge a DeepSpeed checkpoint (any ZeRO stage, any number of ranks) into the consolidated format.

    ``checkpoint``: a tag directory, or a checkpoints/ or run directory resolved through ``latest``.
    ``any_source`` also accepts consolidated / HF sources (re-shard or re-type them). ``tokenizer`` overrides
    the tokenizer the checkpoint names. ``dtype="auto"`` keeps the stored dtype: fp32 for DeepSpeed's master
    weights (bit-exact), the tensors' dtype for other sources.

    Raises:
        CheckpointError: not a DeepSpeed checkpoint (without ``any_source``), a non-empty ``out_dir`` without
            ``force``, weights that do not fit the recorded config.
    """
    kind, resolved = resolve_checkpoint(checkpoint)
    if kind != "deepspeed" and not any_source:
        raise CheckpointError(f"{checkpoint} is a {kind} checkpoint, not a DeepSpeed tag directory "
                              "(pass --any_source to re-consolidate it anyway)")
    with staged_output(out_dir, force, inputs=(checkpoint, resolved)) as tmp:
        sd, meta = load_model_state(resolved, progress=not quiet)
        cfg = model_config_from_meta(meta, resolved)
        tok = _copy_tokenizer(meta, tmp, tokenizer)
        source = {"path": resolved, "kind": meta["format"], "zero_stage": meta.get("zero_stage"),
                  "world_size": meta.get("world_size")}
        write_consolidated(sd, cfg, tmp, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tok,
                           step=meta.get("step"), run_config=meta.get("config"), source=source, progress=not quiet,
                           source_dtypes=meta["dtypes"])


def export_hf(source: str, out_dir: str, *, dtype: str = "auto", max_shard_size: str = "5GB", force: bool = False,
              quiet: bool = False, tokenizer: str | None = None) -> None:
    """Write ``config.json`` (LlamaConfig) + safetensors loadable by ``transformers.LlamaForCausalLM``.

    Key names are unchanged. Diffusion models record ``mask_token_id`` and ``llada_scale.causal=false``.
    ``dtype="auto"`` keeps the source's stored dtype (:func:`llada_scale.checkpoint.files.resolve_dtype`).

    Raises:
        CheckpointError: QK-norm / weightless-norm models (HF Llama cannot represent them), a non-empty
            ``out_dir`` without ``force``.
    """
    with staged_output(out_dir, force, inputs=(source,)) as tmp:
        sd, meta = load_model_state(source, progress=not quiet)
        cfg = model_config_from_meta(meta, meta["path"])
        dt, origin = resolve_dtype(dtype, meta["dtypes"])
        hf = hf_config_from_model_config(cfg.to_dict(), torch_dtype=str(dt).replace("torch.", ""))
        check_state_dict(sd, cfg, meta["path"])
        tok = meta.get("tokenizer") or {}
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(tok, dict) and tok.get(key) is not None:
                hf[key] = tok[key]
        _copy_tokenizer(meta, tmp, tokenizer)
        files = save_safetensors(sd, tmp, None, max_shard_size, dt, progress=not quiet, metadata={"format": "pt"})
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(hf, indent=2, sort_keys=True))
        gen = {"_from_model_config": True, **{k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                              if k in hf}}
        atomic_write_text(os.path.join(tmp, "generation_config.json"), json.dumps(gen, indent=2))
    kind = "diffusion (causal=false, load with the causal mask removed; see docs/EVAL.md)" if not cfg.causal else "AR"
    _log(f"wrote HF {hf['architectures'][0]} {kind} to {out_dir}: {len(files)} weight file(s), dtype {origin}")


def check_tokenizer_vocab(tok_src: str, rows: int, source: str):
    """Refuse a tokenizer with more tokens (added tokens included) than the model has embedding rows.

    Returns the loaded ``tokenizers.Tokenizer``, or None for a SentencePiece model (its size is checked when
    training starts).

    Raises:
        CheckpointError: an unreadable ``tokenizer.json``, or naming both sizes.
    """
    from tokenizers import Tokenizer as HFTokenizer

    path = os.path.join(tok_src, "tokenizer.json") if os.path.isdir(tok_src) else tok_src
    if not path.endswith(".json"):
        return None
    try:
        hf = HFTokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
        raise CheckpointError(f"{path}: not a valid tokenizers file ({e})") from None
    n = hf.get_vocab_size(with_added_tokens=True)
    if n > rows:
        raise CheckpointError(f"{path} has {n} tokens but {source} has {rows} embedding rows; the tokenizer is not "
                              "this model's (pass --tokenizer with the right one)")
    return hf


def import_hf(hf_dir: str, out_dir: str, *, dtype: str = "auto", max_shard_size: str = "5GB", force: bool = False,
              quiet: bool = False, tokenizer: str | None = None, max_seq_len: int = 0) -> None:
    """Read a local Hugging Face Llama / Mistral / Qwen2 / Qwen2.5 / Qwen3 directory and write our consolidated
    format, one shard at a time (:func:`llada_scale.checkpoint.streaming.stream_convert`).

    ``max_seq_len`` > 0 overrides the recorded ``max_position_embeddings``. ``tokenizer`` defaults to the
    directory's own ``tokenizer.json`` (copied with ``tokenizer_config.json`` / ``chat_template.jinja``, so SFT
    renders prompts with the model's own chat template). Every key, shape and the tokenizer's size are checked
    before anything is written; the output appears complete or not at all. ``dtype="auto"`` keeps the dtype of
    the stored tensors (:func:`llada_scale.checkpoint.files.resolve_dtype`; a mix of dtypes gives fp32).

    Raises:
        CheckpointError: not an HF directory, an unsupported model type or feature (see
            :func:`llada_scale.checkpoint.hf.model_config_from_hf`; the message lists what is supported), a
            missing shard, a tensor of the wrong shape, a tokenizer larger than the embedding.
    """
    kind, resolved = resolve_checkpoint(hf_dir)
    if kind != "hf":
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory (config.json with model_type)")
    cfg_path = os.path.join(resolved, "config.json")
    try:
        cfg = ModelConfig(**model_config_from_hf(read_json(cfg_path), cfg_path))
    except ValueError as e:
        raise CheckpointError(str(e) if isinstance(e, CheckpointError) else f"{cfg_path}: {e}") from None
    if max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
    tensors = scan_weights(resolved)
    tok_src = tokenizer or (resolved if os.path.isfile(os.path.join(resolved, "tokenizer.json")) else None)
    if tok_src:
        check_tokenizer_vocab(tok_src, cfg.vocab_size, cfg_path)

    def rename(name):
        if name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight"):
            return None
        return name

    dt, origin = resolve_dtype(dtype, (t.dtype for k, t in tensors.items() if rename(k) is not None))
    with staged_output(out_dir, force, inputs=(hf_dir,)) as tmp:
        tok = None
        if tok_src:
            copy_tokenizer_files(tok_src, tmp)
            tok = _tokenizer_identity(tmp)
            if tok:
                tok["path"] = os.path.join(os.path.abspath(out_dir), os.path.basename(tok["path"]))
        config = consolidated_config(cfg, dt, tok, source={"path": resolved, "kind": "hf"})
        files = stream_convert(tensors, rename, expected_shapes(cfg), tmp, dtype=dt, max_shard_size=max_shard_size,
                               metadata={FORMAT: json.dumps(config)}, progress=not quiet, source=resolved)
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2, sort_keys=True))
    n = sum(math.prod(t.shape) for k, t in tensors.items() if rename(k) is not None)
    _log(f"wrote {out_dir}: {len(files)} weight file(s), {n / 1e6:.2f}M parameters, dtype {origin}")


def ar_to_diffusion_state(sd: dict, mc, mask_token_id: int, vocab_multiple: int, reset_head_row: bool):
    """Turn an AR state dict/config into a LLaDA mask predictor. Returns ``(state_dict, ModelConfig)``.

    The vocabulary grows (``llada_scale.model.transformer.resize_vocab``, new rows = mean of the old rows) to the next
    multiple of ``vocab_multiple`` above ``mask_token_id`` when the mask id is outside it; with
    ``reset_head_row`` the mask token's embedding and head rows are (re)set to the mean of all other rows
    even when they exist (an AR model never trained them). ``causal`` becomes False.

    Raises:
        CheckpointError: negative mask id or vocab_multiple < 1.
    """
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


def ar_to_diffusion(source: str, out_dir: str, *, dtype: str = "auto", max_shard_size: str = "5GB",
                    force: bool = False, quiet: bool = False, tokenizer: str | None = None,
                    mask_token_id: int | None = None, vocab_multiple: int = 64, reset_head_row: bool = False) -> None:
    """Turn an AR checkpoint into a LLaDA mask predictor (:func:`ar_to_diffusion_state`) and write it consolidated.

    ``mask_token_id`` defaults to the recorded (or ``tokenizer``'s) mask token id; ``dtype="auto"`` keeps the
    source's stored dtype.

    Raises:
        CheckpointError: no mask token id known, a non-empty ``out_dir`` without ``force``.
    """
    check_output_dir(out_dir, force, (source,))
    sd, meta = load_model_state(source, progress=not quiet)
    mc = model_config_from_meta(meta, meta["path"])
    if not mc.causal:
        _warn(f"{meta['path']} is already a diffusion model (causal=false); converting anyway")
    mask = mask_token_id
    tok_ident = meta.get("tokenizer")
    if tokenizer:
        tok_ident = _tokenizer_identity(tokenizer) or tok_ident
    if mask is None:
        mask = (tok_ident or {}).get("mask_token_id") if isinstance(tok_ident, dict) else None
        if mask is None:
            raise CheckpointError("no mask token id: the checkpoint records no tokenizer; pass --mask_token_id N "
                                  "or --tokenizer PATH")
    sd, mc = ar_to_diffusion_state(sd, mc, mask, vocab_multiple, reset_head_row)
    run_cfg = meta.get("config")
    if isinstance(run_cfg, dict):
        run_cfg = {**run_cfg, "model": mc.to_dict()}
    with staged_output(out_dir, force, inputs=(source,)) as tmp:
        tok = _copy_tokenizer(meta, tmp, tokenizer) if (tokenizer or meta.get("tokenizer")) else None
        write_consolidated(sd, mc, tmp, dtype=dtype, max_shard_size=max_shard_size,
                           tokenizer=tok or tok_ident, step=meta.get("step"), run_config=run_cfg,
                           source={"path": meta["path"], "kind": meta["format"], "converted": "ar-to-diffusion"},
                           progress=not quiet, source_dtypes=meta["dtypes"])
    _log(f"mask_token_id {mask}, vocab {mc.vocab_size}, causal=false")
