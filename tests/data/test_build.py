"""The shard builder under hostile input: damaged .gz files, lone surrogates, the literal mask-token text, and
an --overwrite rebuild that is interrupted (the old shards stay usable). Plus the loader's vocabulary check."""

import gzip
import json

import pytest

from llada_scale.data import build as build_mod
from llada_scale.data import shards as shards_mod
from llada_scale.data.build import build_shards
from llada_scale.data.loader import PackedDataset
from llada_scale.data.shards import ShardError, load_index, read_shard, shard_paths

DOCS = [json.dumps({"text": f"Document number {i}: " + "the quick brown fox jumps over the lazy dog. " * 8})
        for i in range(40)]


def _build(tok, inputs, out, **kw):
    msgs = []
    kw = {"shard_tokens": 2000, "progress": False, "num_workers": 1, "val_docs": 1, "log": msgs.append, **kw}
    return build_shards([str(p) for p in inputs], str(tok), str(out), kw.pop("kind", "pretrain"), **kw), msgs


def _ids(out, split="train"):
    return [ids for path, _, _ in shard_paths(str(out), split) for _, ids, _ in read_shard(path)]


def test_damaged_gzip_files(tokenizer_path, tmp_path):
    """A truncated .gz keeps the rows before the damage and reports one line; a file that is no gzip at all is
    one reported line too (here: then no valid documents, one error line)."""
    gz = gzip.compress(("\n".join(DOCS) + "\n").encode())
    (tmp_path / "trunc.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "junk.jsonl.gz").write_bytes(b"this is not gzip data" * 20)
    s, msgs = _build(tokenizer_path, [tmp_path / "trunc.jsonl.gz"], tmp_path / "a")
    assert 0 < s["documents"] < len(DOCS) and s["bad_rows"] == 1
    assert "trunc.jsonl.gz" in msgs[0] and "truncated gzip data" in msgs[0] and "rest of the file is skipped" in msgs[0]
    with pytest.raises(build_mod.BuildError, match="no valid documents"):
        _build(tokenizer_path, [tmp_path / "junk.jsonl.gz"], tmp_path / "b")
    with pytest.raises(build_mod.BuildError, match="junk.jsonl.gz:1: corrupt gzip data"):
        _build(tokenizer_path, [tmp_path / "junk.jsonl.gz"], tmp_path / "c", strict=True)


def test_lone_surrogate_is_one_skipped_row(tokenizer_path, tmp_path):
    src = tmp_path / "s.jsonl"
    conv = {"conversations": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "ok"}]}
    src.write_text("\n".join(DOCS[:5] + ['{"text": "bad \\ud800 row"}'] + DOCS[5:10]) + "\n")
    s, msgs = _build(tokenizer_path, [src], tmp_path / "out")
    assert s["documents"] == 10 and s["bad_rows"] == 1 and f"{src}:6:" in msgs[0] and "lone surrogate" in msgs[0]
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join([json.dumps(good)] * 3 + [json.dumps(conv)]) + "\n")
    s, msgs = _build(tokenizer_path, [sft], tmp_path / "sft", kind="sft")
    assert s["documents"] == 3 and "conversations[0] holds a lone surrogate" in msgs[0]


def test_literal_mask_token_text_never_becomes_the_mask_token(tokenizer_path, tmp_path):
    from llada_scale.data.tokenizer import Tokenizer

    tok = Tokenizer.load(str(tokenizer_path))
    src = tmp_path / "m.jsonl"
    src.write_text("\n".join(DOCS[:4] + [json.dumps({"text": "the <|mask|> token, twice: <|mask|>."})]) + "\n")
    s, msgs = _build(tokenizer_path, [src], tmp_path / "out", val_docs=0)
    assert s["mask_literal_documents"] == 1 and "1 document(s) contain the literal text <|mask|>" in msgs[-1]
    ids = _ids(tmp_path / "out")
    assert all(tok.mask_token_id not in d for d in ids)
    assert any(tok.decode(d) == "the <|mask|> token, twice: <|mask|>." for d in ids)  # still the same text
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"conversations": [{"role": "user", "content": "fill <|mask|>"}, {"role": "assistant", "content": "x"}]}
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join([json.dumps(good)] * 3 + [json.dumps(bad)]) + "\n")
    s, msgs = _build(tokenizer_path, [sft], tmp_path / "sft", kind="sft")
    assert s["documents"] == 3 and "literal mask token" in msgs[0]


def test_interrupted_overwrite_keeps_the_old_shards(tokenizer_path, tmp_path, monkeypatch):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "out"
    _build(tokenizer_path, [src], out)
    before = load_index(str(out))

    written = []

    def crash(path, *a, **k):  # the user's Ctrl-C while the second new shard is written
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return real(path, *a, **k)
    real = shards_mod.write_shard
    monkeypatch.setattr(shards_mod, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        _build(tokenizer_path, [src], out, overwrite=True, seed=1)
    assert load_index(str(out)) == before and len(_ids(out)) == sum(e["documents"] for e in before["splits"]["train"])
    assert not (tmp_path / "out.building").exists()
    monkeypatch.undo()
    s, _ = _build(tokenizer_path, [src], out, overwrite=True, seed=1)  # a complete rebuild replaces them
    assert load_index(str(out))["seed"] == 1 and sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", *(f"{sp}-{i:06d}.tar" for sp in ("train", "val") for i in range(s["splits"][sp]["shards"]))])


def test_loader_names_the_shard_holding_an_id_beyond_the_vocabulary(pretrain_shards):
    ds = PackedDataset(str(pretrain_shards), "train", 64, 2, vocab_size=1000)
    with pytest.raises(ShardError, match=r"train-\d{6}\.tar: token id \d+ is outside the model's vocabulary \(1000"):
        next(iter(ds))
    assert next(iter(PackedDataset(str(pretrain_shards), "train", 64, 2, vocab_size=6464)))["input_ids"].max() < 6464


def test_mask_token_is_the_one_the_trainer_uses(tmp_path):
    """A tokenizer whose tokenizer_config.json names its mask token (what import-llada writes): the shards record
    that token's id, as Tokenizer.load (the trainer) resolves it, not an added <|mask|>, and a document holding
    its text keeps no mask id."""
    from llada_scale.data.tokenizer import Tokenizer
    from tests.checkpoint.tiny_models import make_tokenizer

    tok_dir = tmp_path / "tok"
    specials = make_tokenizer(tok_dir, template="")
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "mask_token": "<|mdm_mask|>"}))
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"the w{i} w{i + 1} <|mdm_mask|> w3"}) for i in range(8)) + "\n")
    s, _ = _build(tok_dir, [src], tmp_path / "out", val_docs=1)
    recorded = load_index(str(tmp_path / "out"))["tokenizer"]
    assert recorded["mask_token"] == "<|mdm_mask|>" == Tokenizer.load(str(tok_dir)).mask_token
    assert recorded["mask_token_id"] == specials["<|mdm_mask|>"]
    assert s["mask_literal_documents"] == 8 and all(specials["<|mdm_mask|>"] not in d for d in _ids(tmp_path / "out"))
