"""GPU self-check: correctness of the CUDA path, speed (tokens/s, MFU) and peak memory, in one command.

    python benchmarks/gpu_check.py --out DIR             # one GPU, < 8 minutes: DIR/gpu_check.json + gpu_check.md
    python benchmarks/gpu_check.py --out DIR --cpu-dry-run   # the same code at tiny sizes on CPU (CI runs it)

Sections (``--sections``, default all, in this order; the speed rows stop when ``--budget_s`` is spent):

* ``correctness``: bf16 losses and gradients of FlexAttention (compiled, ``BlockMask``) against SDPA with the
  dense mask of the same ``mask_mod``: document masks (causal and bidirectional) at L = 160 and 2048 and the
  block-diffusion ``[x_t ; x_0]`` mask at 2 x 160 and 2 x 2048 (lengths that are not multiples of the 128 tile);
  and compiled vs eager loss. On CPU FlexAttention has no backward (torch 2.13): forward only.
* ``speed``: tokens/s, tokens/s per GPU, MFU (dense bf16 datasheet peak) and peak memory of a training step
  (forward, backward, fused AdamW on bf16 weights; no DeepSpeed: one GPU) for the 30m and 1b presets at seq 2048
  with packed documents: AR, LLaDA diffusion and block diffusion (block 32, FLOPs counted on the 2L positions),
  compile on, activation checkpointing off and full; and an LLaDA-8B-shaped model (vocab 126,464) with 2 and 4
  layers at seq 4096, micro batch 1, full checkpointing: per-layer time and memory.
* ``loss_memory``: peak memory of the output head + loss at vocab 126,464, seq 2048 (hidden 4096): full
  logits + cross-entropy vs the memory-lean loss (masked positions only, chunked).

The dry run uses tiny shapes, 2 timed steps and the ``aot_eager`` compile backend (inductor takes minutes to
compile on a small CPU); every code path is the GPU one otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llada_scale.model import attention  # noqa: E402
from llada_scale.model import block_attention as ba  # noqa: E402
from llada_scale.model.head import linear_cross_entropy  # noqa: E402
from llada_scale.model.transformer import ModelConfig, Transformer, preset  # noqa: E402
from llada_scale.objectives.config import ObjectiveConfig  # noqa: E402
from llada_scale.objectives.losses import compute_loss, model_input_length  # noqa: E402
from llada_scale.training.metrics import FlopCounter, peak_flops_for  # noqa: E402
from llada_scale.training.parallelize import apply_activation_checkpointing, apply_compile  # noqa: E402

VOCAB, MASK = 6464, 6400  # minimind's vocabulary + mask token, padded to 64 (the presets' default)
OBJECTIVES = {"ar": dict(name="ar"), "diffusion": dict(name="diffusion"),
              "block": dict(name="diffusion", block_length=32)}


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
def _loss_and_grads(model, batch, mask_kind: str, backend: str, length: int, grads: bool):
    """Mean CE of random targets at every position under one mask; returns (loss, [param grads])."""
    ids, pos, doc = batch["input_ids"], batch["position_ids"], batch["document_ids"]
    b = ids.shape[0]
    if mask_kind == "block":
        mask = ba.block_diffusion_mask(ba.block_ids(pos, doc, 32), doc, backend)
        ids, pos = torch.cat([ids, ids], 1), torch.cat([pos, pos], 1)
    else:
        mask = attention.build_mask(doc, causal=mask_kind == "causal", q_len=length, kv_len=length, batch_size=b,
                                    device=ids.device, backend=backend)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        logits = model(ids, position_ids=pos, attention_mask=mask)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), torch.roll(ids, 1, 1).flatten())
        if grads:
            loss.backward()
    return float(loss), [p.grad.float().clone() for p in model.parameters()] if grads else []


def correctness(device, dtype, lengths, cfg_kw, compile_backend) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    grads = device.type == "cuda"  # FlexAttention has no CPU backward in torch 2.13
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg_kw)).to(device, dtype)
    for length in lengths:
        batch = packed_batch(2, length, cfg_kw["vocab_size"], gen, device, mean_doc=max(8, length // 4))
        for kind in ("causal", "bidirectional", "block"):
            flex_loss, flex_g = _loss_and_grads(model, batch, kind, "flex", length, grads)
            sdpa_loss, sdpa_g = _loss_and_grads(model, batch, kind, "sdpa", length, grads)
            g_err = max((float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(flex_g, sdpa_g)),
                        default=None)
            rel = abs(flex_loss - sdpa_loss) / abs(sdpa_loss)
            ok = rel < 1e-2 and (g_err is None or g_err < 5e-2)
            rows.append({"check": f"flex vs sdpa, {kind} mask", "length": (2 if kind == "block" else 1) * length,
                         "loss_rel_diff": rel, "grad_rel_l2": g_err, "ok": ok})
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    apply_compile(compiled, backend=compile_backend)
    batch = packed_batch(2, lengths[-1], cfg_kw["vocab_size"], gen, device)
    eager_loss, _ = _loss_and_grads(model, batch, "bidirectional", "auto", lengths[-1], grads=False)
    comp_loss, _ = _loss_and_grads(compiled, batch, "bidirectional", "auto", lengths[-1], grads=False)
    rel = abs(comp_loss - eager_loss) / abs(eager_loss)
    rows.append({"check": f"compiled ({compile_backend}) vs eager", "length": lengths[-1], "loss_rel_diff": rel,
                 "grad_rel_l2": None, "ok": rel < 1e-2})
    return rows


# ------------------------------------------------------------------------------------------------ speed
def train_speed(name, cfg: ModelConfig, objective: str, ac: str, micro: int, seq: int, steps: int, warmup: int,
                device, dtype, compile_backend) -> dict:
    """Time ``steps`` training steps after ``warmup`` (compilation included in warmup)."""
    torch._dynamo.reset()  # a fresh compile cache per row (the inductor FX-graph cache still helps)
    reset_peak(device)
    torch.manual_seed(0)
    cfg = copy.deepcopy(cfg)
    cfg.causal = objective == "ar"
    model = Transformer(cfg).to(device, dtype)
    layers = apply_activation_checkpointing(model, ac)
    apply_compile(model, backend=compile_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ocfg = ObjectiveConfig(**OBJECTIVES[objective])
    flops = FlopCounter(model.num_params(), model.model.embed_tokens.weight.numel(), model.output_weight().numel(),
                        cfg.num_layers, cfg.num_heads * cfg.head_dim, cfg.tie_embeddings)
    model_len = model_input_length(ocfg, cfg.causal, seq)
    gen = torch.Generator().manual_seed(1)
    noise = torch.Generator(device=device).manual_seed(2)
    batches = [packed_batch(micro, seq, cfg.vocab_size, gen, device) for _ in range(2)]
    total_flops, t0 = 0.0, time.perf_counter()
    compile_s = None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            compile_s = time.perf_counter() - t0
            total_flops, t0 = 0.0, time.perf_counter()
        loss, stats = compute_loss(model, batches[i % 2], ocfg, cfg.causal, cfg.mask_token_id, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total_flops += flops(stats["model_tokens"], model_len, stats["head_tokens"])
    sync(device)
    seconds = time.perf_counter() - t0
    total_flops = float(total_flops)
    peak = peak_flops_for(torch.cuda.get_device_name()) if device.type == "cuda" else None
    tps = steps * micro * seq / seconds
    return {"model": name, "params_M": round(model.num_params() / 1e6, 1), "objective": objective,
            "activation_checkpointing": f"{ac} ({len(layers)}/{cfg.num_layers})", "micro_batch": micro, "seq": seq,
            "step_s": seconds / steps, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps,
            "mfu": total_flops / seconds / peak if peak else None, "peak_memory_gb": peak_gb(device),
            "warmup_s": compile_s, "loss": float(loss)}


def speed_plan(dry: bool) -> list[tuple]:
    """(name, ModelConfig, objective, ac, micro, seq) in priority order (the budget may cut the tail)."""
    if dry:
        small = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=128, max_seq_len=64, mask_token_id=MASK)
        big = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                          intermediate_size=192, max_seq_len=64, mask_token_id=999)
        presets, seq, seq8b = {"30m": (small, 2), "1b": (small, 2)}, 64, 64
        shape8b = big
    else:
        presets = {"1b": (preset("1b", vocab_size=VOCAB, mask_token_id=MASK), 4),
                   "30m": (preset("30m", vocab_size=VOCAB, mask_token_id=MASK, max_seq_len=2048), 16)}
        seq, seq8b = 2048, 4096
        shape8b = preset("llada-8b", num_layers=4)
    plan = []
    for name, (cfg, micro) in presets.items():
        for ac in ("none", "full"):
            for objective in ("diffusion", "ar", "block"):
                plan.append((name, cfg, objective, ac, micro, seq))
    for layers in (4, 2):
        cfg = copy.deepcopy(shape8b)
        cfg.num_layers = layers
        plan.append((f"llada-8b shape, {layers} layers", cfg, "diffusion", "full", 1, seq8b))
    return plan


# ----------------------------------------------------------------------------------------- loss memory
def loss_memory(device, dtype, positions: int, hidden: int, vocab: int) -> list[dict]:
    """Peak memory of head + loss (forward and backward) for ``positions`` positions, half of them masked."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(positions, hidden, generator=gen).to(device, dtype)
    w0 = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, dtype)
    labels = torch.randint(0, vocab, (positions,), generator=gen).to(device)
    masked = (torch.rand(positions, generator=gen) < 0.5).to(device)
    for variant in ("full logits + cross_entropy", "lean: masked positions, chunked"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
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
        rows.append({"variant": variant, "positions": positions, "vocab": vocab, "hidden": hidden,
                     "seconds": time.perf_counter() - t0,
                     "peak_extra_gb": None if peak is None else peak - base / 2**30})
        del h, w, ce
    return rows


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    def fmt(v, spec=".3g"):
        return "-" if v is None else (format(v, spec) if isinstance(v, float) else str(v))

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    out = [f"# gpu_check: {result['device']} ({'CPU dry run' if result['dry_run'] else 'GPU'}), "
           f"{result['seconds']:.0f} s\n"]
    if result.get("correctness"):
        out += ["| check | length | loss rel. diff | grad rel. L2 | ok |", "|---|---:|---:|---:|---|"]
        out += [f"| {r['check']} | {r['length']} | {fmt(r['loss_rel_diff'], '.2e')} | {fmt(r['grad_rel_l2'], '.2e')} "
                f"| {'yes' if r['ok'] else 'NO'} |" for r in result["correctness"]]
        out.append("")
    if result.get("speed"):
        out += ["| model | params (M) | objective | act. ckpt | micro x seq | step (s) | tokens/s/GPU | MFU | "
                "peak mem (GB) | warm-up (s) |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['model']} | {r['params_M']} | {r['objective']} | {r['activation_checkpointing']} | "
                f"{r['micro_batch']} x {r['seq']} | {fmt(r['step_s'])} | {r['tokens_per_s_per_gpu']:,.0f} | "
                f"{pct(r['mfu'])} | {fmt(r['peak_memory_gb'])} | "
                f"{fmt(r['warmup_s'])} |" for r in result["speed"]]
        out += [f"\nskipped (time budget): {', '.join(result['skipped'])}" if result.get("skipped") else "", ""]
    if result.get("loss_memory"):
        out += ["| head + loss | positions | vocab | hidden | peak extra memory (GB) | seconds |",
                "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['variant']} | {r['positions']} | {r['vocab']} | {r['hidden']} | {fmt(r['peak_extra_gb'])} | "
                f"{fmt(r['seconds'])} |" for r in result["loss_memory"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md (created)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU: checks the code, not the GPU")
    p.add_argument("--sections", default="correctness,speed,loss_memory",
                   help="comma-separated subset of correctness, speed, loss_memory (default: all)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per speed row (default 10; dry run 2)")
    p.add_argument("--budget_s", type=float, default=360.0,
                   help="stop adding speed rows after this many seconds in all (default 360: the run stays < 8 min)")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu-dry-run to check the code on CPU", file=sys.stderr)
        return 2
    sections = set(args.sections.split(","))
    unknown = sections - {"correctness", "speed", "loss_memory"}
    if unknown:
        print(f"error: unknown --sections {sorted(unknown)}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16  # bf16 matmuls are ~200x slower on most CPUs
    backend = "aot_eager" if dry else "inductor"
    steps, warmup = args.steps or (2 if dry else 10), 1 if dry else 3
    t_start = time.perf_counter()
    result = {"device": "cpu" if dry else torch.cuda.get_device_name(), "dry_run": dry, "torch": torch.__version__,
              "dtype": str(dtype), "compile_backend": backend, "skipped": []}
    if "correctness" in sections:
        kw = dict(vocab_size=512, hidden_size=64 if dry else 256, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128 if dry else 704, max_seq_len=4096, causal=False)
        result["correctness"] = correctness(device, dtype, (40, 72) if dry else (160, 2048), kw, backend)
    if "speed" in sections:
        result["speed"] = []
        for name, cfg, objective, ac, micro, seq in speed_plan(dry):
            label = f"{name} {objective} ac={ac}"
            if time.perf_counter() - t_start > args.budget_s:
                result["skipped"].append(label)
                continue
            try:
                result["speed"].append(train_speed(name, cfg, objective, ac, micro, seq, steps, warmup, device,
                                                   dtype, backend))
            except torch.OutOfMemoryError:
                result["skipped"].append(f"{label} (out of memory)")
            print(f"[{time.perf_counter() - t_start:.0f} s] {label} done", flush=True)
    if "loss_memory" in sections:
        positions, hidden, vocab = (256, 64, 4096) if dry else (2048, 4096, 126464)
        result["loss_memory"] = loss_memory(device, dtype, positions, hidden, vocab)
    result["seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(out / "gpu_check.json")
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    bad = [r["check"] for r in result.get("correctness", []) if not r["ok"]]
    if bad:
        print(f"FAILED checks: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
