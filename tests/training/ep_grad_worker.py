"""Rank worker for test_expert_parallel.py: one forward/backward of a tiny LLaDA2 MoE model (fp32, random expert
biases, aux loss on) through two DeepSpeed ZeRO-0 engines on the same weights and data: plain data parallelism
(EP=1) and DeepSpeed AutoEP with the experts split over the 2 ranks (EP=2, llada_scale.training.expert_parallel).
Writes the losses and every parameter's all-reduced gradient (names mapped back to the model's; expert tensors are
this rank's slice under EP=2) to OUT_DIR/rank{R}.pt.

Usage: python tests/training/ep_grad_worker.py OUT_DIR
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llada_scale.model.llada2_moe import LLaDA2Config, LLaDA2MoeModel  # noqa: E402
from llada_scale.checkpoint.autoep import to_model_names  # noqa: E402
from llada_scale.training import expert_parallel  # noqa: E402
from llada_scale.training.moe_balance import MoEBalancer  # noqa: E402


def main():
    import deepspeed
    import torch.distributed as dist

    out = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = LLaDA2Config(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=48, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=3, n_group=4,
                       topk_group=2, mask_token_id=95, moe={"bias_update_rate": 0.0, "aux_loss_coef": 0.1})
    ref = LLaDA2MoeModel(cfg).train()
    with torch.no_grad():
        for _, block in ref.moe_layers():
            block.gate.expert_bias.normal_(0, 0.05)
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own batch
    ids = torch.randint(0, 95, (2, 12), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.5, ids, torch.full_like(ids, -100))
    result = {}
    for name, ep in (("ep1", 1), ("ep", 2)):
        model = copy.deepcopy(ref)
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
        if ep > 1:
            ds["expert_parallel"] = expert_parallel.ds_section(cfg, ep, torch.device("cpu"))
            expert_parallel.prepare(model)
        engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=list(model.parameters()))
        routers = expert_parallel.attach(engine.module, cfg.moe) if ep > 1 else None
        balancer = MoEBalancer(engine.module, cfg.moe, routers)
        loss = engine(ids, labels=labels).sum() / (labels != -100).sum()
        engine.backward(balancer.aux_loss(loss))
        if ep > 1:
            result["replaced"] = [i for i, _ in routers]
            gate = routers[0][1].router.gate  # float32 logits whatever the weights' dtype, as the release's gate
            x = torch.randn(5, cfg.hidden_size, dtype=torch.bfloat16)
            with torch.no_grad():
                w = gate.weight.data.clone()
                gate.weight.data = w.bfloat16()
                result["bf16_logits"] = (gate(x), torch.nn.functional.linear(x.float(), gate.weight.float()))
                gate.weight.data = w
            result["bias_dtypes"] = {str(r.expert_bias.dtype) for _, r in routers}
        grads = {to_model_names(n): p.grad.clone() for n, p in engine.module.named_parameters()}
        result[name] = {"loss": loss.item(), "grads": grads}
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
