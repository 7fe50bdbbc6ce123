"""CPU twin of the compiled LLaDA2 MoE layer (issue 17 follow-up): decoder layers with a MoE block compiled with
inductor as :func:`llada_scale.training.parallelize.apply_compile` compiles them, one with activation
checkpointing (what ``full`` does to every layer) and one without, train without a graph break or a recompile,
and equal eager in loss, gradients, router statistics (:class:`llada_scale.model.moe.RouterStats`) and the
balancing update. On CPU the experts run the
per-expert loop as the opaque operator ``llada_scale::expert_loop_swiglu`` (its backward is checked against
autograd of the eager loop here too); the CUDA ``torch._grouped_mm`` path is the bf16 twin of
``benchmarks/gpu_check.py --cpu-dry-run`` (llada2 section).
"""

import pytest
import torch
from torch._dynamo.utils import counters

from llada_scale.model import moe
from llada_scale.model.llada2_moe import LLaDA2Config, LLaDA2MoeModel
from llada_scale.training import parallelize as par
from llada_scale.training.moe_balance import MoEBalancer

CFG = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
           intermediate_size=32, max_seq_len=32, first_k_dense_replace=0, moe_intermediate_size=16, num_experts=8,
           num_experts_per_tok=3, n_group=4, topk_group=2, mask_token_id=63,
           moe={"bias_update_rate": 0.01, "aux_loss_coef": 0.1})
STEPS = 3


def _train(compiled: bool):
    torch.manual_seed(0)
    model = LLaDA2MoeModel(LLaDA2Config(**CFG)).train()
    assert par.apply_activation_checkpointing(model, "selective", 2) == [0]  # layer 0 checkpointed, layer 1 not
    if compiled:
        par.apply_compile(model)
    balancer = MoEBalancer(model, model.config.moe)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    counters.clear()  # reset() keeps them
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 63, (2, 16), generator=gen)
        loss = balancer.aux_loss(model(ids, labels=ids).mean())
        loss.backward()
        stats = balancer.after_step("cpu")  # takes the router statistics, moves the expert bias
        out.append(dict(loss=loss.detach(), grads=[p.grad.clone() for p in model.parameters()], **stats,
                        graphs=counters["stats"]["unique_graphs"]))
        opt.step()
        opt.zero_grad()
    return out


@pytest.mark.slow  # ~60 s with a cold inductor cache on 2 shared cores (8 s warm)
def test_compiled_moe_layers_train_like_eager_without_graph_break():
    """Before the fix: 3 graph breaks per MoE layer (the recompute test, bincount twice) and none of the
    checkpointed layer compiled; the forwards count, a Python int, was a guard."""
    eager = _train(compiled=False)
    comp = _train(compiled=True)
    assert comp[0]["graphs"] > 0, "nothing compiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert [s["graphs"] for s in comp] == [comp[0]["graphs"]] * STEPS, "recompiled after the first step"
    for e, c in zip(eager, comp):
        assert c["moe_forwards"] == e["moe_forwards"] == 1  # one forward per step, the recompute not counted
        assert torch.equal(c["moe_load"], e["moe_load"])  # counts: exact
        assert c["moe_load"].sum() == 2 * 2 * 16 * 3  # layers x tokens x top_k: layer 0's recompute not counted
        torch.testing.assert_close(c["moe_entropy_sum"], e["moe_entropy_sum"], rtol=1e-5, atol=0)
        torch.testing.assert_close(c["loss"], e["loss"], rtol=1e-5, atol=0)
        for gc, ge in zip(c["grads"], e["grads"]):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


def test_loop_operator_gradients_equal_autograd_of_the_loop():
    """``llada_scale::expert_loop_swiglu``'s hand-written backward against autograd through the eager loop,
    with an expert that gets no rows (zero weight gradients)."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8, generator=g, dtype=torch.float64)
    ws = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((4, 6, 8), (4, 6, 8), (4, 8, 6))]
    dy = torch.randn(10, 8, generator=g, dtype=torch.float64)
    grads = {}
    for name, fn in (("op", moe.expert_loop_swiglu), ("loop", moe._loop_swiglu)):
        leaves = [t.clone().requires_grad_() for t in [x] + ws]
        y = fn(leaves[0], counts, *leaves[1:])
        grads[name] = [y] + list(torch.autograd.grad(y, leaves, dy))
    for a, b in zip(grads["op"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not grads["op"][2][1].any()
