"""Rank worker for test_sequence_parallel.py: Ulysses SP = world size against SP = 1 for the LLaDA2 MoE backbone.

A tiny fp32 LLaDA2 model (fused QKV, QK norm, partial rotary, one dense then MoE layers with a random expert
bias and the sequence-wise aux loss on) runs the SFT block-diffusion objective on the packed-document batch of
sequence_parallel_worker.py, once plainly (the reference, on every rank alike) and once with the Ulysses
attention and router installed, through :class:`SequenceParallelModel`. The SP gradients, and the aux-loss and
load shares of the ranks, are summed over the group (what DeepSpeed's reduction with the mpu and
``MoEBalancer.after_step``'s all-reduce do). Rank 0 writes, per case, loss, aux loss, loads and the largest
gradient difference relative to the largest reference gradient of each parameter.
Usage: python tests/training/sequence_parallel_llada2_worker.py OUT_JSON
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llada_scale.model.llada2_moe import LLaDA2Config, LLaDA2MoeModel  # noqa: E402
from llada_scale.objectives.config import ObjectiveConfig  # noqa: E402
from llada_scale.objectives.losses import compute_loss  # noqa: E402
from llada_scale.training import sequence_parallel as sp  # noqa: E402
from llada_scale.training.engine import init_distributed  # noqa: E402
from llada_scale.training.moe_balance import MoEBalancer  # noqa: E402
from llada_scale.training.parallelize import apply_activation_checkpointing  # noqa: E402
from tests.training.sequence_parallel_worker import (MASK, VOCAB, batch, compare_grads, install_plan,  # noqa: E402
                                                     write_results)

CASES = {"sft_block_diffusion": "none", "sft_block_diffusion_ckpt": "full"}  # name: activation checkpointing
AUX = 0.1


def run(model, loss_model, data):
    gen = torch.Generator().manual_seed(11)
    loss, _ = compute_loss(loss_model, data, ObjectiveConfig(name="sft", block_length=4), False, MASK, gen, step=0)
    balancer = MoEBalancer(model, model.config.moe)
    total = balancer.aux_loss(loss)
    total.backward()
    loads = torch.stack([block.gate.take_stats()[0] for _, block in model.moe_layers()])
    return loss.detach(), (total - loss).detach(), loads, {n: p.grad.clone() for n, p in model.named_parameters()}


def main():
    out = sys.argv[1]
    rank, _, world = init_distributed()
    results = {}
    for name, ac in CASES.items():
        torch.manual_seed(0)
        mcfg = LLaDA2Config(vocab_size=VOCAB, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                            intermediate_size=96, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                            n_group=4, topk_group=2, mask_token_id=MASK, attention_backend="sdpa", max_seq_len=64,
                            moe={"bias_update_rate": 0.0, "aux_loss_coef": AUX})
        ref = LLaDA2MoeModel(mcfg).train()
        with torch.no_grad():
            for _, block in ref.moe_layers():
                block.gate.expert_bias.normal_(0, 0.05)
        apply_activation_checkpointing(ref, ac)
        par = copy.deepcopy(ref)
        data = batch(True)
        ref_loss, ref_aux, ref_loads, ref_grads = run(ref, ref, data)
        plan = install_plan(par, mcfg, rank, world)
        loss, aux, loads, grads = run(par, sp.model_for_loss(par, plan, mcfg), data)
        for t in [aux, loads, *grads.values()]:
            dist.all_reduce(t, group=plan.group)
        router = max(grads[n].abs().max().item() for n in grads if n.endswith("gate.weight"))
        results[name] = {"loss": loss.item(), "ref_loss": ref_loss.item(), "aux": aux.item(),
                         "ref_aux": ref_aux.item(), "loads": loads.tolist(), "ref_loads": ref_loads.tolist(),
                         "router_grad": router, **compare_grads(grads, ref_grads)}
    write_results(out, results, rank)


if __name__ == "__main__":
    main()
