"""Tokens/s of one LLaDA2 MoE feed-forward layer (router + routed experts + shared expert), forward + backward:
the grouped path of :mod:`llada_scale.model.moe` (tokens permuted by expert, one GEMM per expert on CPU,
``torch._grouped_mm`` on CUDA in bf16) against a naive masked per-expert loop (for every expert, a boolean mask
over all (token, slot) pairs selects its rows, as the release's training path does).

    python benchmarks/moe_throughput.py [--tokens 2048] [--shape mini|small] [--device cpu] [--dtype fp32]

``mini``: LLaDA2-mini's MoE layer (hidden 2048, 256 experts of 512, top-8, 1 shared); ``small``: a CPU-sized
slice (hidden 512, 64 experts of 128, top-8). Prints a markdown table. Timings on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llada_scale.model.moe import MoEBlock  # noqa: E402
from llada_scale.model.transformer import MLP, ModelConfig  # noqa: E402

SHAPES = {"mini": dict(hidden=2048, inter=512, experts=256, top_k=8, groups=8, topk_groups=4),
          "small": dict(hidden=512, inter=128, experts=64, top_k=8, groups=8, topk_groups=4)}


def build(shape: dict, device, dtype) -> MoEBlock:
    shared = MLP(ModelConfig(hidden_size=shape["hidden"], num_heads=1, num_kv_heads=1,
                             intermediate_size=shape["inter"]))
    block = MoEBlock(shape["hidden"], shape["inter"], shape["experts"], shape["top_k"], shape["groups"],
                     shape["topk_groups"], 2.5, shared)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block.to(device, dtype).train()


def naive_routed(block: MoEBlock, flat, idx, w):
    """Masked per-expert loop over the (token, slot) pairs (the release's training path)."""
    x = flat.repeat_interleave(block.top_k, dim=0)
    flat_idx = idx.reshape(-1)
    y = torch.zeros_like(x)
    ex = block.experts
    for e in range(block.num_experts):
        sel = flat_idx == e
        h = x[sel]
        y[sel] = F.linear(F.silu(F.linear(h, ex.gate_proj[e])) * F.linear(h, ex.up_proj[e]), ex.down_proj[e])
    return (y.view(*w.shape, -1).float() * w.unsqueeze(-1)).sum(1).to(flat.dtype)


def time_path(block, x, path: str, steps: int, device) -> float:
    def once():
        flat = x.reshape(-1, x.shape[-1])
        idx, w, _ = block.gate(flat)
        y = block.routed(flat, idx, w) if path == "grouped" else naive_routed(block, flat, idx, w)
        (y.float().square().mean() + block.shared_experts(x).float().square().mean()).backward()

    once()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    block = build(SHAPES[a.shape], device, dtype)
    x = torch.randn(1, a.tokens, SHAPES[a.shape]["hidden"], device=device, dtype=dtype, requires_grad=True)
    print(f"MoE layer {a.shape} {SHAPES[a.shape]}, {a.tokens} tokens, {device} {dtype}, fwd+bwd, "
          f"torch {torch.__version__}")
    print("| path | s/iter | tokens/s |\n|---|---|---|")
    for path in ("grouped", "naive"):
        s = time_path(block, x, path, a.steps, device)
        print(f"| {path} | {s:.4f} | {a.tokens / s:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
