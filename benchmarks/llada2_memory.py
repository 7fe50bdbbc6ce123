"""Memory plan for LLaDA2-mini / -flash training: parameter counts, DeepSpeed's own ZeRO-2/ZeRO-3 model-state
estimators, and activation memory measured on a 2-layer slice (layer 0 dense, layer 1 MoE, the real widths).

The slice runs one forward in bf16 on CPU with ``torch.autograd.graph.saved_tensors_hooks`` summing the bytes
autograd keeps for the backward (each storage counted once): activation bytes per token of a dense and of a MoE
layer, device-independent except attention (here SDPA without a mask, which keeps O(L) on GPU kernels too).
Extrapolated to all layers at the model input length of block-diffusion SFT (``[x_t ; x_0]``: 2 x seq_len), with
no activation checkpointing and with full checkpointing (one layer input kept per layer plus one layer's
activations during its recompute).

    python benchmarks/llada2_memory.py [--tokens 512] [--seq_len 4096]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llada_scale.checkpoint.weights import expected_shapes  # noqa: E402
from llada_scale.model.llada2_moe import LLADA2_PRESETS, LLaDA2Config, LLaDA2MoeModel  # noqa: E402

GB = 2 ** 30


def saved_bytes_per_layer(cfg: LLaDA2Config, tokens: int) -> tuple[float, float]:
    """(dense layer, MoE layer) bytes kept for backward per token, bf16, measured on a 2-layer slice."""
    small = LLaDA2Config(**{**cfg.to_dict(), "num_layers": 2, "vocab_size": 256, "mask_token_id": 255})
    model = LLaDA2MoeModel(small).to(torch.bfloat16).train()
    x = model.model.embed_tokens(torch.randint(0, 255, (1, tokens))).detach().requires_grad_(True)
    cos, sin = model.rope(torch.arange(tokens)[None], torch.bfloat16)
    out = []
    weights = {q.untyped_storage().data_ptr() for q in model.parameters()}  # saved weights are not activations
    for layer in model.model.layers:
        seen, total = set(weights), [0]

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, cos, sin, None)
        out.append(total[0] / tokens)
    return out[0], out[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="tokens of the measured slice")
    p.add_argument("--seq_len", type=int, default=4096, help="SFT sequence length (model input: 2x)")
    a = p.parse_args(argv)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    print("| model | GPUs | total params | active/token | ZeRO-2 states GB/GPU | ZeRO-3 states GB/GPU | "
          "act. GB/GPU no AC | act. GB/GPU full AC | host RAM for a full fp32 copy per rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, kw, gpus, nodes in (("LLaDA2-mini", LLADA2_PRESETS["llada2-mini"], 8, 1), ("LLaDA2-flash", LLADA2_PRESETS["llada2-flash"], 8, 8)):
        cfg = LLaDA2Config(**kw)
        shapes = expected_shapes(cfg)
        total = sum(math.prod(s) for s in shapes.values())
        largest_layer = sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.layers.5."))
        _, z2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, num_nodes=nodes,
                                                      cpu_offload=False)
        _, z3, _ = estimate_zero3_model_states_mem_needs(total, largest_layer, num_gpus_per_node=gpus,
                                                         num_nodes=nodes, cpu_offload=False, cpu_offload_params=False,
                                                         zero_init=True)
        dense, moe = saved_bytes_per_layer(cfg, a.tokens)
        n = 2 * a.seq_len  # [x_t ; x_0], micro batch 1
        layers = cfg.first_k_dense_replace * dense + (cfg.num_layers - cfg.first_k_dense_replace) * moe
        no_ac = n * layers
        full_ac = n * (cfg.num_layers * cfg.hidden_size * 2 + max(dense, moe))
        print(f"| {name} | {gpus * nodes} | {total / 1e9:.2f}B | {cfg.active_params_per_token() / 1e9:.2f}B "
              f"(+{cfg.vocab_size * cfg.hidden_size / 1e9:.2f}B embedding) | {z2 / GB:.1f} | {z3 / GB:.1f} | "
              f"{no_ac / GB:.1f} | {full_ac / GB:.1f} | {4 * total / GB:.0f} GB |")
        print(f"  measured slice ({a.tokens} tokens, bf16): dense layer {dense / 1024:.1f} KiB/token, "
              f"MoE layer {moe / 1024:.1f} KiB/token", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
