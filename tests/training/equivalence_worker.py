"""Rank worker for test_train.py::test_world_size_equivalence.

Trains an AR model on a fixed sequence of global batches: rank r of W takes rows [r*b, (r+1)*b) of each global
batch of W*b rows, so 2 ranks x micro batch b and 1 rank x micro batch 2b see exactly the same data.
Usage: python tests/training/equivalence_worker.py RUN_DIR MICRO_BATCH DS_CONFIG
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llada_scale.training.config import load_config  # noqa: E402
from llada_scale.training.engine import init_distributed  # noqa: E402
from llada_scale.training.trainer import Trainer  # noqa: E402

GLOBAL_ROWS, SEQ_LEN, STEPS = 4, 32, 5


class FixedLoader:
    def __init__(self, rank: int, micro: int):
        g = torch.Generator().manual_seed(1234)
        # two global batches, alternating: step 3 revisits step 1's batch, so learning is visible
        self.batches = [torch.randint(3, 6400, (GLOBAL_ROWS, SEQ_LEN), generator=g) for _ in range(2)]
        self.rank, self.micro, self.pos = rank, micro, 0

    def __iter__(self):
        while True:
            ids = self.batches[self.pos % 2][self.rank * self.micro:(self.rank + 1) * self.micro]
            self.pos += 1
            b, l = ids.shape
            yield {"input_ids": ids, "position_ids": torch.arange(l).expand(b, l).clone(),
                   "document_ids": torch.zeros(b, l, dtype=torch.int32),
                   "prompt_mask": torch.zeros(b, l, dtype=torch.bool), "padding_mask": torch.zeros(b, l, dtype=torch.bool)}

    def state_dict(self):
        return {"pos": self.pos}


def main():
    run_dir, micro, ds_config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rank, _, world = init_distributed()
    cfg = load_config(None, [
        f"run_dir={run_dir}", "model.preset=tiny", "model.num_layers=2", "model.hidden_size=64",
        "model.intermediate_size=128", "model.causal=true", "objective.name=ar", f"data.seq_len={SEQ_LEN}",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={GLOBAL_ROWS}", f"train.max_steps={STEPS}",
        "train.log_every=1", "train.val_every=0", "train.save_every=0", "train.wandb=off", "train.resume=none",
        "optim.lr=1e-2", "optim.warmup_steps=1", "optim.schedule=constant", "optim.weight_decay=0.0"])
    cfg.train.max_steps = STEPS - 1  # no final checkpoint needed
    trainer = Trainer(cfg, ds_config, loader_factory=lambda: FixedLoader(rank, micro))
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
