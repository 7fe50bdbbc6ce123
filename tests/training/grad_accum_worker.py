"""Rank worker for test_grad_accum.py: bf16 gradient accumulation and reduction through our DeepSpeed configs.

A bf16 linear model (DeepSpeed bf16 works on CPU) takes 8 micro batches per rank whose losses differ by 1000x,
as 1/t-weighted diffusion losses do (one micro batch at small t dominates). After the 8th backward it prints,
per DeepSpeed JSON, the relative error of DeepSpeed's accumulated and reduced gradient against the float32 sum of
the same bf16 micro-batch gradients (averaged over ranks).
Usage: python tests/training/grad_accum_worker.py OUT_DIR DS_CONFIG [DS_CONFIG ...]
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llada_scale.training.config import load_config  # noqa: E402
from llada_scale.training.engine import build_ds_config, init_distributed  # noqa: E402

MICRO, DIM = 8, 64


def main():
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    out_dir = Path(sys.argv[1])
    rank, _, world = init_distributed()
    cfg = load_config(None, ["train.micro_batch_size=1", f"train.global_batch_size={MICRO * world}"])
    g = torch.Generator().manual_seed(1)
    inputs = [[torch.randn(1, DIM, generator=g).bfloat16() for _ in range(MICRO)] for _ in range(world)]
    scale = lambda r, i: 1000.0 if (r, i) == (0, 0) else 1.0  # noqa: E731
    errors = {}
    for path in sys.argv[2:]:
        ds = json.loads(Path(path).read_text())
        ds["bf16"] = {"enabled": True}  # what "auto" gives on a GPU
        tmp = out_dir / f"rank{rank}_{Path(path).name}"
        tmp.write_text(json.dumps(ds))
        ds = build_ds_config(str(tmp), cfg, world, torch.device("cpu"))
        torch.manual_seed(0)
        model = torch.nn.Linear(DIM, DIM, bias=False)
        w0 = model.weight.detach().bfloat16()
        ref = torch.zeros(DIM, DIM)
        for r in range(world):  # the float32 sum of every bf16 micro-batch gradient, as DeepSpeed scales them
            for i, x in enumerate(inputs[r]):
                w = w0.clone().requires_grad_()
                (torch.nn.functional.linear(x, w).float().pow(2).sum() * scale(r, i) / MICRO).backward()
                ref += w.grad.float() / world
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
        for i, x in enumerate(inputs[rank]):
            engine.backward(engine(x).float().pow(2).sum() * scale(rank, i))
            if i < MICRO - 1:
                engine.step()
        grad = safe_get_full_grad(engine.module.weight).float()
        errors[Path(path).name] = float((grad - ref).norm() / ref.norm())
        engine.destroy()
    if rank == 0:
        (out_dir / "errors.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    main()
