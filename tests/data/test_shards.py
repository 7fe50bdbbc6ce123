"""Tests for the shard format, the shard builder and tools/build_shards.py."""

import gzip
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llada_scale.data.build import build_shards
from llada_scale.data.shards import (FORMAT, BuildError, ShardError, ShardIndexNotFoundError, iter_shard, load_index,
                                     read_shard, shard_paths)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
if not os.path.isdir(DATA):
    DATA = "/work/shared/data"
TOKENIZER = os.path.join(DATA, "tokenizer", "minimind")
pytestmark = pytest.mark.skipif(not os.path.isdir(TOKENIZER), reason="minimind tokenizer not available")


def _slice(src: str, n: int, dst) -> str:
    """First n rows of a real jsonl.gz file, written to dst (plain jsonl)."""
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in itertools.islice(f, n):
            out.write(line)
    return str(dst)


@pytest.fixture(scope="module")
def pretrain_jsonl(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    return _slice(os.path.join(DATA, "pretrain", "zh_poetry.jsonl.gz"), 300, d / "poetry.jsonl")


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    return _slice(os.path.join(DATA, "sft", "alpaca_en.jsonl.gz"), 60, d / "alpaca.jsonl")


def _build(inputs, out, kind="pretrain", **kw):
    kw.setdefault("shard_tokens", 4000)
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 1)
    kw.setdefault("log", lambda msg: None)
    return build_shards(inputs, TOKENIZER, str(out), kind, **kw)


def _files(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def _keys(d, split="train"):
    return [k for path, _, _ in shard_paths(str(d), split) for k, _, _ in iter_shard(path)]


def test_same_seed_same_bytes_and_counts(pretrain_jsonl, tmp_path):
    s1 = _build([pretrain_jsonl], tmp_path / "a", seed=3, num_workers=1)
    s2 = _build([pretrain_jsonl], tmp_path / "b", seed=3, num_workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and a == b
    assert not any(name.endswith(".tmp") for name in a)
    index = load_index(str(tmp_path / "a"))
    assert index["format"] == FORMAT and index["kind"] == "pretrain" and index["dtype"] == "uint16"
    assert index["tokenizer"]["mask_token_id"] == 6400
    assert s1["documents"] == 300 and s1["splits"]["val"]["documents"] == 3
    assert len(index["splits"]["train"]) > 3  # several shards
    total_docs = total_tokens = 0
    for split in ("train", "val"):
        for path, docs, tokens in shard_paths(str(tmp_path / "a"), split):
            samples = read_shard(path)
            assert len(samples) == docs
            assert sum(ids.size for _, ids, _ in samples) == tokens
            assert all(ids.dtype == np.uint16 and mask is None for _, ids, mask in samples)
            assert all(ids[-1] != 2 for _, ids, _ in samples)  # no EOS appended at build time
            total_docs += docs
            total_tokens += tokens
    assert (total_docs, total_tokens) == (s1["documents"], s1["tokens"]) == (s2["documents"], s2["tokens"])
    keys = _keys(tmp_path / "a") + _keys(tmp_path / "a", "val")
    assert sorted(int(k) for k in keys) == list(range(300))


def test_different_seed_different_order(pretrain_jsonl, tmp_path):
    _build([pretrain_jsonl], tmp_path / "a", seed=0, val_docs=0)
    _build([pretrain_jsonl], tmp_path / "b", seed=1, val_docs=0)
    ka, kb = _keys(tmp_path / "a"), _keys(tmp_path / "b")
    assert sorted(ka) == sorted(kb) and ka != kb


def test_limits_and_overwrite(pretrain_jsonl, tmp_path):
    s = _build([pretrain_jsonl], tmp_path / "a", max_docs=50, val_docs=5)
    assert s["documents"] == 50 and s["splits"]["val"]["documents"] == 5
    with pytest.raises(BuildError, match="--overwrite"):
        _build([pretrain_jsonl], tmp_path / "a")
    s = _build([pretrain_jsonl], tmp_path / "a", max_tokens=2000, overwrite=True)
    assert 2000 <= s["tokens"] < 2000 + 1000
    assert s["splits"]["train"]["tokens"] + s["splits"]["val"]["tokens"] == s["tokens"]


def test_bad_rows_reported_and_skipped(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join([
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"txt": "wrong key"}),
        json.dumps({"text": "   "}),
        json.dumps({"text": 5}),
        json.dumps({"text": "good two"}),
    ]) + "\n", encoding="utf-8")
    msgs = []
    s = _build([str(src)], tmp_path / "out", val_docs=0, log=msgs.append)
    assert s["documents"] == 2 and s["bad_rows"] == 4
    text = "\n".join(msgs)
    for line in (2, 3, 4, 5):
        assert f"{src}:{line}:" in text
    assert "bad JSON" in text and 'missing "text"' in text and 'blank "text"' in text
    with pytest.raises(BuildError, match=r"bad\.jsonl:2: bad JSON"):
        _build([str(src)], tmp_path / "strict", strict=True)
    assert not os.path.exists(tmp_path / "strict" / "index.json")


def test_bad_sft_rows(tmp_path):
    src = tmp_path / "sft.jsonl"
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    src.write_text("\n".join([
        json.dumps(good),
        json.dumps({"conversations": [{"role": "user", "content": "no answer"}]}),
        json.dumps({"conversations": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"conversations": "nope"}),
    ]) + "\n", encoding="utf-8")
    msgs = []
    s = _build([str(src)], tmp_path / "out", kind="sft", val_docs=0, log=msgs.append)
    assert s["documents"] == 1 and s["bad_rows"] == 3
    text = "\n".join(msgs)
    assert f"{src}:2: conversation has no assistant turn" in text
    assert f"{src}:3:" in text and "unknown role" in text
    assert f"{src}:4:" in text


def test_sft_shards_keep_assistant_mask(sft_jsonl, tmp_path):
    from llada_scale.data.tokenizer import Tokenizer

    s = _build([sft_jsonl], tmp_path / "sft", kind="sft", val_docs=4)
    assert s["documents"] == 60
    tok = Tokenizer.load(TOKENIZER)
    rows = [json.loads(line)["conversations"] for line in open(sft_jsonl, encoding="utf-8")]
    seen = 0
    for split in ("train", "val"):
        for path, docs, tokens in shard_paths(str(tmp_path / "sft"), split):
            for key, ids, mask in read_shard(path, docs, tokens):
                exp_ids, exp_mask = tok.render_chat(rows[int(key)])
                assert ids.tolist() == exp_ids
                assert mask.dtype == np.uint8 and mask.astype(bool).tolist() == exp_mask
                seen += 1
    assert seen == 60


def test_load_index_errors(tmp_path):
    with pytest.raises(ShardIndexNotFoundError, match="build_shards"):
        load_index(str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(ShardError, match="llada_scale.shards.v1"):
        load_index(str(tmp_path))
    (tmp_path / "index.json").write_text("{oops")
    with pytest.raises(ShardError, match="cannot parse"):
        load_index(str(tmp_path))


def test_corrupt_shard_clear_error_through_loader(pretrain_jsonl, tmp_path):
    from llada_scale.data.loader import PackedDataset

    out = tmp_path / "c"
    _build([pretrain_jsonl], out, val_docs=0, shard_tokens=100_000)  # one shard
    (path, _, _), = shard_paths(str(out), "train")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2 + 77])  # truncated mid-member
    ds = PackedDataset(str(out), "train", seq_len=64, micro_batch_size=2)
    with pytest.raises(ShardError) as info:
        next(iter(ds))
    msg = str(info.value)
    assert path in msg and "build_shards" in msg and ("truncated" in msg or "corrupt" in msg)
    # garbage bytes instead of a tar
    with open(path, "wb") as f:
        f.write(b"\x00garbage" * 1000)
    with pytest.raises(ShardError, match="build_shards"):
        next(iter(PackedDataset(str(out), "train", seq_len=64, micro_batch_size=2)))


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_shards.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli(pretrain_jsonl, tmp_path):
    r = _cli("--input", pretrain_jsonl, "--tokenizer", TOKENIZER, "--output", str(tmp_path / "o"), "--kind",
             "pretrain", "--shard_tokens", "5000", "--num_workers", "1", "--no_progress")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "tokens/s" in r.stdout
    r = _cli("--input", str(tmp_path / "missing.jsonl"), "--tokenizer", TOKENIZER, "--output",
             str(tmp_path / "x"), "--kind", "pretrain")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: input file not found")
    r = _cli("--input", pretrain_jsonl, "--tokenizer", str(tmp_path / "no_tok"), "--output", str(tmp_path / "x"),
             "--kind", "pretrain")
    assert r.returncode == 2 and "error: tokenizer not found" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--help")
    assert r.returncode == 0 and "--shard_tokens" in r.stdout and "--strict" in r.stdout
