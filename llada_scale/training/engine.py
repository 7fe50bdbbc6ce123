"""DeepSpeed setup: process group, the DeepSpeed config filled from the recipe, optimizer groups, init weights.

Nothing here knows the model's internals: weights go through :func:`llada_scale.model.transformer.load_weights`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from llada_scale.training.config import RunConfig
from llada_scale.model.transformer import Transformer, load_weights, resize_vocab


class TrainError(RuntimeError):
    """A run that cannot start or continue; printed as one line by :func:`main`."""


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU).

    A plain ``python -m llada_scale.train`` gets a one-process group on a free local port.
    Returns (rank, local_rank, world_size).
    """
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        # modulo: SLURM may give each task only its own GPU (CUDA_VISIBLE_DEVICES of one id, device_count 1)
        # while LOCAL_RANK counts the node's tasks; with all GPUs visible it is LOCAL_RANK itself
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), local_rank, dist.get_world_size()


def build_ds_config(path: str | None, cfg: RunConfig, world_size: int, device: torch.device) -> dict:
    """Read a DeepSpeed JSON and fill its ``"auto"`` fields from the recipe.

    Batch sizes: train_batch_size = global_batch_size = micro_batch_size x gradient_accumulation_steps x
    world_size. bf16 ``auto`` means on for CUDA devices with bf16 support, off on CPU (bf16 matmuls run
    ~200x slower than fp32 on CPUs without AVX512-BF16); ``overlap_comm: auto`` is on for CUDA only (on CPU its
    extra threads halve ZeRO-2 throughput), and so is ``contiguous_gradients: auto`` (it saves the GPU allocator
    from fragmenting; on CPU its bucket copies cost ZeRO-2 ~4% of a tiny model's step); measured in docs/LOG.md.

    With bf16, gradients are accumulated over micro batches and reduced across ranks in float32 unless the
    JSON says otherwise (``data_types.grad_accum_dtype``, ``communication_data_type``; DeepSpeed's default is
    the model dtype, which rounds small 1/t-weighted micro-batch gradients away: docs/LOG.md 2026-12-03).
    DeepSpeed cannot accumulate in float32 without ZeRO, so without a JSON a bf16 run uses ZeRO-1 (on one
    process the same as no ZeRO, plus float32 master weights and gradients).

    Raises:
        TrainError: missing/invalid JSON, a global batch that the world size cannot divide, or ZeRO-0 with bf16.
    """
    if path:
        try:
            ds = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TrainError(f"DeepSpeed config {path} does not exist (see ds_configs/)") from None
        except json.JSONDecodeError as e:
            raise TrainError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
        if not isinstance(ds, dict):
            raise TrainError(f"DeepSpeed config {path} must be a JSON object, not a {type(ds).__name__}")
    else:
        ds = {"zero_optimization": {"stage": 1 if _bf16_auto(device) else 0}, "bf16": {"enabled": "auto"}}
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise TrainError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size "
            f"{t.micro_batch_size} x world_size {world_size} = {per_step}; set train.global_batch_size to a "
            f"multiple of {per_step} or change train.micro_batch_size")
    gas = t.global_batch_size // per_step
    for key, value in (("train_batch_size", t.global_batch_size), ("train_micro_batch_size_per_gpu",
                       t.micro_batch_size), ("gradient_accumulation_steps", gas)):
        if ds.get(key, "auto") not in ("auto", value):
            raise TrainError(f"{path}: {key}={ds[key]} contradicts the recipe ({value}); set it to \"auto\"")
        ds[key] = value
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.optim.grad_clip
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    for key in ("overlap_comm", "contiguous_gradients"):  # on CPU both cost throughput (docs/LOG.md)
        if isinstance(zero, dict) and zero.get(key) == "auto":  # DeepSpeed's MoE ZeRO-2 needs contiguous ones
            zero[key] = device.type == "cuda" or (key == "contiguous_gradients" and t.expert_parallel_size > 1)
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        bf16["enabled"] = _bf16_auto(device)
    validate_ds_config(ds, path or "the default DeepSpeed config")  # before the checks below read the values
    if bf16["enabled"]:
        if zero.get("stage", 0) == 0:
            raise TrainError(f"{path}: ZeRO stage 0 with bf16 keeps no float32 master weights and accumulates "
                             "gradients in bf16; use ds_configs/zero1.json (same memory on one process)")
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds.setdefault("communication_data_type", "fp32")
    if "optimizer" in ds:  # DeepSpeed builds it (needed for CPU offload: DeepSpeedCPUAdam)
        ds["optimizer"]["params"] = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                                     "weight_decay": cfg.optim.weight_decay, **ds["optimizer"].get("params", {})}
    if t.expert_parallel_size > 1:  # DeepSpeed AutoEP replaces the MoE blocks inside deepspeed.initialize
        from llada_scale.training.expert_parallel import ds_section

        if zero.get("stage", 0) == 0:  # its checkpoints cannot be merged (no ZeRO fragments for ds_to_universal)
            raise TrainError(f"{path or 'the default DeepSpeed config'}: expert parallelism needs ZeRO stage 1-3; "
                             "use ds_configs/zero2.json or zero3.json")
        if zero.get("stage", 0) == 2 and not zero.get("contiguous_gradients", True):
            raise TrainError(f"{path}: expert parallelism at ZeRO-2 needs zero_optimization.contiguous_gradients "
                             "true (DeepSpeed's MoE gradient path); set it to true or \"auto\"")
        if "expert_parallel" in ds:
            raise TrainError(f"{path}: remove the expert_parallel section; train.expert_parallel_size writes it")
        ds["expert_parallel"] = ds_section(cfg.model, t.expert_parallel_size, device)
    return ds


# Top-level sections DeepSpeed 0.19 reads (DeepSpeedConfig and the features configured outside it). DeepSpeed
# ignores any other key, so a typo such as "zero_optimizaton" would silently train at ZeRO-0.
DS_SECTIONS = frozenset("""
    activation_checkpointing aio amp autotuning bf16 checkpoint comet comms_logger communication_data_type compile
    compression_training csv_monitor curriculum_learning data_efficiency data_types dataloader_drop_last
    datastates_ckpt disable_allgather disable_python_gc dump_state eigenvalue elasticity expert_parallel
    flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op gradient_clipping
    gradient_predivide_factor graph_harvesting hybrid_engine log_level managed_gradient_accumulation
    memory_breakdown nebula optimizer pipeline prescale_gradients progressive_layer_drop quantize_training
    scheduler seq_parallel_communication_data_type sparse_attention sparse_gradients steps_per_print
    tensor_parallel tensorboard timers torch_autocast train_batch_size train_micro_batch_size_per_gpu
    use_data_before_expert_parallelism use_node_local_storage vocabulary_size wall_clock_breakdown wandb
    weight_quantization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer zero_optimization
""".split())


def validate_ds_config(ds: dict, path: str) -> None:
    """Refuse a DeepSpeed config that DeepSpeed would misread or silently ignore.

    Checks: unknown top-level sections (:data:`DS_SECTIONS`; the message suggests the closest known one),
    ``zero_optimization.stage`` an integer 0-3 (a string ``"2"`` would reach our ``stage > 0`` tests), the
    ``zero_optimization`` keys against DeepSpeed's own ZeRO config model, and ``bf16``/``fp16`` ``enabled``
    a JSON bool.

    Raises:
        TrainError: naming the file, the key and the fix.
    """
    import difflib

    unknown = sorted(set(ds) - DS_SECTIONS)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, DS_SECTIONS, 1)) else repr(k)
                 for k in unknown]
        raise TrainError(f"{path}: unknown DeepSpeed section(s) {', '.join(hints)}; DeepSpeed would ignore them")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise TrainError(f"{path}: zero_optimization must be a JSON object, not {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise TrainError(f"{path}: zero_optimization.stage must be the integer 0, 1, 2 or 3, not {stage!r}")
    for section in ("bf16", "fp16"):
        value = ds.get(section, {})
        if not isinstance(value, dict) or not isinstance(value.get("enabled", False), bool):
            raise TrainError(f"{path}: {section} must be {{\"enabled\": true|false|\"auto\"}}, not {ds.get(section)!r}")
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        DeepSpeedZeroConfig(**zero)
    except ImportError:
        return
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        first = [x for x in str(e).splitlines() if x.strip()]
        raise TrainError(f"{path}: zero_optimization is not valid for DeepSpeed: "
                         f"{' '.join(first[1:3]) if len(first) > 2 else ' '.join(first)}") from None


def _bf16_auto(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (>= 2 dims), none on norm weights and biases; frozen parameters (LoRA's
    base weights) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def checkpoint_model_config(path: str) -> dict | None:
    """The ModelConfig dict a checkpoint records (read from its metadata only, no weights), or None.

    Raises:
        TrainError: the path holds no checkpoint, or an HF directory of an unsupported model.
    """
    from llada_scale.checkpoint import CONFIG_FILE, META_FILE, model_config_from_hf, resolve_checkpoint
    from llada_scale.checkpoint.files import read_json

    try:
        kind, p = resolve_checkpoint(path)
        if kind == "deepspeed":
            meta = read_json(os.path.join(p, META_FILE)) if os.path.isfile(os.path.join(p, META_FILE)) else {}
            return (meta.get("config") or {}).get("model") or meta.get("model")
        if kind == "safetensors":
            return read_json(os.path.join(p, CONFIG_FILE)).get("model")
        if kind == "hf":
            return model_config_from_hf(read_json(os.path.join(p, CONFIG_FILE)), os.path.join(p, CONFIG_FILE))
    except (ValueError, OSError) as e:
        raise TrainError(f"train.init_from={path}: {e}") from None
    return None


# Fields the weights do not show but that change the function: they must agree with the model we start from.
_SAME_AS_INIT = ("rope_theta", "rope_scaling", "norm_eps", "qk_norm", "norm_weight", "attention_bias", "head_dim",
                 "num_heads", "num_kv_heads", "tie_embeddings")


def fit_init_source(model_cfg, tokenizer, source: dict | None, where: str) -> None:
    """Set ``model_cfg.vocab_size`` and ``mask_token_id`` from the tokenizer and the model we start from.

    vocab_size = the tokenizer's vocabulary (mask token included) padded to a multiple of 64, or the source
    model's row count when that is larger (an imported model keeps its own rows: Qwen2.5 151936, LLaDA 126464,
    or any count that is not a multiple of 64). The mask token is the tokenizer's; a diffusion source that
    records another one is refused (LLaDA's 126336 must be the tokenizer's own ``<|mdm_mask|>``, never a second
    one added after the vocabulary).

    Raises:
        TrainError: the source records another mask token.
    """
    model_cfg.vocab_size = tokenizer.padded_vocab_size()
    model_cfg.mask_token_id = tokenizer.mask_token_id
    if not source:
        return
    for key in getattr(model_cfg, "INHERITED_FROM_INIT", ()):  # e.g. LLaDA2's release keys kept for export
        if key in source and getattr(model_cfg, key) in (None, {}):
            setattr(model_cfg, key, source[key])
    if source.get("vocab_size", 0) > model_cfg.vocab_size:
        model_cfg.vocab_size = source["vocab_size"]
    mask = source.get("mask_token_id")
    if mask is not None and source.get("causal") is False and mask != tokenizer.mask_token_id:
        raise TrainError(f"{where} is a diffusion model with mask_token_id {mask} but the tokenizer's mask token "
                         f"{tokenizer.mask_token!r} is id {tokenizer.mask_token_id}; use the model's own tokenizer "
                         "(import-llada / import-hf copy it next to the weights)")


def check_init_config(model_cfg, source: dict | None, where: str) -> None:
    """The recipe's fields in :data:`_SAME_AS_INIT` (rope, norms, biases, heads, tying: not all visible in the
    weights' shapes) must equal those of the ``train.init_from`` model.

    Raises:
        TrainError: naming every differing field (init_from vs recipe).
    """
    if not source:
        return
    mine = model_cfg.to_dict()
    keys = _SAME_AS_INIT + tuple(getattr(model_cfg, "SAME_AS_INIT", ()))
    diff = {k: (source[k], mine[k]) for k in keys if k in source and k in mine and source[k] != mine[k]
            and not (k == "head_dim" and source[k] is None)}
    if diff:
        raise TrainError(f"train.init_from={where} is another model than the recipe's (init_from vs recipe: {diff}); "
                         "set these model.* keys (or a matching model.preset)")


def load_init_weights(model: Transformer, path: str) -> dict:
    """Initialise ``model`` from a checkpoint (ours at any ZeRO stage, or consolidated safetensors).

    Rows are added to the embedding/head when the source vocabulary is smaller (AR -> diffusion adds the mask
    token). A consolidated directory (what import-llada / import-hf write) is read one tensor at a time straight
    into the parameters, so host memory stays at the model plus one tensor (an 8B model would otherwise need its
    fp32 state dict twice per rank). Returns the source metadata. Raises TrainError with the mismatch when shapes
    do not fit.
    """
    from llada_scale.checkpoint import load_model_state, resolve_checkpoint

    try:
        kind, resolved = resolve_checkpoint(path)
        if kind == "safetensors":
            return _stream_init(model, resolved, path)
        state, meta = load_model_state(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise TrainError(f"train.init_from={path}: {e}") from None
    state = resize_vocab(state, model.config.vocab_size)
    try:
        load_weights(model, state, source=f"init_from checkpoint {path}")
    except ValueError as e:
        raise TrainError(str(e)) from None
    return meta


_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


@torch.no_grad()
def _stream_init(model: Transformer, resolved: str, path: str) -> dict:
    from llada_scale.checkpoint.streaming import scan_weights, read_tensors
    from llada_scale.checkpoint.weights import consolidated_meta
    from llada_scale.model.transformer import state_dict_mismatch

    tensors = scan_weights(resolved)
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    shapes = {k: torch.empty((expected[k][0], *t.shape[1:]) if k in _VOCAB_ROWS and k in expected else t.shape,
                             device="meta") for k, t in tensors.items()}
    problems = state_dict_mismatch(expected, shapes, f"init_from checkpoint {path}")
    if problems:
        raise TrainError(f"init_from checkpoint {path} does not fit the model ({problems}); check the model "
                         "preset/overrides match the checkpoint's config")
    for name, t in read_tensors(tensors):
        if name in _VOCAB_ROWS:
            t = resize_vocab({name: t}, model.config.vocab_size)[name]
        own[name].copy_(t.to(own[name].dtype))
    return consolidated_meta(resolved)
