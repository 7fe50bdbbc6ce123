"""Mixture-of-experts feed-forward of LLaDA2.x: the sigmoid router with its selection bias and group-limited
top-k, the routed experts as stacked weight tensors computed on tokens grouped by expert, the shared experts,
and the router statistics the trainer reads (load per expert, entropy, sequence-level auxiliary loss).

Routing follows the released ``modeling_llada2_moe.py`` (inclusionAI LLaDA2.0/2.1, ``LLaDA2MoeGate``), which is
DeepSeek-V3's scheme (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv 2412.19437, Sec. 2.1.2):
scores s = sigmoid(x W_r^T) in float32; the selection uses s + b (b: ``expert_bias``, a buffer, changed only
by the auxiliary-loss-free balancing update, never by gradients); experts are grouped into ``n_group`` groups,
a group's score is the sum of its two best biased scores, only the ``topk_group`` best groups are eligible,
and the ``num_experts_per_tok`` best eligible experts are chosen; their weights are the *unbiased* s,
normalised to sum 1 (when more than one expert is chosen) and multiplied by ``routed_scaling_factor``.

Expert compute is dropless token choice in grouped form: the (token, expert) pairs are sorted by expert, each
expert multiplies one contiguous slice of the permuted tokens (``torch._grouped_mm`` in one call on CUDA when
available, one GEMM per expert with tokens otherwise), and the outputs are un-permuted and combined with the
routing weights in float32. No tokens x experts dense product is ever formed.

The whole block, statistics and auxiliary loss included, compiles without a graph break (``torch.compile`` per
decoder layer, with or without activation checkpointing; ``tests/model/test_moe_compile.py``): counts have a
static size (:func:`expert_counts`), the statistics are tensors, the per-expert loop is one opaque operator.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RouterStats", "Router", "Experts", "MoEBlock", "route", "grouped_swiglu", "expert_counts", "recomputing"]


def route(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose experts from router logits (the release's ``LLaDA2MoeGate.forward`` after the projection).

    Args:
        logits: float32 [N, E] router logits.
        expert_bias: [E] selection bias (added to the sigmoid scores for the choice only).
        top_k: experts per token; n_group / topk_group: groups and eligible groups per token.
        routed_scaling_factor: multiplier of the normalised weights.
    Returns:
        ``(topk_idx, topk_weight, scores)``: int64 [N, top_k] chosen experts (best biased score first),
        float32 [N, top_k] their weights, float32 [N, E] the unbiased sigmoid scores.
    """
    n, e = logits.shape
    scores = torch.sigmoid(logits.float())
    biased = scores + expert_bias.float()
    group_scores = biased.view(n, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)  # [N, G]
    groups = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    eligible = group_mask[:, :, None].expand(n, n_group, e // n_group).reshape(n, e)
    topk_idx = torch.topk(biased.masked_fill(~eligible, float("-inf")), k=top_k, dim=-1)[1]
    w = scores.gather(1, topk_idx)
    if top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, w * routed_scaling_factor, scores


def recomputing() -> bool:
    """True while eager activation checkpointing recomputes a forward inside the backward (an autograd graph
    task is running: ``torch._C._current_graph_task_id() != -1``).

    Under ``torch.compile`` (the call is then never traced) always False: a checkpoint inside the compiled
    region (:func:`llada_scale.training.parallelize.apply_compile`, which compiles the checkpointed decoder layer)
    becomes dynamo's checkpoint operator, whose recompute is part of the compiled backward graph and runs no
    Python, so the forward's recorded side effects (the statistics) happen once per forward, as in eager. Not
    covered: a compiled module called inside an *eager* ``checkpoint`` re-runs its compiled code, statistics
    included, in the backward (no configuration of the trainer does this)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def expert_counts(topk_idx: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(token, expert) pairs per expert: [num_experts] in ``dtype`` from int64 ``topk_idx`` [N, top_k].

    Equal to ``torch.bincount(topk_idx.flatten(), minlength=num_experts)`` (exact in float32 below 2^24 pairs
    per expert), but with a static output size, so ``torch.compile`` traces it (bincount's size depends on the
    data: a graph break)."""
    flat = topk_idx.reshape(-1)
    return torch.zeros(num_experts, device=flat.device, dtype=dtype).scatter_add_(
        0, flat, torch.ones(flat.shape, device=flat.device, dtype=dtype))


class RouterStats:
    """Training-time statistics of a router, kept on the router object for the trainer
    (:mod:`llada_scale.training.moe_balance`): after :meth:`observe` of a training forward, ``last_load``
    (float32 [E], (token, expert) pairs per expert, detached), ``last_entropy`` (mean entropy of the normalised
    scores, nats), their running sums (:meth:`take_stats`; forwards recomputed by activation checkpointing inside
    the backward are not counted) and, when ``aux_loss_coef > 0``, ``aux_loss`` (:meth:`sequence_aux_loss`).
    Shared by :class:`Router` and the routers of DeepSpeed's expert-parallel layers
    (:mod:`llada_scale.training.expert_parallel`)."""

    def init_stats(self, top_k: int) -> None:
        self.top_k, self.aux_loss_coef = top_k, 0.0
        self.last_load = self.last_entropy = self.aux_loss = self.load_sum = self.entropy_sum = None
        self.forwards = None  # float32 0-d tensor once observed (a Python int: a torch.compile guard)

    def observe(self, scores: torch.Tensor, topk_idx: torch.Tensor, seq_shape: tuple[int, int] | None) -> None:
        """Record a training forward: ``scores`` float32 [N, E] unbiased sigmoid scores (with gradient),
        ``topk_idx`` int64 [N, top_k] the chosen experts, ``seq_shape`` (B, L) with N = B L (None: no aux loss).

        Traceable by ``torch.compile`` without a graph break: the sums are tensors, rebound (not mutated in
        place), so a compiled layer has two variants at most (sums None: first forward after :meth:`take_stats`;
        sums present: later forwards of a gradient-accumulation step), the loads a fixed-size count
        (:func:`expert_counts`), and the recompute test :func:`recomputing`."""
        if not recomputing():
            with torch.no_grad():  # statistics only
                self.last_load = expert_counts(topk_idx, scores.shape[1], torch.float32)
                p = scores / scores.sum(-1, keepdim=True)
                self.last_entropy = -(p * p.clamp_min(1e-20).log()).sum(-1).mean()
                if self.load_sum is None:
                    self.load_sum, self.entropy_sum = self.last_load, self.last_entropy
                    self.forwards = torch.ones((), device=scores.device)
                else:
                    self.load_sum = self.load_sum + self.last_load
                    self.entropy_sum = self.entropy_sum + self.last_entropy
                    self.forwards = self.forwards + 1
        # also in a recompute, which must save the same tensors as the forward
        self.aux_loss = (self.sequence_aux_loss(scores, topk_idx, seq_shape)
                         if self.aux_loss_coef > 0 and seq_shape is not None else None)

    def take_stats(self):
        """``(load_sum [E], entropy_sum, forwards)`` accumulated since the last call (training forwards outside
        backward recomputes; ``forwards`` a Python int, read with one device sync), then reset;
        ``(None, None, 0)`` when there were none."""
        out = (self.load_sum, self.entropy_sum, int(self.forwards)) if self.forwards is not None else (None, None, 0)
        self.load_sum = self.entropy_sum = self.forwards = None
        return out

    def sequence_aux_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, seq_shape: tuple[int, int]):
        """DeepSeek-V3's complementary sequence-wise balance loss (Sec. 2.1.2, eqs. 17-20), unscaled:
        mean over sequences of sum_e f_e P_e, f_e = E / (K T) * #(tokens of the sequence routed to e),
        P_e = mean over the sequence's tokens of s_e / sum_j s_j. float32 scalar with gradient to the router."""
        b, t = seq_shape
        e = scores.shape[1]
        counts = torch.zeros(b, e, device=scores.device).scatter_add_(
            1, topk_idx.view(b, t * self.top_k), torch.ones(b, t * self.top_k, device=scores.device))
        f = counts * (e / (self.top_k * t))
        p = (scores / scores.sum(-1, keepdim=True)).view(b, t, e).mean(1)
        return (f * p).sum(-1).mean()


class Router(RouterStats, nn.Module):
    """The gate: ``weight`` [E, hidden] (a parameter) and ``expert_bias`` [E] (a persistent float32 buffer,
    kept float32 when the module is cast so that small balancing updates are not rounded away).

    ``forward(x [N, hidden], seq_shape=None)`` -> ``(topk_idx, topk_weight, scores)`` as :func:`route`; in
    training mode it records the statistics of :class:`RouterStats`.
    """

    # DeepSpeed's zero.Init casts every floating tensor made in a constructor to the training dtype; DeepSpeed
    # builds that honour transformers' list (deepspeed/runtime/keep_in_fp32.py) put this buffer back to float32
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["expert_bias"]

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                 routed_scaling_factor: float):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.init_stats(top_k)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32 and self.expert_bias.device.type != "meta":
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x: torch.Tensor, seq_shape: tuple[int, int] | None = None):
        logits = F.linear(x.float(), self.weight.float())
        topk_idx, topk_weight, scores = route(logits, self.expert_bias, self.top_k, self.n_group, self.topk_group,
                                              self.routed_scaling_factor)
        if self.training:
            self.observe(scores, topk_idx, seq_shape)
        return topk_idx, topk_weight, scores


class Experts(nn.Module):
    """Routed SwiGLU experts as stacked weights (dFactory's merged layout): ``gate_proj``, ``up_proj``
    [E, moe_intermediate, hidden] and ``down_proj`` [E, hidden, moe_intermediate]; expert e computes
    down_e(silu(gate_e x) * up_e x) like ``nn.Linear`` weights ``gate_proj[e]`` ...."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_sorted, counts, self.gate_proj, self.up_proj, self.down_proj)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 and w.dtype == x.dtype
            and x.shape[-1] % 8 == 0 and w.shape[1] % 8 == 0)


def grouped_swiglu(x_sorted: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU of tokens already grouped by expert.

    Args:
        x_sorted: [M, hidden] rows sorted by expert (expert 0's rows first).
        counts: int64 [E] rows per expert (sums to M).
        w_gate, w_up: [E, I, hidden]; w_down: [E, hidden, I].
    Returns:
        [M, hidden] in x's dtype. On CUDA with bf16 and aligned shapes one ``torch._grouped_mm`` per projection
        (offsets = cumulative counts); otherwise one matmul per expert with rows (contiguous slices). Under
        ``torch.compile`` the per-expert loop (its ``counts.tolist()`` is a graph break) runs as the opaque
        operator ``llada_scale::expert_loop_swiglu`` with a hand-written backward (:func:`_loop_backward`).
    """
    if _grouped_mm_ok(x_sorted, w_gate):
        offs = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x_sorted, w_gate.transpose(1, 2), offs=offs)) * \
            torch._grouped_mm(x_sorted, w_up.transpose(1, 2), offs=offs)
        return torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs)
    if torch.compiler.is_compiling():
        return expert_loop_swiglu(x_sorted, counts, w_gate, w_up, w_down)
    return _loop_swiglu(x_sorted, counts, w_gate, w_up, w_down)


def _loop_swiglu(x_sorted, counts, w_gate, w_up, w_down):
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        xe = x_sorted[start:start + c]
        outs.append(F.linear(F.silu(F.linear(xe, w_gate[e])) * F.linear(xe, w_up[e]), w_down[e]))
        start += c
    return torch.cat(outs, 0) if outs else x_sorted.new_zeros(0, w_down.shape[1])


@torch.library.custom_op("llada_scale::expert_loop_swiglu", mutates_args=())
def expert_loop_swiglu(x_sorted: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                       w_down: torch.Tensor) -> torch.Tensor:
    """The per-expert loop of :func:`grouped_swiglu` as one operator (same arguments and result), which
    ``torch.compile`` keeps whole: its output shape [M, hidden] is static, the data-dependent split inside."""
    return _loop_swiglu(x_sorted, counts, w_gate, w_up, w_down)


@expert_loop_swiglu.register_fake
def _(x_sorted, counts, w_gate, w_up, w_down):
    return x_sorted.new_empty(x_sorted.shape[0], w_down.shape[1])


@torch.library.custom_op("llada_scale::expert_loop_swiglu_backward", mutates_args=())
def _loop_backward(grad: torch.Tensor, x_sorted: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """Gradients (x_sorted, w_gate, w_up, w_down) of :func:`expert_loop_swiglu` for the output gradient
    ``grad`` [M, hidden], per expert e with rows x (g = x W_g^T, u = x W_u^T, a = silu(g) u, y = a W_d^T):
    dW_d = dy^T a, da = dy W_d, du = da silu(g), dg = da u s (1 + g (1 - s)) with s = sigmoid(g) (silu'),
    dx = dg W_g + du W_u, dW_g = dg^T x, dW_u = du^T x. Experts without rows get zero weight gradients."""
    dx, dwg, dwu, dwd = (torch.zeros_like(t) for t in (x_sorted, w_gate, w_up, w_down))
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        x, dy = x_sorted[start:start + c], grad[start:start + c]
        g, u = F.linear(x, w_gate[e]), F.linear(x, w_up[e])
        s = torch.sigmoid(g)
        silu = g * s
        da = dy @ w_down[e]
        du = da * silu
        dg = da * u * s * (1 + g * (1 - s))
        dwd[e] = dy.t() @ (silu * u)
        dx[start:start + c] = dg @ w_gate[e] + du @ w_up[e]
        dwg[e], dwu[e] = dg.t() @ x, du.t() @ x
        start += c
    return dx, dwg, dwu, dwd


@_loop_backward.register_fake
def _(grad, x_sorted, counts, w_gate, w_up, w_down):
    return tuple(torch.empty_like(t) for t in (x_sorted, w_gate, w_up, w_down))


def _loop_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _loop_grad(ctx, grad):
    x_sorted, counts, w_gate, w_up, w_down = ctx.saved_tensors
    dx, dwg, dwu, dwd = _loop_backward(grad, x_sorted, counts, w_gate, w_up, w_down)
    return dx, None, dwg, dwu, dwd


expert_loop_swiglu.register_autograd(_loop_grad, setup_context=_loop_setup)


class MoEBlock(nn.Module):
    """LLaDA2's sparse MoE feed-forward: ``gate`` (:class:`Router`), ``experts`` (:class:`Experts`) and
    ``shared_experts`` (a dense SwiGLU of ``moe_intermediate_size * num_shared_experts``, given as ``shared``).

    ``forward(x [B, L, hidden])`` -> [B, L, hidden] in x's dtype: sum_k w_k expert_{i_k}(x) (combined in
    float32, then cast, as the release) + shared_experts(x).
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, num_experts: int, top_k: int, n_group: int,
                 topk_group: int, routed_scaling_factor: float, shared: nn.Module):
        super().__init__()
        self.gate = Router(hidden_size, num_experts, top_k, n_group, topk_group, routed_scaling_factor)
        self.experts = Experts(num_experts, hidden_size, moe_intermediate_size)
        self.shared_experts = shared
        self.top_k, self.num_experts = top_k, num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        flat = x.reshape(-1, d)
        topk_idx, topk_weight, _ = self.gate(flat, (b, l))
        y = self.routed(flat, topk_idx, topk_weight)
        return y.view(b, l, d) + self.shared_experts(x)

    def routed(self, flat: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """sum_k topk_weight[:, k] * expert_{topk_idx[:, k]}(flat), [N, hidden] in flat's dtype: (token, expert)
        pairs sorted by expert (stable), grouped GEMMs, un-permuted, weighted sum in float32."""
        n, e = flat.shape[0], self.num_experts
        pairs = topk_idx.reshape(-1)
        order = torch.argsort(pairs, stable=True)
        counts = expert_counts(pairs, e, torch.int64)
        out_sorted = self.experts(flat.index_select(0, order // self.top_k), counts)
        out = out_sorted.new_zeros(out_sorted.shape).index_copy(0, order, out_sorted)  # back to (token, k) order
        y = (out.view(n, self.top_k, -1).float() * topk_weight.unsqueeze(-1)).sum(1)
        return y.to(flat.dtype)
