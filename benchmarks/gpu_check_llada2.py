"""The LLaDA2 rows of ``benchmarks/gpu_check.py`` (section ``llada2``): the MoE backbone of
:mod:`llada_scale.model.llada2_moe` on the device.

* checks (ok / not ok, counted in gpu_check's exit status):

  - ``bf16 vs fp32``: a tiny but complete LLaDA2 (QK-norm, partial rotary, 1 dense + 2 MoE layers with
    group-limited top-k routing and a shared expert) runs one block-diffusion training loss
    (:func:`llada_scale.objectives.losses.compute_loss`, ``[x_t ; x_0]`` mask) forward and backward in bf16 and,
    with the same weights, in float32: loss and gradients (relative L2 over all parameters) within bf16
    tolerances (:data:`BF16_LOSS_TOL`, :data:`BF16_GRAD_TOL`). The share of (token, slot) expert choices that
    agree between the two is recorded (bf16 rounding flips near-ties; a flip moves that token's output by
    O(1), which is what the gradient tolerance must absorb).
  - ``grouped_mm vs loop``: one MoE layer (:class:`llada_scale.model.moe.MoEBlock`, LLaDA2-mini's widths on the
    GPU) forward and backward in bf16 through ``torch._grouped_mm`` (the CUDA path of
    :func:`llada_scale.model.moe.grouped_swiglu`) and through its per-expert loop: output and every gradient
    within :data:`GROUPED_TOL` (relative L2). The routing is the same in both (same router, same inputs), so
    only the GEMMs' summation order differs.

* speed (tokens/s, MFU on ACTIVE parameters, peak memory, the table of gpu_check's speed rows): a
  LLaDA2-mini-shaped slice (the real widths of ``LLADA2_PRESETS["llada2-mini"]``: hidden 2048, 16 heads / 4 KV
  heads of 128, 256 experts of 512, top-8 of 8 groups / 4 eligible, 1 shared expert, vocab 157,184) with 2 layers
  (1 dense + 1 MoE), block-diffusion training steps (block 32, forward, backward, fused AdamW on bf16 weights,
  the trainer's expert-bias/load step) through :func:`gpu_check_rows.train_speed`, the machinery of the dense
  speed rows. Rows: eager grouped vs eager per-expert loop (the loop's ``counts.tolist()`` would make dynamo
  specialise on the routing, so the paths are compared eager); compiled (per layer, as ``train.compile``) with
  the grouped path, without and with full activation checkpointing.

On CUDA the grouped rows use the package's own choice of path (and fail if it is not ``torch._grouped_mm``); on
CPU (``--cpu-dry-run``) ``torch._grouped_mm`` runs too (torch 2.13 has CPU kernels; its meta kernel, hence
compile, wants bf16), so the dry run takes the grouped path by patching ``moe._grouped_mm_ok`` without its
``is_cuda`` test. The LLaDA2 rows are bf16 in the dry run as well (tiny shapes, so CPU bf16 costs little).
"""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import torch

import moe_throughput
from gpu_check_rows import OBJECTIVES, packed_batch, train_speed
from llada_scale.model import moe
from llada_scale.model.llada2_moe import LLADA2_PRESETS, LLaDA2Config, LLaDA2MoeModel
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.objectives.losses import compute_loss

BF16_LOSS_TOL = 1e-2  # relative; bf16 unit roundoff 2^-9 = 2e-3 per rounding, a handful of roundings deep
BF16_GRAD_TOL = 5e-2  # relative L2 of all gradients; also absorbs the routing flips of near-tie tokens
GROUPED_TOL = 1e-2  # relative L2; both paths round the same bf16 products, in another summation order
DRY_MOE = dict(hidden=64, inter=32, experts=16, top_k=4, groups=4, topk_groups=2)  # shapes of moe_throughput


def tiny_config(seq: int) -> LLaDA2Config:
    """A complete LLaDA2 at toy widths (widths multiples of 8: the grouped GEMM's alignment)."""
    return LLaDA2Config(vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                        n_group=4, topk_group=2, max_seq_len=2 * seq, mask_token_id=511)


def mini_slice(dry: bool) -> LLaDA2Config:
    """LLaDA2-mini's widths with 2 layers (1 dense + 1 MoE); the dry run: the tiny widths, 2 layers."""
    if dry:
        return LLaDA2Config(**{**tiny_config(64).to_dict(), "num_layers": 2})
    return LLaDA2Config(**{**LLADA2_PRESETS["llada2-mini"], "num_layers": 2, "max_seq_len": 4096})


def _twin_grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """``moe._grouped_mm_ok`` without its CUDA test (the CPU twin of the grouped path)."""
    return (hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 and w.dtype == x.dtype
            and x.shape[-1] % 8 == 0 and w.shape[1] % 8 == 0)


@contextlib.contextmanager
def expert_path(path: str, device):
    """Run the routed experts through ``torch._grouped_mm`` (``"grouped"``: on CUDA the package's own choice,
    on CPU the twin) or the per-expert loop (``"loop"``) inside the block."""
    ok = (lambda x, w: False) if path == "loop" else (moe._grouped_mm_ok if device.type == "cuda" else _twin_grouped_ok)
    with mock.patch.object(moe, "_grouped_mm_ok", ok):
        yield


def _uses_grouped(hidden: int, inter: int, device) -> bool:
    """Whether grouped_swiglu takes the ``torch._grouped_mm`` path for bf16 experts [E, inter, hidden] on
    ``device`` (under the current :func:`expert_path`)."""
    w = torch.empty(1, inter, hidden, device=device, dtype=torch.bfloat16)
    return bool(moe._grouped_mm_ok(torch.empty(1, hidden, device=device, dtype=torch.bfloat16), w))


def _require_grouped(hidden: int, inter: int, device):
    if not _uses_grouped(hidden, inter, device):
        raise RuntimeError(f"grouped_swiglu does not take torch._grouped_mm on {device} in bf16 (torch "
                           f"{torch.__version__}): the grouped path was not measured")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------- checks
def _block_loss(model, batch, cfg, device):
    """Block-diffusion loss (block 32) and gradients of ``model``; the expert choices of every MoE forward."""
    choices = []
    hooks = [block.gate.register_forward_hook(lambda _m, _i, out: choices.append(out[0]))
             for _, block in model.moe_layers()]
    noise = torch.Generator(device=device).manual_seed(2)
    model.zero_grad(set_to_none=True)
    loss, _ = compute_loss(model, batch, ObjectiveConfig(**OBJECTIVES["block"]), False, cfg.mask_token_id, noise)
    loss.backward()
    for h in hooks:
        h.remove()
    return float(loss.detach()), [p.grad.float() for p in model.parameters()], choices


def bf16_row(device, dry: bool) -> dict:
    """A tiny LLaDA2's block-diffusion loss and gradients, bf16 vs float32 (same weights, same noise)."""
    seq = 64 if dry else 256
    cfg = tiny_config(seq)
    torch.manual_seed(0)
    ref = LLaDA2MoeModel(cfg).to(device).train()
    model = copy.deepcopy(ref).to(torch.bfloat16)  # the routers' expert_bias stays float32, as in training
    batch = packed_batch(2, seq, cfg.vocab_size, torch.Generator().manual_seed(1), device, mean_doc=seq // 2)
    with expert_path("grouped", device):
        loss16, g16, idx16 = _block_loss(model, batch, cfg, device)
    loss32, g32, idx32 = _block_loss(ref, batch, cfg, device)
    rel = abs(loss16 - loss32) / abs(loss32)
    grad = rel_l2(torch.cat([g.flatten() for g in g16]), torch.cat([g.flatten() for g in g32]))
    agree = [float((a.sort(-1)[0] == b.sort(-1)[0]).float().mean()) for a, b in zip(idx16, idx32)]
    return {"check": "llada2 bf16 vs fp32, block diffusion loss + grads", "length": 2 * seq, "max_rel_diff": rel,
            "grad_rel_l2": grad, "routing_agreement": min(agree),
            "grad_rel_l2_worst_tensor": max(rel_l2(a, b) for a, b in zip(g16, g32)),
            "ok": rel < BF16_LOSS_TOL and grad < BF16_GRAD_TOL}


def grouped_row(device, dry: bool) -> dict:
    """One MoE layer forward + backward in bf16, ``torch._grouped_mm`` vs the per-expert loop."""
    shape, tokens = (DRY_MOE, 256) if dry else (moe_throughput.SHAPES["mini"], 4096)
    torch.manual_seed(0)
    block = moe_throughput.build(shape, device, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, tokens, shape["hidden"], generator=gen).to(device, torch.bfloat16)
    dy = torch.randn(1, tokens, shape["hidden"], generator=gen).to(device)
    out = {}
    for path in ("grouped", "loop"):
        with expert_path(path, device):
            if path == "grouped":
                _require_grouped(shape["hidden"], shape["inter"], device)
            x = x0.clone().requires_grad_()
            block.zero_grad(set_to_none=True)
            y = block(x)
            (y.float() * dy).sum().backward()
            out[path] = [y, x.grad] + [p.grad for p in block.parameters()]
    errs = [rel_l2(a, b) for a, b in zip(out["grouped"], out["loop"])]
    return {"check": f"llada2 MoE layer grouped_mm vs loop, bf16, {shape['experts']} experts top-{shape['top_k']}",
            "length": tokens, "max_rel_diff": errs[0], "grad_rel_l2": max(errs[1:]), "ok": max(errs) < GROUPED_TOL}


# -------------------------------------------------------------------------------------------- speed
def speed_plan(dry: bool, compile_backend: str) -> list[tuple]:
    """(label, activation checkpointing, expert path, compile backend or None) in order of value, the cheap
    eager rows first: a cold inductor compile of the slice (dense layer + a MoE layer in several graphs) may take
    most of the section's budget, and a row that has started runs to its end."""
    return [("eager, grouped_mm", "none", "grouped", None),
            ("eager, per-expert loop", "none", "loop", None),
            ("compiled, grouped_mm", "none", "grouped", compile_backend),
            ("compiled, grouped_mm", "full", "grouped", compile_backend)]


def speed_row(label: str, ac: str, path: str, backend: str | None, dry: bool, steps: int, warmup: int,
              device) -> dict:
    """Block-diffusion training steps of the mini slice (micro 4 x seq 2048: 16,384 model tokens per step)."""
    cfg = mini_slice(dry)
    micro, seq = (2, 64) if dry else (4, 2048)
    with expert_path(path, device):
        if path == "grouped":
            _require_grouped(cfg.hidden_size, cfg.moe_intermediate_size, device)
        row = train_speed(f"llada2-mini shape, 2 layers, {label}", cfg, "block", ac, micro, seq, steps, warmup,
                          device, torch.bfloat16, backend)
    return {**row, "expert_path": "grouped_mm" if path == "grouped" else "loop"}


__all__ = ["BF16_LOSS_TOL", "BF16_GRAD_TOL", "GROUPED_TOL", "tiny_config", "mini_slice", "expert_path", "bf16_row",
           "grouped_row", "speed_plan", "speed_row"]
