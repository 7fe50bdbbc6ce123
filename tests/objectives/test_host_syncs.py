"""Host synchronisations of the loss path, counted on CPU (issue 21, finding 8): every op that hands a device
value to the host (``item``/``bool``/``int`` -> ``aten._local_scalar_dense``, ``nonzero``, ``tolist``) is a CUDA
synchronisation on a GPU. The trainer checks the batch kind on the host batch (``check_data=False`` here)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.objectives.losses import check_objective_data, compute_loss

SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}
MASK = 63


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _batch(b=2, length=32):
    g = torch.Generator().manual_seed(0)
    doc = (torch.arange(length) >= 12).int().expand(b, length).clone()
    pos = torch.cat([torch.arange(12), torch.arange(length - 12)]).expand(b, length).clone()
    zeros = torch.zeros(b, length, dtype=torch.bool)
    return {"input_ids": torch.randint(0, MASK, (b, length), generator=g), "position_ids": pos, "document_ids": doc,
            "prompt_mask": zeros, "padding_mask": zeros}


@pytest.mark.parametrize("objective,causal,expected", [
    (dict(name="ar"), True, ["nonzero"]),  # the loss positions
    (dict(name="diffusion"), False, ["nonzero"]),
    (dict(name="diffusion", random_length_prob=1.0), False, ["nonzero"]),
    (dict(name="diffusion", block_length=8), False, ["_local_scalar_dense", "nonzero"]),  # + number of blocks
])
def test_loss_path_host_syncs(objective, causal, expected):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64, causal=causal, mask_token_id=MASK, attention_backend="sdpa"))
    with SyncCounter() as counter:
        loss, _ = compute_loss(model, _batch(), ObjectiveConfig(**objective), causal, MASK,
                               torch.Generator().manual_seed(0), check_data=False)
        loss.backward()
    assert counter.ops == expected


def test_data_check_runs_on_the_host_batch():
    prompt = torch.zeros(2, 8, dtype=torch.bool)
    prompt[1, :3] = True
    check_objective_data(ObjectiveConfig(name="sft"), prompt)
    with pytest.raises(ValueError, match="got SFT data"):
        check_objective_data(ObjectiveConfig(name="diffusion"), prompt)
