"""tools/val_loss.py refuses shards built with another tokenizer than the checkpoint's (the losses would mean
nothing), unless --any_tokenizer."""

import sys
from pathlib import Path

import torch

import llada_scale.checkpoint as cio
from llada_scale.data.tokenizer import Tokenizer
from llada_scale.model.transformer import ModelConfig, Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def test_val_loss_tokenizer_check(tmp_path, tokenizer_path, pretrain_shards, capsys):
    import val_loss

    tok = Tokenizer.load(str(tokenizer_path))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.padded_vocab_size(), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=64, causal=False, mask_token_id=tok.mask_token_id)
    model = Transformer(cfg)
    argv = ["--shards", str(pretrain_shards), "--seq_len", "32", "--batches", "1", "--micro_batch_size", "1"]
    for name, ident in (("same", tok.identity()), ("other", {**tok.identity(), "sha256": "0" * 64})):
        cio.save_safetensors(model.state_dict(), str(tmp_path / name),
                             {"format": "llada_scale", "model": cfg.to_dict(), "tokenizer": ident}, dtype="fp32",
                             progress=False)
    assert val_loss.main([str(tmp_path / "same"), *argv]) == 0
    capsys.readouterr()
    assert val_loss.main([str(tmp_path / "other"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "was built with tokenizer" in err and "--any_tokenizer" in err
    assert val_loss.main([str(tmp_path / "other"), *argv, "--any_tokenizer"]) == 0
