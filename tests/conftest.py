"""Shared fixtures: small real-data shards, the data path, and a quiet, CPU-friendly environment."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llada_scale.data import DEFAULT_DATA  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llada_scale_torch_extensions"))

if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() == "default":
    # inductor still emits AVX C++ for CPU, which does not compile against the default-capability headers
    # ('at::vec' has not been declared); scalar code (simdlen 1) does. The flex twins skip: testing.vector_kernels
    import torch._inductor.config as _inductor_config

    _inductor_config.cpp.simdlen = 1

DATA = Path(os.environ.get("LLADA_DATA", DEFAULT_DATA))
TOKENIZER = DATA / "tokenizer" / "minimind"


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run fastest on one thread and CI machines are shared: avoid oversubscribing the cores.
    Restored after each test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need_data():
    if not TOKENIZER.is_dir():
        pytest.skip(f"real data not found at {DATA} (set LLADA_DATA)")


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    _need_data()
    return TOKENIZER


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> Path:
    """~160k tokens of the English corpus in ~8 train shards + 1 val shard."""
    _need_data()
    from llada_scale.data.build import build_shards

    out = tmp_path_factory.mktemp("shards") / "pretrain"
    build_shards([str(DATA / "pretrain" / "en_classics.jsonl.gz")], str(TOKENIZER), str(out), "pretrain",
                 max_tokens=160_000, shard_tokens=20_000, val_docs=2, progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def sft_shards(tmp_path_factory) -> Path:
    _need_data()
    from llada_scale.data.build import build_shards

    out = tmp_path_factory.mktemp("shards") / "sft"
    build_shards([str(DATA / "sft" / "alpaca_en.jsonl.gz")], str(TOKENIZER), str(out), "sft",
                 max_docs=600, shard_tokens=15_000, val_docs=40, progress=False, log=lambda m: None)
    return out


@pytest.fixture
def tiny_sft_shards(tmp_path):
    """Factory ``tiny_sft_shards(tokenizer) -> Path``: SFT shards of 40 short two-turn conversations ("what is two
    plus W" / "two plus W is the W", W from the tiny test tokenizers' words) rendered with ``tokenizer``'s chat
    template; writes ``tmp_path/sft.jsonl`` and returns ``tmp_path/shards`` (400-token shards, 4 val documents)."""
    import json

    from llada_scale.data.build import build_shards

    def make(tokenizer) -> Path:
        rows = [{"conversations": [{"role": "user", "content": f"what is two plus {w}"},
                                   {"role": "assistant", "content": f"two plus {w} is the {w}"}]}
                for w in "the a of and to in is you that it he was for on are as with his they at".split() * 2]
        (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        build_shards([str(tmp_path / "sft.jsonl")], str(tokenizer), str(tmp_path / "shards"), "sft",
                     shard_tokens=400, val_docs=4, progress=False, log=lambda m: None)
        return tmp_path / "shards"

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_path):
    """Factory ``tiny_checkpoint(causal, max_seq_len=256, run_config=None) -> str``: the path of a consolidated
    checkpoint of a 1-layer random model (hidden 32) with the minimind tokenizer, built once per setting."""
    import torch

    import llada_scale.checkpoint as cio
    from llada_scale.data.tokenizer import Tokenizer
    from llada_scale.model.transformer import ModelConfig, Transformer

    tok = Tokenizer.load(str(tokenizer_path))
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    made: dict = {}

    def make(causal: bool, max_seq_len: int = 256, run_config: dict | None = None) -> str:
        key = (causal, max_seq_len, repr(run_config))
        if key not in made:
            torch.manual_seed(0)
            cfg = ModelConfig(vocab_size=tok.padded_vocab_size(), hidden_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=64, max_seq_len=max_seq_len, causal=causal,
                              mask_token_id=None if causal else tok.mask_token_id)
            meta = {"format": "llada_scale", "model": cfg.to_dict(), "tokenizer": tok.identity()}
            if run_config:
                meta["run_config"] = run_config
            path = root / f"m{len(made)}"
            cio.save_safetensors(Transformer(cfg).state_dict(), str(path), meta, dtype="fp32", progress=False)
            made[key] = str(path)
        return made[key]

    return make
