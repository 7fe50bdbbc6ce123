"""Rank worker for test_sequence_parallel.py: Ulysses SP = world size against SP = 1, loss and gradients.

Every rank builds the same fp32 model and batch. The reference is the plain model on the whole batch (no
communication, computed on every rank alike); the SP run installs DeepSpeed's all-to-all attention on a copy
and calls the objective through :class:`SequenceParallelModel`, with a generator seeded alike, then sums the
parameter gradients over the group (what DeepSpeed does with the mpu). Rank 0 writes, per case, the loss of
both and the largest gradient difference relative to the largest reference gradient of each parameter.
Usage: python tests/training/sequence_parallel_worker.py OUT_JSON
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llada_scale.model.transformer import Transformer, preset  # noqa: E402
from llada_scale.objectives.config import ObjectiveConfig  # noqa: E402
from llada_scale.objectives.losses import compute_loss  # noqa: E402
from llada_scale.training import sequence_parallel as sp  # noqa: E402
from llada_scale.training.config import RunConfig  # noqa: E402
from llada_scale.training.engine import init_distributed  # noqa: E402
from llada_scale.training.parallelize import apply_activation_checkpointing  # noqa: E402

B, L, VOCAB, MASK = 3, 24, 96, 95

CASES = {  # name: (causal, objective kwargs, sft rows, activation checkpointing)
    "ar": (True, dict(name="ar"), False, "none"),
    "diffusion": (False, dict(name="diffusion", random_length_prob=0.5), False, "none"),
    "diffusion_ckpt": (False, dict(name="diffusion", random_length_prob=0.0), False, "full"),
    "block_diffusion": (False, dict(name="diffusion", block_length=4, random_length_prob=0.0), False, "none"),
    "sft_diffusion": (False, dict(name="sft"), True, "none"),
    "sft_block_diffusion": (False, dict(name="sft", block_length=4), True, "none"),
    "sft_ar": (True, dict(name="sft"), True, "none"),
}


def batch(sft: bool) -> dict:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, MASK, (B, L), generator=g)
    # packed documents of uneven lengths (boundaries off the SP slice edges), positions restarting per document
    starts = [[0, 5, 14], [0, 11], [0, 3, 4, 20]]
    doc = torch.zeros(B, L, dtype=torch.int32)
    for b, s in enumerate(starts):
        for i, a in enumerate(s):
            doc[b, a:] = i
    pos = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(d, return_counts=True)[1]])
                       for d in doc])
    prompt = torch.zeros(B, L, dtype=torch.bool)
    padding = torch.zeros(B, L, dtype=torch.bool)
    if sft:  # a prompt at the start of each document's turn, EOS padding at the end of two rows
        prompt[0, 0:3], prompt[0, 5:8], prompt[1, 0:6], prompt[2, 0:2], prompt[2, 4:9] = True, True, True, True, True
        padding[0, 20:], padding[2, 22:] = True, True
    return {"input_ids": ids, "position_ids": pos, "document_ids": doc, "prompt_mask": prompt, "padding_mask": padding}


def run(model, loss_model, data, obj, causal):
    gen = torch.Generator().manual_seed(11)
    loss, stats = compute_loss(loss_model, data, obj, causal, MASK, gen, step=0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def install_plan(par, mcfg, rank: int, world: int):
    """Sequence parallelism over all ``world`` ranks (this worker's B x L batch) bound to every attention of
    ``par``; returns the plan."""
    cfg = RunConfig()
    cfg.model, cfg.data.seq_len = mcfg, L
    cfg.train.sequence_parallel_size, cfg.train.micro_batch_size, cfg.train.global_batch_size = world, B, B
    plan = sp.setup(cfg, rank, world)
    assert sp.install(par, plan) == mcfg.num_layers
    return plan


def compare_grads(grads: dict, ref_grads: dict) -> dict:
    """``grad_rel``: the largest |grad - ref| / max |ref| over the parameters; ``grad_norm``: the reference's."""
    rel = max(((grads[n] - r).abs().max() / r.abs().max().clamp(min=1e-30)).item() for n, r in ref_grads.items())
    return {"grad_rel": rel, "grad_norm": torch.cat([g.flatten() for g in ref_grads.values()]).norm().item()}


def write_results(out: str, results: dict, rank: int) -> None:
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()


def main():
    out = sys.argv[1]
    rank, _, world = init_distributed()
    results = {}
    for name, (causal, okw, sft, ac) in CASES.items():
        torch.manual_seed(0)
        mcfg = preset("tiny", hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, num_layers=2,
                      vocab_size=VOCAB, mask_token_id=MASK, causal=causal, attention_backend="sdpa", max_seq_len=64)
        ref = Transformer(mcfg)
        apply_activation_checkpointing(ref, ac)
        par = copy.deepcopy(ref)
        obj = ObjectiveConfig(**okw)
        data = batch(sft)
        ref_loss, ref_grads = run(ref, ref, data, obj, causal)
        plan = install_plan(par, mcfg, rank, world)
        loss, grads = run(par, sp.model_for_loss(par, plan, mcfg), data, obj, causal)
        for g in grads.values():
            dist.all_reduce(g, group=plan.group)  # the sum over the SP group (DeepSpeed: sum over SP, mean over DP)
        results[name] = {"loss": loss.item(), "ref_loss": ref_loss.item(), **compare_grads(grads, ref_grads)}
    write_results(out, results, rank)


if __name__ == "__main__":
    main()
