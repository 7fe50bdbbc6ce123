"""The rows of ``benchmarks/gpu_check.py``: each function measures one row and returns it as a dict (the driver
times it, counts dynamo graphs / graph breaks / compiled frames around it, records an exception as a failed
row and writes the JSON after it).

* correctness: attention outputs of FlexAttention (compiled mask, compiled kernel: the CUDA path) against SDPA
  with the dense mask of the same ``mask_mod``, in float32 at 1e-4 (max |diff| / max |SDPA|), for every mask the
  package builds; bf16 losses and gradients of a model flex vs SDPA as a second row; compiled vs eager loss; per
  layer compile x full activation checkpointing with its graph and graph-break counts.
* speed: a training step (forward, backward, AdamW) timed after warm-up, without and through the real Trainer;
  the model comes from the registry (dense Transformer or LLaDA2 MoE: :mod:`gpu_check_llada2` uses
  :func:`train_speed` too), FLOPs are counted as the trainer counts them (active parameters for MoE).
* loss memory: peak memory of the head + loss at vocab 126,464.

On CPU (``--cpu-dry-run``) FlexAttention has no backward (torch 2.13): flex rows are forward only.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch
import torch.nn.functional as F

from llada_scale.model import attention
from llada_scale.model import block_attention as ba
from llada_scale.model.head import linear_cross_entropy
from llada_scale.model.registry import build_model, is_moe
from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.objectives.losses import compute_loss, model_input_length
from llada_scale.training.metrics import FlopCounter, peak_flops_for
from llada_scale.training.moe_balance import MoEBalancer
from llada_scale.training.parallelize import apply_activation_checkpointing, apply_compile

VOCAB, MASK = 6464, 6400  # minimind's vocabulary + mask token, padded to 64 (the presets' default)
OBJECTIVES = {"ar": dict(name="ar"), "diffusion": dict(name="diffusion"),
              "block": dict(name="diffusion", block_length=32)}
MASK_KINDS = ("document causal", "document bidirectional", "causal (AR, no documents)",
              "block diffusion (training)", "block diffusion [x ; x] (inference)")
ATTN_TOL = 1e-4  # float32 flex vs SDPA: both sum the same products in another order (~1e-6 seen on CPU)


def packed_batch(b: int, length: int, vocab: int, gen: torch.Generator, device, mean_doc: int = 512) -> dict:
    """Random tokens packed into documents of random length (exponential, mean ``mean_doc``), as the loader packs."""
    doc = torch.zeros(b, length, dtype=torch.int32)
    pos = torch.zeros(b, length, dtype=torch.long)
    for r in range(b):
        i, d = 0, 0
        while i < length:
            n = min(length - i, 1 + int(torch.empty(1).exponential_(1 / mean_doc, generator=gen)))
            doc[r, i:i + n], pos[r, i:i + n] = d, torch.arange(n)
            i, d = i + n, d + 1
    ids = torch.randint(0, min(vocab, MASK), (b, length), generator=gen)
    zeros = torch.zeros(b, length, dtype=torch.bool)
    return {k: v.to(device) for k, v in dict(input_ids=ids, position_ids=pos, document_ids=doc,
                                             prompt_mask=zeros, padding_mask=zeros).items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------- correctness
def masks(kind: str, batch: dict, backend: str):
    """(mask, query/key length) of one of :data:`MASK_KINDS` for ``batch`` on ``backend``, built by the package's
    own functions (what training, validation and the samplers call)."""
    pos, doc = batch["position_ids"], batch["document_ids"]
    b, length = pos.shape
    if kind.startswith("document"):
        return attention.build_mask(doc, causal=kind == "document causal", q_len=length, kv_len=length,
                                    batch_size=b, device=pos.device, backend=backend), length
    if kind.startswith("causal"):
        mask = attention.build_mask(None, causal=True, q_len=length, kv_len=length, batch_size=b,
                                    device=pos.device, backend=backend)
        return mask, length
    if kind == "block diffusion (training)":
        return ba.block_diffusion_mask(ba.block_ids(pos, doc, 32), doc, backend), 2 * length
    inference_pos = torch.arange(length, device=pos.device).expand(b, length)  # one document, as the sampler
    return ba.block_diffusion_mask(ba.block_ids(inference_pos, None, 32), None, backend), 2 * length


def attention_error(q, k, v, flex_mask, dense_mask) -> float:
    """max |flex - SDPA| / max |SDPA| of the attention outputs (float32 inputs give ~1e-6 for equal masks; a mask
    that differs anywhere moves the rows it touches by O(1e-2) or more)."""
    out = attention.attend(q, k, v, flex_mask).float()
    ref = attention.attend(q, k, v, dense_mask).float()
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def attention_row(kind: str, length: int, device) -> dict:
    """float32 attention outputs, flex (the CUDA path: compiled mask + compiled kernel) vs SDPA + dense mask."""
    gen = torch.Generator().manual_seed(0)
    batch = packed_batch(2, length, VOCAB, gen, device, mean_doc=max(8, length // 4))
    flex_mask, n = masks(kind, batch, "flex")
    dense_mask, _ = masks(kind, batch, "sdpa")
    q, k, v = (torch.randn(2, h, n, 64, generator=gen).to(device) for h in (8, 4, 4))
    err = attention_error(q, k, v, flex_mask, dense_mask)
    return {"check": f"attention fp32 flex vs sdpa, {kind}", "length": n, "max_rel_diff": err,
            "grad_rel_l2": None, "ok": err < ATTN_TOL}


def _loss_and_grads(model, batch, kind: str, backend: str, grads: bool):
    """Mean CE of random targets at every position under one mask; returns (loss, [param grads])."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    mask, n = masks(kind, batch, backend)
    if n != ids.shape[1]:
        ids, pos = torch.cat([ids, ids], 1), torch.cat([pos, pos], 1)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        logits = model(ids, position_ids=pos, attention_mask=mask)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), torch.roll(ids, 1, 1).flatten())
        if grads:
            loss.backward()
    return float(loss), [p.grad.float().clone() for p in model.parameters()] if grads else []


def model_config(dry: bool) -> dict:
    return dict(vocab_size=512, hidden_size=64 if dry else 256, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=128 if dry else 704, max_seq_len=4096, causal=False)


def model_row(kind: str, length: int, device, dtype) -> dict:
    """A model's loss (and gradients on CUDA) flex vs SDPA in ``dtype`` (bf16 on the GPU: a coarse second check;
    the float32 attention rows are the sharp one)."""
    grads = device.type == "cuda"  # FlexAttention has no CPU backward in torch 2.13
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**model_config(device.type != "cuda"))).to(device, dtype)
    batch = packed_batch(2, length, 512, torch.Generator().manual_seed(1), device, mean_doc=max(8, length // 4))
    flex_loss, flex_g = _loss_and_grads(model, batch, kind, "flex", grads)
    sdpa_loss, sdpa_g = _loss_and_grads(model, batch, kind, "sdpa", grads)
    g_err = max((float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(flex_g, sdpa_g)), default=None)
    rel = abs(flex_loss - sdpa_loss) / abs(sdpa_loss)
    return {"check": f"model {str(dtype).split('.')[-1]} flex vs sdpa, {kind}", "length": length,
            "max_rel_diff": rel, "grad_rel_l2": g_err, "ok": rel < 1e-2 and (g_err is None or g_err < 5e-2)}


def compiled_row(length: int, device, dtype, compile_backend: str) -> dict:
    """Compiled (per layer) vs eager loss of the same model, bidirectional document mask, default backend."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**model_config(device.type != "cuda"))).to(device, dtype)
    compiled = copy.deepcopy(model)
    apply_compile(compiled, backend=compile_backend)
    batch = packed_batch(2, length, 512, torch.Generator().manual_seed(2), device)
    eager_loss, _ = _loss_and_grads(model, batch, "document bidirectional", "auto", grads=False)
    comp_loss, _ = _loss_and_grads(compiled, batch, "document bidirectional", "auto", grads=False)
    rel = abs(comp_loss - eager_loss) / abs(eager_loss)
    return {"check": f"compiled ({compile_backend}) vs eager", "length": length, "max_rel_diff": rel,
            "grad_rel_l2": None, "ok": rel < 1e-2}


def compile_checkpoint_row(length: int, device, dtype, compile_backend: str) -> dict:
    """Per-layer compile x full activation checkpointing on the flex path (training step on CUDA; on CPU a
    forward with frozen weights): ok when dynamo compiled graphs and broke none (a graph break leaves the
    checkpointed layers eager for the whole run)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**model_config(device.type != "cuda"), attention_backend="flex"))
    model = model.to(device, dtype).requires_grad_(device.type == "cuda")
    apply_activation_checkpointing(model, "full")
    apply_compile(model, backend=compile_backend)
    batch = packed_batch(2, length, 512, torch.Generator().manual_seed(3), device)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    out = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    if device.type == "cuda":
        out.float().square().mean().backward()
    graphs, breaks = counters["stats"]["unique_graphs"] - graphs, sum(counters["graph_break"].values()) - breaks
    return {"check": f"compile ({compile_backend}) x full checkpointing, flex", "length": length,
            "max_rel_diff": None, "grad_rel_l2": None, "graphs": graphs, "ok": graphs > 0 and breaks == 0}


# ------------------------------------------------------------------------------------------------ speed
def _frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def flop_counter(model, cfg) -> FlopCounter:
    """The trainer's model-FLOP counter (``Trainer.__init__``): every parameter of a dense model; for a MoE
    backbone the active ones (``LLaDA2Config.active_params_per_token``: attention, dense FFNs, router, top-k
    routed and shared experts, head) plus the input embedding, which the counter then leaves out as a lookup."""
    embed = model.model.embed_tokens.weight.numel()
    counted = cfg.active_params_per_token() + embed if is_moe(cfg) else model.num_params()
    return FlopCounter(counted, embed, model.output_weight().numel(), cfg.num_layers, cfg.num_heads * cfg.head_dim,
                       cfg.tie_embeddings)


def train_speed(name, cfg: ModelConfig, objective: str, ac: str, micro: int, seq: int, steps: int, warmup: int,
                device, dtype, compile_backend: str | None) -> dict:
    """Time ``steps`` training steps after ``warmup`` (compilation included in warm-up); frames dynamo compiles
    during the timed steps are recompiles (``recompiles_after_warmup``, 0 expected: static shapes). The model is
    built by the registry (dense Transformer or LLaDA2 MoE, from ``cfg``'s type); ``compile_backend`` None runs
    eager. A MoE model's router statistics are taken and its expert biases updated after every step, as the
    trainer does (:class:`MoEBalancer`); MFU counts active parameters (:func:`flop_counter`)."""
    reset_peak(device)
    torch.manual_seed(0)
    cfg = copy.deepcopy(cfg)
    cfg.causal = objective == "ar"
    model = build_model(cfg).to(device, dtype)
    layers = apply_activation_checkpointing(model, ac)
    if compile_backend:
        apply_compile(model, backend=compile_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    balancer = MoEBalancer(model, getattr(cfg, "moe", None))
    ocfg = ObjectiveConfig(**OBJECTIVES[objective])
    flops = flop_counter(model, cfg)
    model_len = model_input_length(ocfg, cfg.causal, seq)
    gen = torch.Generator().manual_seed(1)
    noise = torch.Generator(device=device).manual_seed(2)
    batches = [packed_batch(micro, seq, cfg.vocab_size, gen, device) for _ in range(2)]
    total_flops, t0, frames = 0.0, time.perf_counter(), 0
    compile_s = None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            compile_s, frames = time.perf_counter() - t0, _frames()
            total_flops, t0 = 0.0, time.perf_counter()
        loss, stats = compute_loss(model, batches[i % 2], ocfg, cfg.causal, cfg.mask_token_id, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        balancer.after_step(device)
        total_flops += flops(stats["model_tokens"], model_len, stats["head_tokens"])
    sync(device)
    seconds = time.perf_counter() - t0
    # executed FLOPs: the dense attention term (12 n_layer d s per position) scaled by the tiles flex computes
    density = sum(attention_density(b, objective) for b in batches) / len(batches)
    dense_attention = steps * micro * model_len * 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * model_len
    moe = {"active_params_M": round(cfg.active_params_per_token() / 1e6, 1)} if is_moe(cfg) else {}
    row = _speed_row(name, model.num_params(), objective, f"{ac} ({len(layers)}/{cfg.num_layers})", micro, seq,
                     seconds, steps, float(total_flops), device, compile_s, float(loss),
                     recompiles_after_warmup=_frames() - frames, attention_tile_density=density,
                     compiled=compile_backend is not None, **moe)
    if row["mfu"] is not None:
        row["mfu_executed"] = row["mfu"] * (1 - dense_attention * (1 - density) / float(total_flops))
    return row


def attention_density(batch: dict, objective: str) -> float:
    """Fraction of the 128 x 128 tiles of the batch's attention mask that FlexAttention computes (full or partial):
    the executed share of the dense attention FLOPs the MFU counts. Built with the eager ``create_block_mask``
    (a dense [B, n, n] bool on the way: 64 MB at 2L = 4096, B = 4)."""
    pos, doc = batch["position_ids"], batch["document_ids"]
    b, length = pos.shape
    if objective == "block":
        mod, n = ba.block_diffusion_mask_mod(ba.block_ids(pos, doc, 32), doc), 2 * length
    else:
        mod, n = attention.document_mask_mod(doc, causal=objective == "ar"), length
    mask = attention.create_block_mask(mod, b, None, n, n, device=pos.device, BLOCK_SIZE=ba.FLEX_BLOCK_SIZE)
    computed = mask.kv_num_blocks.sum() + (0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum())
    tiles = (n + ba.FLEX_BLOCK_SIZE - 1) // ba.FLEX_BLOCK_SIZE
    return float(computed) / (b * tiles * tiles)


def _speed_row(name, params, objective, ac, micro, seq, seconds, steps, total_flops, device, warmup_s, loss, **kw):
    peak = peak_flops_for(torch.cuda.get_device_name()) if device.type == "cuda" else None
    tps = steps * micro * seq / seconds
    return {"model": name, "params_M": round(params / 1e6, 1), "objective": objective, "activation_checkpointing": ac,
            "micro_batch": micro, "seq": seq, "step_s": seconds / steps, "tokens_per_s": tps,
            "tokens_per_s_per_gpu": tps, "mfu": total_flops / seconds / peak if peak else None,
            "peak_memory_gb": peak_gb(device), "warmup_s": warmup_s, "loss": loss, **kw}


def speed_plan(dry: bool) -> list[tuple]:
    """(name, ModelConfig, objective, ac, micro, seq) in order of value (the section budget cuts the tail): the 1b
    diffusion recipe, the 8B 4-layer slice (the only GPU check of benchmarks/memory.py's per-layer figures), 1b
    block diffusion, 1b AR, the 30m rows, the 8B 2-layer slice (with the 4-layer one: per-layer cost)."""
    if dry:
        small = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=128, max_seq_len=64, mask_token_id=MASK)
        shape8b = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                              intermediate_size=192, max_seq_len=64, mask_token_id=999)
        presets, seq, seq8b = {"30m": (small, 2), "1b": (small, 2)}, 64, 64
    else:
        presets = {"1b": (preset_1b(), 4),
                   "30m": (ModelConfig(**{**_preset("30m"), "vocab_size": VOCAB, "mask_token_id": MASK,
                                          "max_seq_len": 2048}), 16)}
        seq, seq8b = 2048, 4096
        shape8b = ModelConfig(**{**_preset("llada-8b"), "num_layers": 4})
    cfg_1b, micro_1b = presets["1b"]
    cfg_30m, micro_30m = presets["30m"]
    slice2 = copy.deepcopy(shape8b)
    slice2.num_layers = 2
    return [("1b", cfg_1b, "diffusion", "none", micro_1b, seq), ("1b", cfg_1b, "diffusion", "full", micro_1b, seq),
            ("llada-8b shape, 4 layers", shape8b, "diffusion", "full", 1, seq8b),
            ("1b", cfg_1b, "block", "full", micro_1b, seq), ("1b", cfg_1b, "block", "none", micro_1b, seq),
            ("1b", cfg_1b, "ar", "none", micro_1b, seq), ("1b", cfg_1b, "ar", "full", micro_1b, seq),
            *[("30m", cfg_30m, o, ac, micro_30m, seq) for o in ("diffusion", "block", "ar") for ac in ("none", "full")],
            ("llada-8b shape, 2 layers", slice2, "diffusion", "full", 1, seq8b)]


def _preset(name: str) -> dict:
    from llada_scale.model.transformer import PRESETS

    return dict(PRESETS[name])


def preset_1b() -> ModelConfig:
    return ModelConfig(**{**_preset("1b"), "vocab_size": VOCAB, "mask_token_id": MASK})


def trainer_speed(dry: bool, steps: int, warmup: int, ds_config: str) -> dict:
    """The 1b diffusion row through the real :class:`llada_scale.training.trainer.Trainer`: DeepSpeed (ZeRO
    ``ds_config``), bf16 with fp32 master weights on CUDA, ``train.compile=auto``, the per-micro-step flags
    collective; one process. A word-level tokenizer made here (the GPU machine has no data) with minimind's
    vocabulary size, so the model is the 1b preset at vocabulary 6464 as in the rows above."""
    from llada_scale.training.config import load_config
    from llada_scale.training.engine import init_distributed
    from llada_scale.training.trainer import Trainer

    tmp = tempfile.mkdtemp()
    tok = _tokenizer(tmp)
    micro, seq = (2, 64) if dry else (4, 2048)
    shape = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
             "model.intermediate_size=128"] if dry else ["model.preset=1b"]
    init_distributed()
    cfg = load_config(None, [*shape, "model.causal=false", "objective.name=diffusion", f"data.seq_len={seq}",
                             f"model.max_seq_len={seq}", f"train.micro_batch_size={micro}",
                             f"train.global_batch_size={micro}", "train.wandb=off", f"run_dir={tmp}/run",
                             "train.resume=none", "optim.warmup_steps=1", f"tokenizer={tok}"])
    batches = [packed_batch(micro, seq, VOCAB, torch.Generator().manual_seed(i), "cpu") for i in range(2)]

    class Loader:  # the packed loader's batch format, on the host (the Trainer moves it to the device)
        def __iter__(self):
            while True:
                yield from batches

        def state_dict(self):
            return {}

    trainer = Trainer(cfg, ds_config, loader_factory=Loader)
    try:
        it = iter(trainer.loader)
        device = trainer.device
        reset_peak(device)
        for _ in range(warmup):
            trainer.train_step(it)
        sync(device)
        t0, frames, total_flops = time.perf_counter(), _frames(), 0.0
        for _ in range(steps):
            total_flops += float(trainer.train_step(it)["flops"])
        sync(device)
        seconds = time.perf_counter() - t0
        return _speed_row(f"Trainer ({ds_config.split('/')[-1]}), {'tiny' if dry else '1b'}", trainer.num_params,
                          "diffusion", "none", micro, seq, seconds, steps, total_flops, device, None, None,
                          compile=trainer.parallelized["compile"], recompiles_after_warmup=_frames() - frames)
    finally:
        trainer.engine.destroy()


def _tokenizer(tmp: str) -> str:
    """A word-level tokenizer of 6400 ids with an EOS in ``tmp``/tok (the trainer adds the mask token, 6400, and
    pads to 6464, as for minimind)."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(6397)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|startoftext|>"])
    out = Path(tmp) / "tok"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                                                           "pad_token": "<|endoftext|>"}))
    return str(out)


# ----------------------------------------------------------------------------------------- loss memory
def loss_memory(device, dtype, positions: int, hidden: int, vocab: int, variant: str) -> dict:
    """Peak memory of head + loss (forward and backward) for ``positions`` positions, half of them masked."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(positions, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (positions,), generator=gen).to(device)
    masked = (torch.rand(positions, generator=gen) < 0.5).to(device)
    sync(device)
    reset_peak(device)
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    if variant.startswith("full"):
        ce = F.cross_entropy(F.linear(h, w).float(), torch.where(masked, labels, -100), reduction="none")
    else:
        keep = masked.nonzero().squeeze(1)
        ce = linear_cross_entropy(h[keep], w, labels[keep])
    ce.sum().backward()
    sync(device)
    peak = peak_gb(device)
    return {"variant": variant, "positions": positions, "vocab": vocab, "hidden": hidden,
            "seconds": time.perf_counter() - t0, "peak_extra_gb": None if peak is None else peak - base / 2**30}
