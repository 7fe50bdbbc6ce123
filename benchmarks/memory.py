"""Memory tables: the memory-lean loss and activation checkpointing measured on CPU, and the LLaDA-8B plan.

    python benchmarks/memory.py loss        # peak RSS of head + loss, vocab 126,464, seq 2048: plain vs lean
    python benchmarks/memory.py checkpoint  # peak RSS of a training step per activation_checkpointing mode
    python benchmarks/memory.py estimate    # llada-8b on 2 x 8 GPUs, ZeRO-3: DeepSpeed's model-state estimator
                                            # + activations at seq 4096, micro batch 1, full checkpointing
    python benchmarks/memory.py sp          # llada-8b 32k SFT, 2 x 8 GPUs, ZeRO-3, full checkpointing: memory per
                                            # GPU for sequence_parallel_size 1, 2, 4, 8 (computed)
    python benchmarks/memory.py sp-measure  # the same formula against a measured CPU slice: 30m preset, seq 4096,
                                            # one training step at SP = 1 (1 process) and SP = 2 (2 processes)
    python benchmarks/memory.py startup     # host and GPU memory per rank at ZeRO-3 start-up with init_from:
                                            # full model per rank (train.zero3_init=false) vs partitioned (issue 19)

Each CPU measurement runs in a fresh process and reports its peak resident memory (``ru_maxrss``) minus the
resident memory just before the measured step, so what the inputs and weights already hold is not counted.
On a GPU, ``benchmarks/gpu_check.py`` measures the same with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_loss(variant: str, positions: int, hidden: int, vocab: int) -> dict:
    from llada_scale.model.head import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(positions, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (positions,), generator=g)
    masked = torch.rand(positions, generator=g) < 0.5  # diffusion: half the positions masked at mean t
    w.grad = torch.zeros_like(w)  # the weight gradient exists in both variants: not part of the difference
    h.grad = torch.zeros_like(h)
    before = rss_gb()
    if variant == "plain":  # logits of every position, then the masked-token CE (what the objectives did)
        ce = F.cross_entropy(F.linear(h, w).float()[masked], labels[masked], reduction="none")
    else:
        keep = masked.nonzero().squeeze(1)
        ce = linear_cross_entropy(h[keep], w, labels[keep])
    ce.sum().backward()
    return {"variant": variant, "positions": positions, "hidden": hidden, "vocab": vocab,
            "extra_peak_gb": peak_rss_gb() - before}


def _step_inputs(model, micro: int, seq: int) -> dict:
    """Preallocate ``model``'s gradients (so a step's weight gradients are not counted as activations) and return
    a random one-document pretraining batch of ``micro`` x ``seq`` minimind tokens."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    g = torch.Generator().manual_seed(1)
    shape = (micro, seq)
    return {"input_ids": torch.randint(0, 6400, shape, generator=g), "position_ids": torch.arange(seq).expand(*shape),
            "document_ids": torch.zeros(shape, dtype=torch.int32), "prompt_mask": torch.zeros(shape, dtype=torch.bool),
            "padding_mask": torch.zeros(shape, dtype=torch.bool)}


def measure_checkpoint(mode: str, preset_name: str, seq: int, micro: int) -> dict:
    from llada_scale.model.transformer import Transformer, preset
    from llada_scale.objectives.config import ObjectiveConfig
    from llada_scale.objectives.losses import compute_loss
    from llada_scale.training.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = preset(preset_name, causal=False, mask_token_id=6400, max_seq_len=seq, attention_backend="sdpa")
    model = Transformer(cfg)
    layers = apply_activation_checkpointing(model, mode, every=2)
    batch = _step_inputs(model, micro, seq)
    before = rss_gb()
    loss, _ = compute_loss(model, batch, ObjectiveConfig(random_length_prob=0.0), False, 6400,
                           torch.Generator().manual_seed(2))
    loss.backward()
    return {"activation_checkpointing": f"{mode} ({len(layers)}/{cfg.num_layers} layers)", "preset": preset_name,
            "micro x seq": f"{micro} x {seq}", "extra_peak_gb": peak_rss_gb() - before}


def activation_bytes(cfg, seq: int, micro: int = 1, sp: int = 1, elem: int = 2, masked: float = 0.5) -> dict:
    """Activation memory per rank of one training step with full activation checkpointing (bytes, computed).

    ``cfg``: a ModelConfig; ``seq`` x ``micro`` tokens per row batch, of which each of the ``sp`` sequence-parallel
    ranks holds 1/sp; ``elem`` bytes per activation (2 bf16, 4 fp32); ``masked``: share of positions the head runs
    on (diffusion: t ~ U(0, 1) masks half on average). Terms: the bf16 input of every layer kept for the backward;
    one layer recomputed with its gradients alive (q, k, v, attention output, o-proj input, 2 norm outputs and the
    residual: 2 Hd + 2 Hkv D + 3 d; the MLP gate/up/silu/product 4 f; x2 for the gradients; after Ulysses'
    all-to-all a rank holds [S, H/SP, D] instead of [S/SP, H, D], the same size); the all-to-all buffers of q, k,
    v and the output (a send and a receive copy each, transient, 0 without SP); the head's selected hidden states
    and their gradient plus three float32 logits chunks (:func:`llada_scale.model.head.default_chunk_size` rows, or
    the masked positions when fewer). Attention scores are never materialised (FlexAttention on GPU); the [B, S]
    masks and gathered per-token losses are ignored (< 1 MB; the CPU path's dense S x S mask is not counted).
    """
    from llada_scale.model.head import default_chunk_size

    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    hd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    tokens = seq * micro / sp
    out = {"layer inputs (full checkpointing)": n * tokens * d * elem,
           "one layer recomputed (activations + grads)": 2 * tokens * (2 * hd + 2 * kvd + 3 * d + 4 * f) * elem,
           "all-to-all buffers (q, k, v, out)": 0 if sp == 1 else 2 * tokens * (2 * hd + 2 * kvd) * elem,
           "head + loss, memory-lean": masked * tokens * d * elem * 2
           + 3 * min(default_chunk_size(cfg.vocab_size), masked * tokens) * cfg.vocab_size * 4}
    out["activations"] = sum(out.values())
    return out


def llada8b_states(nodes: int, gpus_per_node: int) -> tuple[float, float]:
    """(model states, gathered parameters in flight) per GPU in bytes for llada-8b at ZeRO-3, no offload:
    DeepSpeed's formula (stage3.py ``estimate_zero3_model_states_mem_needs``: 18 bytes per parameter = bf16 weight
    2 + fp32 gradient 4 + fp32 master, Adam m, v 12, over all GPUs; its + 4 B x the largest layer is the gathered
    head, counted once, in the second value) and the prefetch of two layers + the gathered head in bf16."""
    from llada_scale.model.transformer import preset

    cfg = preset("llada-8b")
    d, f, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    layer = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o (32 kv heads), gate/up/down, two norms
    total, largest = n * layer + 2 * v * d + d, v * d
    # DeepSpeed's extra 4 B x largest layer is the gathered head, counted in `gathered` (issue 21: it was counted twice)
    return 18 * total / (nodes * gpus_per_node), 2 * layer * 2 + largest * 2


def llada8b_extras(tokens: float) -> list[tuple[str, float]]:
    """What DeepSpeed's estimate and the activation terms miss (issue 21), per GPU in bytes, for ``tokens`` tokens
    on this rank: the head's full-size weight gradient before ZeRO-3 reduce-scatters it (the float32 sum over loss
    chunks of model/head.py + one bf16 chunk product, then the bf16 gradient and its float32 communication copy:
    ~3 x 2 bytes x V d at the peak; the embedding's gradient peaks later, not at the same time), the eager float32
    tensors of the recomputed layer (compile is off under ZeRO-3: RMSNorm's x.float() and normalised copy, 2 norms
    x 2, RoPE's float32 q, k and rotated copies, 4; each [tokens, d] float32) and the CUDA context (~0.5 GB) + NCCL
    buffers for 16 ranks (~1 GB), outside the allocator."""
    from llada_scale.model.transformer import preset

    cfg = preset("llada-8b")
    d, v = cfg.hidden_size, cfg.vocab_size
    return [("head weight gradient before reduce-scatter (fp32 sum, bf16, fp32 comm copy)", 3 * 2 * v * d),
            ("eager float32 norm / RoPE tensors of the recomputed layer", (2 * 2 + 4) * tokens * d * 4),
            ("CUDA context + NCCL buffers (not in max_memory_allocated)", 1.5 * 2**30)]


def sp_table(seq: int = 32768, micro: int = 1, nodes: int = 2, gpus_per_node: int = 8, masked: float = 0.5) -> str:
    """Per-GPU memory of llada-8b at ``seq`` tokens for sequence_parallel_size 1, 2, 4, 8 (ZeRO-3 over all GPUs,
    full activation checkpointing, bf16): a markdown table (GB = 2**30 bytes)."""
    from llada_scale.model.transformer import preset

    cfg = preset("llada-8b", max_seq_len=seq)
    states, gathered = llada8b_states(nodes, gpus_per_node)
    sps = [1, 2, 4, 8]
    rows = {sp: activation_bytes(cfg, seq, micro, sp, 2, masked) for sp in sps}
    extras = {sp: llada8b_extras(seq * micro / sp) for sp in sps}
    lines = [f"\nllada-8b, seq {seq}, micro batch {micro}, {nodes} x {gpus_per_node} GPUs, ZeRO-3, full activation "
             f"checkpointing, bf16, masked share {masked}", "",
             "| per GPU, GB | " + " | ".join(f"SP {sp}" for sp in sps) + " |", "|---|" + "---:|" * len(sps)]
    for key in rows[1]:
        lines.append(f"| {key} | " + " | ".join(f"{rows[sp][key] / 2**30:.2f}" for sp in sps) + " |")
    lines.append("| model states (DeepSpeed formula) | " + " | ".join(f"{states / 2**30:.2f}" for _ in sps) + " |")
    lines.append("| gathered parameters in flight | " + " | ".join(f"{gathered / 2**30:.2f}" for _ in sps) + " |")
    for i, (name, _) in enumerate(extras[1]):
        lines.append(f"| {name} | " + " | ".join(f"{extras[sp][i][1] / 2**30:.2f}" for sp in sps) + " |")
    totals = {sp: rows[sp]["activations"] + states + gathered + sum(b for _, b in extras[sp]) for sp in sps}
    lines.append("| **total** | " + " | ".join(f"**{totals[sp] / 2**30:.2f}**" for sp in sps) + " |")
    lines.append("| data-parallel size (rows in flight) | " + " | ".join(str(nodes * gpus_per_node // sp) for sp in sps)
                 + " |")
    return "\n".join(lines)


def estimate(nodes: int = 2, gpus_per_node: int = 8, seq: int = 4096, micro: int = 1) -> str:
    """DeepSpeed's ZeRO-3 model-state estimate for the llada-8b preset + an activation estimate."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    from llada_scale.model.transformer import preset

    cfg = preset("llada-8b")
    d, f, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    total = n * (4 * d * d + 3 * d * f + 2 * d) + 2 * v * d + d
    estimate_zero3_model_states_mem_needs_all_cold(total, v * d, num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    act = activation_bytes(cfg, seq, micro)
    plain_head = seq * micro * v * (2 + 4 + 4)  # bf16 logits, float32 copy, float32 softmax gradient
    states, gathered = llada8b_states(nodes, gpus_per_node)
    extras = llada8b_extras(seq * micro)
    rows = [("model states (18 B/param / GPUs)", states),
            ("full-checkpoint layer inputs", act["layer inputs (full checkpointing)"]),
            ("one layer recomputed (activations + grads)", act["one layer recomputed (activations + grads)"]),
            ("output head + loss, memory-lean", act["head + loss, memory-lean"]),
            ("(output head + loss, plain full logits)", plain_head),
            ("gathered parameters in flight (2 layers + head)", gathered), *extras]
    lines = [f"\nllada-8b: {total / 1e9:.2f}B params, largest layer {v * d / 1e6:.0f}M, seq {seq}, micro batch "
             f"{micro}, {nodes} x {gpus_per_node} GPUs, ZeRO-3, full activation checkpointing", "",
             "| per GPU | GB |", "|---|---:|"]
    for name, value in rows:
        lines.append(f"| {name} | {value / 2**30:.2f} |")
    total_gb = (states + act["activations"] + gathered + sum(b for _, b in extras)) / 2**30
    lines.append(f"| total, memory-lean loss | {total_gb:.2f} |")
    return "\n".join(lines)


def measure_sp(preset_name: str, seq: int, micro: int) -> dict:
    """One diffusion training step of ``preset_name`` (fp32, full activation checkpointing) on this rank of a
    torch.distributed world whose size is the sequence-parallel size (``llada_scale.testing.run_ranks`` starts
    it); returns this rank's extra peak RSS and what :func:`activation_bytes` predicts for it (fp32)."""
    import torch.distributed as dist

    from llada_scale.model.transformer import Transformer, preset
    from llada_scale.objectives.config import ObjectiveConfig
    from llada_scale.objectives.losses import compute_loss
    from llada_scale.training import sequence_parallel as sp
    from llada_scale.training.config import RunConfig
    from llada_scale.training.engine import init_distributed
    from llada_scale.training.parallelize import apply_activation_checkpointing

    rank, _, world = init_distributed()
    torch.manual_seed(0)
    cfg = preset(preset_name, causal=False, vocab_size=6464, mask_token_id=6400, max_seq_len=seq,
                 attention_backend="sdpa")
    model = Transformer(cfg)
    apply_activation_checkpointing(model, "full")
    run = RunConfig()
    run.model, run.data.seq_len = cfg, seq
    run.train.sequence_parallel_size, run.train.micro_batch_size, run.train.global_batch_size = world, micro, micro
    plan = sp.setup(run, rank, world)
    sp.install(model, plan)
    batch = _step_inputs(model, micro, seq)
    dist.barrier()
    before = rss_gb()
    loss, stats = compute_loss(sp.model_for_loss(model, plan, cfg), batch, ObjectiveConfig(random_length_prob=0.0),
                               False, 6400, torch.Generator().manual_seed(2))
    loss.backward()
    peak = peak_rss_gb() - before
    masked = float(stats["head_tokens"]) / (seq * micro)
    predicted = activation_bytes(cfg, seq, micro, world, elem=4, masked=masked)["activations"] / 2**30
    return {"sp": world, "rank": rank, "preset": preset_name, "micro x seq": f"{micro} x {seq}",
            "masked share": masked, "measured_gb": peak, "formula_gb": predicted}


def sp_measure(preset_name: str, seq: int, micro: int) -> list[dict]:
    """:func:`measure_sp` at SP = 1 (one process) and SP = 2 (two processes), one row per rank."""
    from llada_scale.testing import run_ranks

    rows = []
    for world in (1, 2):
        arg = json.dumps(dict(preset_name=preset_name, seq=seq, micro=micro))
        for r in run_ranks([__file__, "--child", "sp", arg], world, timeout=1800):
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return rows


def startup(model: str = "llada-8b", nodes: int = 2, gpus_per_node: int = 8) -> str:
    """Host RAM and GPU memory per rank at the ZeRO-3 start-up (bf16, init_from a bf16 consolidated directory),
    computed from the parameter counts of a meta-device build of the preset.

    Full model per rank (``train.zero3_init=false``): every rank builds the fp32 model on the host (4 B/param),
    then reads each init_from tensor (bf16, 2 B) and its fp32 copy (4 B); ``deepspeed.initialize`` moves the
    module to bf16 and moves it whole to the GPU (``module.to(device)`` for a model not built under zero.Init,
    DeepSpeed 0.19 engine.py), then keeps the bf16 partition (2 B/param / world) and the fp32 master partition
    (4 B/param / world). Partitioned (``true``): ``deepspeed.zero.Init`` creates each module on the GPU
    and partitions it when its constructor returns (one full module at a time, at most the largest tensor in
    fp32 from its default init); rank 0 reads one bf16 tensor at a time (2 B x largest) and every rank holds
    the gathered bf16 copy of that tensor on the GPU (2 B x largest) while it is scattered. Not counted: the
    Python/CUDA runtime (~2-4 GB host per process), page cache of the memory-mapped checkpoint (the OS may
    drop it), and Adam's m and v (8 B/param / world), which DeepSpeed allocates at the first step. Both columns
    apply to the dense and the LLaDA2 MoE presets (both build partitioned; the MoE's expert_bias buffers, a few KB,
    are held in full by every rank and not counted).
    """
    from llada_scale.model.registry import build_model, llada2_preset
    from llada_scale.model.transformer import preset

    with torch.device("meta"):
        m = build_model(llada2_preset(model) if model.startswith("llada2") else preset(model))
    total = sum(p.numel() for p in m.parameters())
    largest = max(p.numel() for p in m.parameters())
    world = nodes * gpus_per_node
    gib = 2**30
    rows = [  # (what, full model per rank, partitioned), bytes per rank
        ("host: model built by every rank (fp32)", 4 * total, 0),
        ("host: one init_from tensor being copied (bf16 read + fp32 copy / bf16 read, rank 0)",
         6 * largest, 2 * largest),
        ("GPU: bf16 parameter partition", 2 * total / world, 2 * total / world),
        ("GPU: fp32 master partition (deepspeed.initialize)", 4 * total / world, 4 * total / world),
        ("GPU: transient: the whole bf16 model (deepspeed.initialize moves the module, then partitions) / "
         "one full tensor (module init in fp32, gathered init_from tensor)", 2 * total, 4 * largest),
    ]
    host = [sum(r[i] for r in rows if r[0].startswith("host")) for i in (1, 2)]
    gpu = [sum(r[i] for r in rows if r[0].startswith("GPU")) for i in (1, 2)]
    lines = [f"\n{model}: {total / 1e9:.2f}B params, largest tensor {largest / 1e6:.0f}M, {nodes} x {gpus_per_node} "
             "GPUs, ZeRO-3, bf16, init_from a bf16 consolidated directory", "",
             "| per rank at start-up | full model per rank (GB) | partitioned, zero.Init (GB) |", "|---|---:|---:|"]
    lines += [f"| {what} | {a / gib:.2f} | {b / gib:.2f} |" for what, a, b in rows]
    lines += [f"| **host total per rank** (x {gpus_per_node} per node) | {host[0] / gib:.2f} "
              f"({gpus_per_node * host[0] / gib:.0f}) | {host[1] / gib:.2f} on rank 0, ~0 on the others "
              f"({host[1] / gib:.0f}) |",
              f"| **GPU total per rank** | {gpu[0] / gib:.2f} | {gpu[1] / gib:.2f} |",
              f"| (+ Adam m, v at step 1) | {8 * total / world / gib:.2f} | {8 * total / world / gib:.2f} |"]
    return "\n".join(lines)


def _child(kind: str, arg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(arg)], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", nargs="?", choices=["loss", "checkpoint", "estimate", "sp", "sp-measure", "startup"],
                   default="estimate",
                   help="which table (default estimate)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--positions", type=int, default=2048, help="loss: positions (seq x micro batch)")
    p.add_argument("--hidden", type=int, default=1024, help="loss: hidden size (the head weight is vocab x hidden)")
    p.add_argument("--vocab", type=int, default=126464, help="loss: vocabulary (LLaDA-8B: 126,464)")
    p.add_argument("--preset", help="checkpoint / sp-measure: model preset (default small / 30m)")
    p.add_argument("--seq", type=int, help="checkpoint / sp / sp-measure: sequence length (1024 / 32768 / 4096)")
    p.add_argument("--micro_batch_size", type=int, help="checkpoint / sp / sp-measure: rows per step (4 / 1 / 1)")
    args = p.parse_args()
    defaults = {"checkpoint": ("small", 1024, 4), "sp": (None, 32768, 1), "sp-measure": ("30m", 4096, 1)}
    preset_d, seq_d, micro_d = defaults.get(args.table, (None, None, None))
    args.preset, args.seq = args.preset or preset_d, args.seq or seq_d
    args.micro_batch_size = args.micro_batch_size or micro_d
    torch.set_num_threads(1)
    if args.child:
        kind, arg = args.child[0], json.loads(args.child[1])
        run = {"loss": measure_loss, "checkpoint": measure_checkpoint, "sp": measure_sp}[kind]
        print(json.dumps(run(**arg)))
        return
    if args.table == "estimate":
        print(estimate())
        return
    if args.table == "sp":
        print(sp_table(seq=args.seq, micro=args.micro_batch_size))
        return
    if args.table == "startup":
        print("\n".join(startup(m) for m in ("llada-8b", "llada2-mini", "llada2-flash")))
        return
    if args.table == "sp-measure":
        rows = sp_measure(args.preset, args.seq, args.micro_batch_size)
    elif args.table == "loss":
        rows = [_child("loss", dict(variant=v, positions=args.positions, hidden=args.hidden, vocab=args.vocab))
                for v in ("plain", "lean")]
    else:
        rows = [_child("checkpoint", dict(mode=m, preset_name=args.preset, seq=args.seq, micro=args.micro_batch_size))
                for m in ("none", "selective", "full")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
