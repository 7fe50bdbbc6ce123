"""LLaDA2.x's released checkpoint format (inclusionAI LLaDA2.0/2.1-mini, -flash) in and out.

The format: ``config.json`` with ``model_type: "llada2_moe"`` (dFactory's merged copies say
``"llada2_moe_veomni"``), ``architectures: ["LLaDA2MoeModelLM"]``, sharded safetensors, a tokenizer with a chat
template. Tensor names (release -> ours, :mod:`llada_scale.model.llada2_moe`):

=========================================================  ===============================================
release                                                    ours
=========================================================  ===============================================
``model.word_embeddings.weight``                           ``model.embed_tokens.weight``
``model.layers.N.attention.query_key_value.{weight,bias}`` ``model.layers.N.self_attn.qkv_proj.*``
``model.layers.N.attention.dense.{weight,bias}``           ``model.layers.N.self_attn.o_proj.*``
``model.layers.N.attention.{query,key}_layernorm.weight``  ``model.layers.N.self_attn.{q,k}_norm.weight``
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` ``model.layers.N.mlp.experts.{gate,up,down}_proj``
  (or dFactory's merged ``mlp.experts.{gate,up,down}_proj``)    (stacked over E: [E, out, in])
everything else (norms, ``mlp.gate.weight``, ``mlp.gate.expert_bias``, ``mlp.shared_experts.*``, dense
``mlp.*_proj``, ``model.norm``, ``lm_head``)                  the same name
=========================================================  ===============================================

Config keys are read by :func:`config_from_llada2`: shapes are required, the switches the release code reads must
hold the release's values (sigmoid scores, fp32 router, expert bias on, normalised top-k, RMSNorm, SiLU, no
rope scaling, untied embeddings, no sliding window, zero dropout), keys without effect on the computation are kept
in ``hf_extra`` to be written back, and any other key is refused. The mask token comes from ``config.json``'s
``mask_token_id`` when present, else from the tokenizer's ``mask_token`` (``tokenizer_config.json``), else from
``--mask_token``; nothing is assumed.

Both directions stream: output tensors are produced one at a time (a stacked expert tensor reads that layer's
per-expert tensors, an exported expert is one slice), output shards are written as soon as they are complete,
and every name and shape is checked from the headers first. ``expert_bias`` is always kept in float32 (a
selection bias rounded to bf16 would change routing). The export carries our own ``configuration_llada2_moe.py``
/ ``modeling_llada2_moe.py`` (:mod:`llada_scale.checkpoint.llada2_remote`) so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads offline; import(export(x)) is
bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from typing import Callable

import torch

from llada_scale.checkpoint.convert import _export_tokenizer, _import_tokenizer, consolidated_config
from llada_scale.checkpoint.files import (CONFIG_FILE, FORMAT, SAFE_INDEX, SAFE_SINGLE, CheckpointError,
                                          atomic_save_file, atomic_write_text, parse_dtype, parse_size, read_json,
                                          tokenizer_dir)
from llada_scale.checkpoint.llada import _check_tokenizer
from llada_scale.checkpoint.streaming import TensorInfo, scan_weights, staged_output
from llada_scale.checkpoint.weights import (consolidated_meta, expected_shapes, load_model_state,
                                            model_config_from_meta, resolve_checkpoint, tokenizer_path_from_meta)
from llada_scale.model.llada2_moe import MODEL_TYPE, LLaDA2Config

__all__ = ["config_from_llada2", "llada2_config_from_model_config", "import_llada2", "export_llada2"]

MODEL_TYPES = (MODEL_TYPE, "llada2_moe_veomni")
# release key -> our LLaDA2Config field (shapes and values that change the computation; all required)
_MAPPED = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
           "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
           "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim", "rms_norm_eps": "norm_eps",
           "max_position_embeddings": "max_seq_len", "rope_theta": "rope_theta",
           "partial_rotary_factor": "partial_rotary_factor", "first_k_dense_replace": "first_k_dense_replace",
           "moe_intermediate_size": "moe_intermediate_size", "num_experts": "num_experts",
           "num_shared_experts": "num_shared_experts", "num_experts_per_tok": "num_experts_per_tok",
           "n_group": "n_group", "topk_group": "topk_group", "routed_scaling_factor": "routed_scaling_factor",
           "use_qkv_bias": "attention_bias", "use_bias": "output_bias"}
# switches: the values the release (and our model) implement; the first is the release class's default, used
# when the key is absent (the release's configuration_llada2_moe.py defines it so)
_FIXED = {"hidden_act": ("silu",), "use_qk_norm": (True,), "norm_head": (False,), "tie_word_embeddings": (False,),
          "rope_scaling": (None,), "use_sliding_window": (False,), "score_function": ("sigmoid",),
          "router_dtype": ("fp32",), "moe_router_enable_expert_bias": (True,), "norm_topk_prob": (True,),
          "use_rmsnorm": (True,), "norm_softmax": (False,), "using_split_qkv_in_self_attention": (False,),
          "attention_dropout": (0.0,), "embedding_dropout": (0.0,), "output_dropout": (0.0,)}
# no effect on the computation: kept verbatim for export
_PASSTHROUGH = ("transformers_version", "use_cache", "max_window_layers", "sliding_window", "output_router_logits",
                "bos_token_id", "eos_token_id", "torch_dtype", "dtype", "rotary_dim", "initializer_range",
                "pad_token_id", "mask_token_id", "model_type", "architectures", "auto_map", "_name_or_path")
_REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llada2_remote")
_REMOTE_FILES = ("configuration_llada2_moe.py", "modeling_llada2_moe.py")
_AUTO_MAP = {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
             "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
             "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}
_ATTN = {"attention.query_key_value": "self_attn.qkv_proj", "attention.dense": "self_attn.o_proj",
         "attention.query_layernorm": "self_attn.q_norm", "attention.key_layernorm": "self_attn.k_norm"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}
_PROJS = ("gate_proj", "up_proj", "down_proj")


def config_from_llada2(cfg: dict, source: str = "config.json", mask_token_id: int | None = None) -> LLaDA2Config:
    """The :class:`LLaDA2Config` of a release ``config.json`` dict.

    Raises:
        CheckpointError: another model_type, a missing shape key, a switch with a value the release code does
            not compute (e.g. ``score_function: softmax``), an unknown key, inconsistent values (one line each).
    """
    if cfg.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not a LLaDA2 MoE config "
                              f"({' / '.join(MODEL_TYPES)}); for LLaDA-8B use import-llada, for Llama/Qwen import-hf")
    unknown = sorted(set(cfg) - set(_MAPPED) - set(_FIXED) - set(_PASSTHROUGH))
    if unknown:
        raise CheckpointError(f"{source}: unknown key(s) {unknown}: a LLaDA2 variant llada_scale does not know; "
                              "nothing is guessed")
    missing = [k for k in _MAPPED if k not in cfg]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing}")
    for key, allowed in _FIXED.items():
        if cfg.get(key, allowed[0]) not in allowed:
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is a variant outside the LLaDA2 release "
                                  f"(supported: {allowed[0]!r})")
    fields = {ours: cfg[key] for key, ours in _MAPPED.items()}
    if not fields["num_kv_heads"]:  # 0: the release's "same as num_attention_heads"
        fields["num_kv_heads"] = fields["num_heads"]
    mask = cfg.get("mask_token_id", mask_token_id)
    extra = {k: cfg[k] for k in _PASSTHROUGH if k in cfg and k not in ("mask_token_id",)}
    try:
        mc = LLaDA2Config(**fields, init_std=float(cfg.get("initializer_range", 0.02)), mask_token_id=mask,
                          pad_token_id=cfg.get("pad_token_id"), hf_extra=extra)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    if "rotary_dim" in cfg and cfg["rotary_dim"] != mc.rotary_dim:
        raise CheckpointError(f"{source}: rotary_dim {cfg['rotary_dim']} != head_dim x partial_rotary_factor "
                              f"({mc.rotary_dim}); the release rotates int(head_dim x partial_rotary_factor) dims")
    return mc


def llada2_config_from_model_config(mc, torch_dtype: str) -> dict:
    """Our :class:`LLaDA2Config` -> the release's ``config.json`` dict (``auto_map`` to our remote code).

    Raises:
        CheckpointError: not a LLaDA2 model (export-llada / export-hf write dense ones), or no mask token.
    """
    if not isinstance(mc, LLaDA2Config):
        raise CheckpointError("export-llada2 writes LLaDA2 MoE models; this checkpoint is a dense model "
                              "(use export-llada or export-hf)")
    if mc.mask_token_id is None:
        raise CheckpointError("the model records no mask_token_id; LLaDA2's format needs one")
    out = {key: getattr(mc, ours) for key, ours in _MAPPED.items()}
    out |= {k: v[0] for k, v in _FIXED.items()}
    out |= {k: v for k, v in mc.hf_extra.items()}
    out |= {"model_type": MODEL_TYPE, "architectures": ["LLaDA2MoeModelLM"], "auto_map": dict(_AUTO_MAP),
            "torch_dtype": torch_dtype, "rotary_dim": mc.rotary_dim, "initializer_range": mc.init_std,
            "pad_token_id": mc.pad_token_id, "mask_token_id": mc.mask_token_id}
    out.pop("dtype", None)
    return out


def _split_name(name: str):
    """Release name -> (our name, expert index or None); names outside the format are returned unchanged."""
    if name == "model.word_embeddings.weight":
        return "model.embed_tokens.weight", None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return name, None
    layer, rest = m.groups()
    for theirs, ours in _ATTN.items():
        if rest.startswith(theirs + "."):
            return f"model.layers.{layer}.{ours}{rest[len(theirs):]}", None
    e = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", rest)
    if e:
        return f"model.layers.{layer}.mlp.experts.{e.group(2)}", int(e.group(1))
    return name, None


def release_name(ours: str) -> str:
    """Our name -> the release's (per-expert names are made by the caller)."""
    if ours == "model.embed_tokens.weight":
        return "model.word_embeddings.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn\.\w+)\.(.+)", ours)
    if m and m.group(2) in _ATTN_BACK:
        return f"model.layers.{m.group(1)}.{_ATTN_BACK[m.group(2)]}.{m.group(3)}"
    return ours


class _Reader:
    """Reads source tensors by name, keeping each file open once (safetensors handles / mmapped .bin dicts)."""

    def __init__(self, tensors: dict[str, TensorInfo], stack: contextlib.ExitStack):
        self.tensors, self.stack, self.open = tensors, stack, {}

    def __call__(self, name: str) -> torch.Tensor:
        f = self.tensors[name].file
        if f not in self.open:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                self.open[f] = self.stack.enter_context(safe_open(f, framework="pt", device="cpu"))
            else:
                self.open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        h = self.open[f]
        return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]


def _write_streamed(items: list[tuple[str, tuple, torch.dtype, Callable[[], torch.Tensor]]], out_dir: str,
                    max_shard_size, metadata: dict | None) -> list[str]:
    """Write ``(name, shape, dtype, produce)`` items as HF-style shards in list order, producing one tensor at a
    time and holding at most one shard; returns the file names (+ index when sharded)."""
    from tqdm.auto import tqdm

    limit = parse_size(max_shard_size)
    plan, size = [[]], 0
    for it in items:
        b = math.prod(it[1]) * torch.empty((), dtype=it[2]).element_size()
        if plan[-1] and size + b > limit:
            plan.append([])
            size = 0
        plan[-1].append(it)
        size += b
    n = len(plan)
    files = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    header = {**(metadata or {}), "format": "pt"}
    weight_map, total = {}, 0
    for f, shard in tqdm(list(zip(files, plan)), desc=f"writing {out_dir}", unit="shard", leave=False,
                         disable=n == 1):
        buffer = {}
        for name, shape, dt, produce in shard:
            t = produce().to(dt).contiguous()
            assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            buffer[name] = t
            weight_map[name] = f
            total += t.numel() * t.element_size()
        atomic_save_file(buffer, os.path.join(out_dir, f), header)
    if n > 1:
        atomic_write_text(os.path.join(out_dir, SAFE_INDEX), json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    return files


def _out_dtype(name: str, src_dtype: torch.dtype, dt: torch.dtype | None) -> torch.dtype:
    if name.endswith("expert_bias"):
        return torch.float32
    return dt if dt is not None and src_dtype.is_floating_point else src_dtype


def _source_dtype(cfg: dict, tensors: dict[str, TensorInfo], source: str) -> str:
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    if name:
        return name
    kinds = {t.dtype for k, t in tensors.items() if not k.endswith("expert_bias")}
    if len(kinds) != 1:
        raise CheckpointError(f"{source}: no torch_dtype in config.json and the weights mix {sorted(map(str, kinds))}; "
                              "pass --dtype")
    return str(kinds.pop()).replace("torch.", "")


def import_llada2(hf_dir: str, out_dir: str, *, dtype: str | None = None, max_shard_size: str = "5GB",
                  force: bool = False, quiet: bool = False, tokenizer: str | None = None,
                  mask_token: str | None = None, max_seq_len: int = 0) -> None:
    """Read a LLaDA2 release directory (per-expert or dFactory merged experts) and write our consolidated format.

    ``dtype`` None = the source's (``torch_dtype``); ``mask_token`` (a token string) only when neither config.json
    nor the tokenizer names one.

    Raises:
        CheckpointError: see :func:`config_from_llada2`; a missing / unexpected / misshapen tensor or a missing
            expert; no mask token; a tokenizer that does not fit; a non-empty ``out_dir`` without ``force``.
    """
    hf_dir = os.path.abspath(hf_dir)
    cfg_path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{hf_dir} has no {CONFIG_FILE}; expected a LLaDA2 checkpoint directory")
    raw = read_json(cfg_path)
    tok_src = tokenizer or (hf_dir if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None)
    tok_dir = None if tok_src is None else tokenizer_dir(tok_src)
    mask_id = _mask_from_tokenizer(tok_dir, mask_token, cfg_path) if "mask_token_id" not in raw else None
    mc = config_from_llada2(raw, cfg_path, mask_id)
    if max_seq_len:
        mc.max_seq_len = max_seq_len
    tensors = scan_weights(hf_dir)
    dtype = _source_dtype(raw, tensors, cfg_path) if dtype in (None, "auto") else dtype
    dt = parse_dtype(dtype)
    expected = expected_shapes(mc)
    groups: dict[str, dict] = {}  # our name -> {expert index or None: source name}
    for k in tensors:
        if k.endswith("rotary_emb.inv_freq"):
            continue
        ours, e = _split_name(k)
        groups.setdefault(ours, {})[e] = k
    problems = []
    for ours, srcs in groups.items():
        if ours not in expected:
            problems.append(f"unexpected tensor {next(iter(srcs.values()))}")
            continue
        shape = expected[ours]
        if None in srcs and len(srcs) > 1:
            problems.append(f"{ours}: both merged and per-expert tensors")
            continue
        if None in srcs:
            got = tensors[srcs[None]].shape
        else:
            n = shape[0]
            if sorted(srcs) != list(range(n)):
                problems.append(f"{ours}: experts {sorted(set(range(n)) - set(srcs))[:4]} missing")
                continue
            got = (len(srcs),) + tuple(tensors[srcs[0]].shape)
            if len({tensors[s].shape for s in srcs.values()}) > 1:
                problems.append(f"{ours}: experts of different shapes")
        if tuple(got) != tuple(shape):
            problems.append(f"{ours}: checkpoint {list(got)} vs config {list(shape)}")
    problems += [f"missing tensor {release_name(k)}" for k in expected if k not in groups]
    if problems:
        raise CheckpointError(f"{hf_dir} does not fit its config.json ({'; '.join(problems[:4])}"
                              f"{' ...' if len(problems) > 4 else ''})")
    mask_str = _check_tokenizer(tok_dir, mc, cfg_path) if tok_dir else None
    with staged_output(out_dir, force, inputs=(hf_dir,)) as tmp, contextlib.ExitStack() as stack:
        read = _Reader(tensors, stack)
        ident = _import_tokenizer(tok_src if tok_dir else None, tmp, out_dir, mask_str)
        config = consolidated_config(mc, dtype, ident, source={"path": hf_dir, "kind": "llada2"})
        items = []
        for ours in expected:  # our module order
            srcs = groups[ours]
            src_dt = tensors[next(iter(srcs.values()))].dtype
            produce = (lambda s=srcs[None]: read(s)) if None in srcs else \
                (lambda s=srcs: torch.stack([read(s[e]) for e in range(len(s))]))
            items.append((ours, expected[ours], _out_dtype(ours, src_dt, dt), produce))
        files = _write_streamed(items, tmp, max_shard_size, {FORMAT: json.dumps(config)})
        atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))
    n = sum(math.prod(s) for s in expected.values())
    print(f"wrote {out_dir}: {len(files)} weight file(s), {n / 1e6:.2f}M parameters "
          f"({mc.active_params_per_token() / 1e6:.2f}M active per token), dtype {config['dtype']}, "
          f"mask_token_id {mc.mask_token_id}, vocab {mc.vocab_size}", flush=True)


def _mask_from_tokenizer(tok_dir: str | None, mask_token: str | None, source: str) -> int:
    """The mask token id from ``mask_token`` or the tokenizer's ``mask_token`` entry.

    Raises:
        CheckpointError: no tokenizer, no named mask token, or a name the vocabulary lacks.
    """
    named = mask_token
    tc_path = os.path.join(tok_dir or "", "tokenizer_config.json")
    if named is None and tok_dir and os.path.isfile(tc_path):
        named = read_json(tc_path).get("mask_token")
        named = named.get("content") if isinstance(named, dict) else named
    if not named or not tok_dir:
        raise CheckpointError(f"{source} has no mask_token_id and the tokenizer names no mask_token; pass "
                              "--mask_token TOKEN (the release's mask token string)")
    from tokenizers import Tokenizer as HFTokenizer

    tid = HFTokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).token_to_id(named)
    if tid is None:
        raise CheckpointError(f"mask token {named!r} is not in {tok_dir}/tokenizer.json")
    return tid


def export_llada2(source: str, out_dir: str, *, dtype: str | None = None, max_shard_size: str = "5GB",
                  force: bool = False, quiet: bool = False, tokenizer: str | None = None) -> None:
    """Write a LLaDA2 model in the release's format: config.json (release keys + ``auto_map``), per-expert tensors
    under the release's names, the tokenizer (mask token recorded) and our remote-code files. ``dtype`` None = the
    checkpoint's recorded dtype (fp32 for DeepSpeed tags, whose master weights are fp32).

    Raises:
        CheckpointError: not a LLaDA2 model, weights that do not fit the recorded config, a tokenizer with another
            mask token, a non-empty ``out_dir`` without ``force``.
    """
    kind, resolved = resolve_checkpoint(source)
    if kind == "safetensors":
        sd, meta = None, consolidated_meta(resolved)
        dtype = (None if dtype == "auto" else dtype) or read_json(os.path.join(resolved, CONFIG_FILE)).get("dtype") or "fp32"
        tensors = scan_weights(resolved)
    else:
        sd, meta = load_model_state(resolved, progress=not quiet)
        dtype = (None if dtype == "auto" else dtype) or "fp32"
        tensors = None
    mc = model_config_from_meta(meta, resolved)
    dt = parse_dtype(dtype)
    out_cfg = llada2_config_from_model_config(mc, str(dt).replace("torch.", ""))
    expected = expected_shapes(mc)
    have = {k: (tuple(v.shape) if sd is not None else tuple(tensors[k].shape))
            for k in (sd if sd is not None else tensors)}
    from llada_scale.model.transformer import state_dict_mismatch

    problems = state_dict_mismatch(expected, {k: torch.empty(s, device="meta") for k, s in have.items()}, resolved,
                                   "config")
    if problems:
        raise CheckpointError(f"{resolved} does not fit its model config ({problems})")
    tok_src = tokenizer or tokenizer_path_from_meta(meta)
    with staged_output(out_dir, force, inputs=(source,)) as tmp, contextlib.ExitStack() as stack:
        read = (lambda k: sd[k]) if sd is not None else _Reader(tensors, stack)
        _export_tokenizer(tok_src, tmp, mc.mask_token_id)
        items = []
        for ours, shape in expected.items():
            src_dt = sd[ours].dtype if sd is not None else tensors[ours].dtype
            if re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.\w+", ours):
                layer, proj = ours.split(".")[2], ours.split(".")[-1]
                cache = {}

                def expert(e, k=ours, cache=cache, last=shape[0] - 1):  # the stack read once, then sliced
                    if "t" not in cache:
                        cache["t"] = read(k)
                    t = cache["t"][e]
                    if e == last:
                        cache.clear()
                    return t

                items += [(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", shape[1:],
                           _out_dtype(ours, src_dt, dt), lambda e=e, f=expert: f(e)) for e in range(shape[0])]
            else:
                items.append((release_name(ours), shape, _out_dtype(ours, src_dt, dt), lambda k=ours: read(k)))
        files = _write_streamed(items, tmp, max_shard_size, None)
        for f in _REMOTE_FILES:
            shutil.copyfile(os.path.join(_REMOTE_DIR, f), os.path.join(tmp, f))
        atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(out_cfg, indent=2, sort_keys=True))
    print(f"wrote LLaDA2 release-format model to {out_dir}: {len(files)} weight file(s); load with "
          f"transformers.AutoModelForCausalLM.from_pretrained({out_dir!r}, trust_remote_code=True)", flush=True)
