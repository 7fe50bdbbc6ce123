"""CPU twins of the CUDA code paths (issue 21): with ``LLADA_COMPILE_ON_CPU=1`` the compiled ``create_block_mask``,
the compiled FlexAttention forward and per-layer compile with activation checkpointing run on CPU inductor, the
compiler the GPU uses, so what fails to compile there fails here. FlexAttention has no CPU backward (torch 2.13):
the flex twins compare forward outputs with SDPA on the dense mask of the same ``mask_mod``; training through
compile x checkpointing uses the SDPA backend. The document / AR / inference-shaped block masks are compiled in
``benchmarks/gpu_check.py --cpu-dry-run`` (tests/benchmarks/test_gpu_check.py): each compile costs seconds here.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from llada_scale.model import attention
from llada_scale.model import block_attention as ba
from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.objectives.losses import compute_loss
from llada_scale.testing import vector_kernels
from llada_scale.training import parallelize as par

flex = pytest.importorskip("torch.nn.attention.flex_attention")

needs_vector_isa = pytest.mark.skipif(not vector_kernels(), reason="torch's CPU FlexAttention lowering needs AVX2/AVX-512 "
                                      "kernels; ATEN_CPU_CAPABILITY=default turns them off")

L = 80  # 2L = 160: two 128-tiles, the second partial, with a document boundary inside the first


def _layout(length=L):
    pos = torch.cat([torch.arange(30), torch.arange(length - 30)]).expand(2, length)
    doc = (torch.arange(length) >= 30).int().expand(2, length)
    return pos, doc, ba.block_ids(pos, doc, 8)


def _qkv(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g),
            torch.randn(2, 2, n, 16, generator=g))


def test_block_diffusion_mask_compiles_with_inductor():
    """Finding 1: ``torch.compile(create_block_mask)`` of the block-diffusion mask_mod (what every CUDA block
    diffusion step runs) compiled to a TypeError in inductor's value-range pass while the mask compared two
    booleans with ``==``. The compiled BlockMask must equal the eager one tile for tile."""
    _, doc, seg = _layout()
    mod = ba.block_diffusion_mask_mod(seg, doc)
    kw = dict(device="cpu", BLOCK_SIZE=ba.FLEX_BLOCK_SIZE)
    compiled = torch.compile(flex.create_block_mask)(mod, 2, None, 2 * L, 2 * L, **kw)
    eager = flex.create_block_mask(mod, 2, None, 2 * L, 2 * L, **kw)
    assert torch.equal(compiled.to_dense(), eager.to_dense())
    assert torch.equal(compiled.full_kv_num_blocks, eager.full_kv_num_blocks)


def test_cpu_twin_switch(monkeypatch):
    monkeypatch.delenv(attention.CPU_TWIN_ENV, raising=False)
    assert not attention.cuda_paths("cpu") and attention.cuda_paths("cuda")
    assert par.resolve_compile("auto", torch.device("cpu")) is False
    monkeypatch.setenv(attention.CPU_TWIN_ENV, "1")
    assert attention.cuda_paths("cpu") and attention.compile_mask("cpu")
    assert par.resolve_compile("auto", torch.device("cpu")) is True
    assert par.resolve_compile("auto", torch.device("cpu"), zero_stage=3) is False


@needs_vector_isa
def test_twin_block_diffusion_flex_forward_matches_sdpa(monkeypatch):
    """The training block-diffusion mask through the CUDA path (compiled mask, compiled flex forward) on CPU
    inductor equals SDPA with the dense mask in fp32 (rounding of the two softmax orders only: ~1e-6)."""
    monkeypatch.setenv(attention.CPU_TWIN_ENV, "1")
    _, doc, seg = _layout()
    mask = ba.block_diffusion_mask(seg, doc, "flex")
    assert isinstance(mask, flex.BlockMask)
    q, k, v = _qkv(2 * L)
    out = attention.attend(q, k, v, mask)
    ref = attention.attend(q, k, v, ba.block_diffusion_mask(seg, doc, "sdpa"))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _tiny(backend):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                   intermediate_size=64, causal=False, mask_token_id=63, attention_backend=backend))


def _fresh_counters():
    torch._dynamo.reset()
    counters.clear()  # reset() keeps them


@needs_vector_isa
def test_twin_compile_checkpointing_flex_has_no_graph_break(monkeypatch):
    """Finding 3: per-layer compile of fully checkpointed layers with the flex path. The compiled flex function
    used to be created lazily on the first call, inside the checkpoint region: dynamo graph-broke on that side
    effect and the layers ran eager all run long. Forward only (flex has no CPU backward, so the weights are
    frozen); the checkpoint region is traced all the same in grad mode."""
    monkeypatch.setenv(attention.CPU_TWIN_ENV, "1")
    model = _tiny("flex").requires_grad_(False)
    ref = _tiny("sdpa").requires_grad_(False)
    par.apply_activation_checkpointing(model, "full")
    par.apply_compile(model)
    ids = torch.randint(0, 63, (2, L), generator=torch.Generator().manual_seed(0))
    _, doc, _ = _layout()
    _fresh_counters()
    out = model(ids, document_ids=doc)
    assert counters["stats"]["unique_graphs"] > 0, "nothing compiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    torch.testing.assert_close(out, ref(ids, document_ids=doc), rtol=1e-4, atol=1e-5)


def test_twin_compile_checkpointing_sdpa_trains_without_graph_break(monkeypatch):
    """Compile x full checkpointing on CPU inductor through the real loss (SDPA backend: flex has no CPU
    backward): two training steps compile graphs, break none, and the losses equal eager ones."""
    monkeypatch.setenv(attention.CPU_TWIN_ENV, "1")
    losses = {}
    for compiled in (False, True):
        model = _tiny("sdpa")
        par.apply_activation_checkpointing(model, "full")
        if compiled:
            par.apply_compile(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 63, (2, 32), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "position_ids": torch.arange(32).expand(2, 32),
                 "document_ids": torch.zeros(2, 32, dtype=torch.int32),
                 "prompt_mask": torch.zeros(2, 32, dtype=torch.bool), "padding_mask": torch.zeros(2, 32, dtype=torch.bool)}
        _fresh_counters()
        losses[compiled] = []
        for _ in range(2):
            loss, _ = compute_loss(model, batch, ObjectiveConfig(), causal=False, mask_token_id=63, generator=gen)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[compiled].append(float(loss.detach()))
    assert counters["stats"]["unique_graphs"] > 0, "nothing compiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
