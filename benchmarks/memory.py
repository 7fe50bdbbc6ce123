"""Memory tables: the memory-lean loss and activation checkpointing measured on CPU, and the LLaDA-8B plan.

    python benchmarks/memory.py loss        # peak RSS of head + loss, vocab 126,464, seq 2048: plain vs lean
    python benchmarks/memory.py checkpoint  # peak RSS of a training step per activation_checkpointing mode
    python benchmarks/memory.py estimate    # llada-8b on 2 x 8 GPUs, ZeRO-3: DeepSpeed's model-state estimator
                                            # + activations at seq 4096, micro batch 1, full checkpointing
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


def measure_checkpoint(mode: str, preset_name: str, seq: int, micro: int) -> dict:
    from llada_scale.model.transformer import Transformer, preset
    from llada_scale.objectives.config import ObjectiveConfig
    from llada_scale.objectives.losses import compute_loss
    from llada_scale.training.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = preset(preset_name, causal=False, mask_token_id=6400, max_seq_len=seq, attention_backend="sdpa")
    model = Transformer(cfg)
    layers = apply_activation_checkpointing(model, mode, every=2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 6400, (micro, seq), generator=g),
             "position_ids": torch.arange(seq).expand(micro, seq), "document_ids": torch.zeros(micro, seq, dtype=torch.int32),
             "prompt_mask": torch.zeros(micro, seq, dtype=torch.bool), "padding_mask": torch.zeros(micro, seq, dtype=torch.bool)}
    before = rss_gb()
    loss, _ = compute_loss(model, batch, ObjectiveConfig(random_length_prob=0.0), False, 6400,
                           torch.Generator().manual_seed(2))
    loss.backward()
    return {"activation_checkpointing": f"{mode} ({len(layers)}/{cfg.num_layers} layers)", "preset": preset_name,
            "micro x seq": f"{micro} x {seq}", "extra_peak_gb": peak_rss_gb() - before}


def estimate(nodes: int = 2, gpus_per_node: int = 8, seq: int = 4096, micro: int = 1) -> str:
    """DeepSpeed's ZeRO-3 model-state estimate for the llada-8b preset + an activation estimate."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    from llada_scale.model.head import default_chunk_size
    from llada_scale.model.transformer import preset

    cfg = preset("llada-8b")
    d, f, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    layer = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o (32 kv heads), gate/up/down, two norms
    total = n * layer + 2 * v * d + d
    largest = v * d  # embedding / head
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    tokens = seq * micro
    bf16 = 2
    checkpoints = n * tokens * d * bf16  # full checkpointing: each layer keeps its bf16 input only
    # one layer recomputed in the backward: q, k, v, attention output, o-proj input, 2 norms (~7 d) and the MLP
    # gate/up/silu/product (4 f) in bf16, with their gradients alive at the same time (x2)
    recompute = 2 * tokens * (7 * d + 4 * f) * bf16
    masked = tokens // 2  # diffusion: t ~ U(0, 1), half the positions masked on average (the head's rows)
    chunk = default_chunk_size(v)
    head = masked * d * bf16 * 2 + 3 * chunk * v * 4  # selected hidden states + grad, ~3 float32 logits chunks
    plain_head = tokens * v * (bf16 + 4 + 4)  # bf16 logits, float32 copy, float32 softmax gradient
    gathered = 2 * layer * bf16 + largest * bf16  # ZeRO-3: prefetch of the next layer + the gathered head
    states = largest * 4 + 18 * total / (nodes * gpus_per_node)  # DeepSpeed's formula (stage3.py), offload none:
    # 18 bytes per parameter = bf16 weight 2 + fp32 gradient 4 + fp32 master, Adam m, v 12; + 4 B x largest layer
    rows = [("model states (DeepSpeed estimator, offload none, zero_init=1)", states),
            ("full-checkpoint layer inputs", checkpoints), ("one layer recomputed (activations + grads)", recompute),
            ("output head + loss, memory-lean", head), ("(output head + loss, plain full logits)", plain_head),
            ("gathered parameters in flight (2 layers + head)", gathered)]
    lines = [f"\nllada-8b: {total / 1e9:.2f}B params, largest layer {largest / 1e6:.0f}M, seq {seq}, micro batch "
             f"{micro}, {nodes} x {gpus_per_node} GPUs, ZeRO-3, full activation checkpointing", "",
             "| per GPU | GB |", "|---|---:|"]
    for name, value in rows:
        lines.append(f"| {name} | {value if isinstance(value, str) else f'{value / 2**30:.2f}'} |")
    lines.append(f"| total, memory-lean loss | {(states + checkpoints + recompute + head + gathered) / 2**30:.2f} |")
    return "\n".join(lines)


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
    drop it), and Adam's m and v (8 B/param / world), which DeepSpeed allocates at the first step.
    """
    from llada_scale.model.transformer import PRESETS, Transformer, preset

    if model not in PRESETS:  # TODO(issue 17): LLaDA2-mini / LLaDA2-flash rows once the MoE presets land
        return f"\n{model}: no such preset yet (known: {sorted(PRESETS)}); the LLaDA2 MoE backbone adds it"
    with torch.device("meta"):
        m = Transformer(preset(model))
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
    p.add_argument("table", nargs="?", choices=["loss", "checkpoint", "estimate", "startup"], default="estimate",
                   help="which table (default estimate)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--positions", type=int, default=2048, help="loss: positions (seq x micro batch)")
    p.add_argument("--hidden", type=int, default=1024, help="loss: hidden size (the head weight is vocab x hidden)")
    p.add_argument("--vocab", type=int, default=126464, help="loss: vocabulary (LLaDA-8B: 126,464)")
    p.add_argument("--preset", default="small", help="checkpoint: model preset")
    p.add_argument("--seq", type=int, default=1024, help="checkpoint: sequence length")
    p.add_argument("--micro_batch_size", type=int, default=4, help="checkpoint: rows per step")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.child:
        kind, arg = args.child[0], json.loads(args.child[1])
        print(json.dumps(measure_loss(**arg) if kind == "loss" else measure_checkpoint(**arg)))
        return
    if args.table == "estimate":
        print(estimate())
        return
    if args.table == "startup":
        print(startup())
        return
    if args.table == "loss":
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
