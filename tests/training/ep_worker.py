"""Rank worker for test_expert_parallel.py: one training step of a tiny LLaDA2 MoE model with experts replicated
(EP=1) and with experts split over the ranks (EP=WORLD), same weights and data; writes the loss, the gradients of
the replicated parameters and this rank's expert-slice gradients of both to OUT_DIR/rank{R}.pt.

Usage: python tests/training/ep_worker.py OUT_DIR EP_SIZE
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llada_scale.model.llada2_moe import LLaDA2Config, LLaDA2MoeModel  # noqa: E402
from llada_scale.training.expert_parallel import shard_experts, sync_gradients  # noqa: E402


def main():
    import deepspeed
    import torch.distributed as dist

    out, ep = Path(sys.argv[1]), int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = LLaDA2Config(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=48, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=3, n_group=4,
                       topk_group=2, mask_token_id=95)
    ref = LLaDA2MoeModel(cfg).train()
    with torch.no_grad():
        for _, block in ref.moe_layers():
            block.gate.expert_bias.normal_(0, 0.05)
    model = copy.deepcopy(ref)
    sharded = shard_experts(model, ep)
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own batch
    ids = torch.randint(0, 95, (2, 12), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.5, ids, torch.full_like(ids, -100))
    result = {"sharded": sharded}
    for name, m, size in (("ep1", ref, 1), ("ep", model, ep)):
        loss = m(ids, labels=labels).sum() / (labels != -100).sum()
        loss.backward()
        sync_gradients(m, size)
        result[name] = {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in m.named_parameters()}}
    result["expert_slice"] = (rank % ep) * cfg.num_experts // ep, (rank % ep + 1) * cfg.num_experts // ep
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
