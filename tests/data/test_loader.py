"""Tests for llada_scale.data.loader on tiny synthetic shards written to tmp_path."""

import json
import warnings

import numpy as np
import pytest
import torch

from llada_scale.data.loader import LoaderError, LoaderStateError, PackedDataset, build_dataloader
from llada_scale.data.shards import (FORMAT, Document, load_index, read_shard, shard_paths, write_shard,
                                     write_shard_dir)

warnings.filterwarnings("ignore", message=".*set_vital.*")

EOS = 2
IDENT = {"eos_token_id": EOS, "vocab_size": 1000, "padded_vocab_size": 1024, "mask_token_id": 999}
KEYS = ("input_ids", "position_ids", "document_ids", "prompt_mask", "padding_mask")


def _doc(key, length, rng):
    """Token 0 of a document is 10 + key (< 100, identifies it); the rest are random ids in [100, 900)."""
    assert key < 90
    ids = rng.integers(100, 900, size=length)
    ids[0] = 10 + key
    return Document(key, ids)


def make_pretrain(tmp_path, shard_doc_lengths, name="pre"):
    """One shard per entry of shard_doc_lengths (list of document lengths), via the shards.py writer."""
    rng = np.random.default_rng(0)
    docs, key = [], 0
    for lengths in shard_doc_lengths:
        for n in lengths:
            docs.append(_doc(key, n, rng))
            key += 1
    out = tmp_path / name
    out.mkdir()
    # write the shards with exactly the requested grouping (write_shard_dir groups by token count)
    entries, start = [], 0
    for i, lengths in enumerate(shard_doc_lengths):
        shard = f"train-{i:06d}.tar"
        n_docs, n_tokens = write_shard(str(out / shard), docs[start:start + len(lengths)], np.uint16)
        entries.append({"shard": shard, "documents": n_docs, "tokens": n_tokens})
        start += len(lengths)
    index = {"format": FORMAT, "kind": "pretrain", "tokenizer": IDENT, "dtype": "uint16", "seed": 0,
             "shard_tokens": 0, "sources": [], "splits": {"train": entries, "val": []}}
    (out / "index.json").write_text(json.dumps(index))
    return str(out), {int(d.input_ids[0]) - 10: d.input_ids for d in docs}


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _check_pretrain_batch(b, L, B):
    for k in KEYS:
        assert b[k].shape == (B, L)
    assert b["input_ids"].dtype == torch.int64 and b["position_ids"].dtype == torch.int64
    assert b["document_ids"].dtype == torch.int32
    assert b["prompt_mask"].dtype == torch.bool and b["padding_mask"].dtype == torch.bool
    assert not b["prompt_mask"].any() and not b["padding_mask"].any()
    pos, doc, ids = b["position_ids"], b["document_ids"], b["input_ids"]
    assert (pos[:, 0] == 0).all() and (doc[:, 0] == 0).all()
    restart = pos[:, 1:] == 0
    # positions count up by one inside a segment, restart at 0 exactly where document_ids change
    assert ((pos[:, 1:] == pos[:, :-1] + 1) | restart).all()
    assert torch.equal(doc[:, 1:] - doc[:, :-1], restart.to(torch.int32))
    # inside a row, every restart is preceded by an EOS (end of the previous document)
    assert (ids[:, :-1][restart] == EOS).all()


def test_pretrain_packing(tmp_path):
    lengths = [[5, 17, 40, 3, 9], [12, 30, 2, 25], [8, 8, 8, 50]]
    shard_dir, docs = make_pretrain(tmp_path, lengths)
    L, B = 16, 3
    ds = PackedDataset(shard_dir, "train", L, B, infinite=False)
    total = sum(map(sum, lengths)) + sum(map(len, lengths))
    assert ds.batches_per_epoch() == total // (L * B)
    batches = list(ds)
    assert len(batches) == ds.batches_per_epoch()
    for b in batches:
        _check_pretrain_batch(b, L, B)
    # the concatenated rows are the documents, each followed by EOS, in some order (last one may be cut)
    stream = torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()
    pieces, cur = [], []
    for t in stream:
        cur.append(t)
        if t == EOS:
            pieces.append(cur[:-1])
            cur = []
    for p in pieces:
        key = p[0] - 10
        assert p == docs[key].tolist()
    assert len({p[0] for p in pieces}) == len(pieces)


def test_document_split_across_rows_restarts_positions(tmp_path):
    shard_dir, docs = make_pretrain(tmp_path, [[30]])
    b = next(iter(PackedDataset(shard_dir, "train", 8, 3)))
    # doc of 30 tokens + EOS spans rows: every row starts a new segment at position 0
    assert b["position_ids"].tolist() == [list(range(8))] * 3
    assert b["input_ids"].reshape(-1).tolist() == docs[0][:24].tolist()


def make_sft(tmp_path, convs, shards=2):
    """convs: list of (ids, mask) lists; written round-robin into `shards` shards via write_shard_dir."""
    docs = [Document(i, np.asarray(ids), np.asarray(mask, dtype=np.uint8)) for i, (ids, mask) in enumerate(convs)]
    out = tmp_path / "sft"
    total = sum(len(d.input_ids) for d in docs)
    write_shard_dir(str(out), "sft", {"train": docs}, IDENT, shard_tokens=max(1, total // shards + 1))
    return str(out)


def test_sft_masks(tmp_path):
    L = 12
    convs = [
        ([1, 20, 21, 2, 1, 30, 31, 32, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]),                  # fits, padded
        ([1, 22, 2, 1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 2], [0] * 4 + [1] * 11),   # truncated
        ([1] + [23] * 14 + [2, 1, 50, 2], [0] * 17 + [1, 1]),                              # assistant cut: skipped
        ([1, 24, 2, 1, 60, 2, 1, 25, 2, 1, 61, 2], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]),  # multi-turn, exact fit
    ]
    shard_dir = make_sft(tmp_path, convs, shards=2)
    assert load_index(shard_dir)["kind"] == "sft"
    ds = PackedDataset(shard_dir, "train", L, 1, infinite=False)
    rows = [b for b in ds]
    by_first = {}
    for b in rows:
        for k in KEYS:
            assert b[k].shape == (1, L)
        ids = b["input_ids"][0].tolist()
        by_first[ids[1]] = b
        assert b["position_ids"][0].tolist() == list(range(L))
        assert not b["document_ids"].any() and b["document_ids"].dtype == torch.int32
    assert 23 not in by_first  # the conversation whose answer lies beyond seq_len is skipped
    for conv_ids, conv_mask in (convs[0], convs[1], convs[3]):
        if conv_ids[1] not in by_first:
            continue  # only batches_per_epoch rows per epoch (index-based bound)
        b = by_first[conv_ids[1]]
        n = min(len(conv_ids), L)
        exp_ids = conv_ids[:n] + [EOS] * (L - n)
        assert b["input_ids"][0].tolist() == exp_ids
        pad = [False] * n + [True] * (L - n)
        assert b["padding_mask"][0].tolist() == pad
        assert b["prompt_mask"][0].tolist() == [not m for m in conv_mask[:n]] + [False] * (L - n)
    assert len(rows) == ds.batches_per_epoch() == 4  # 4 docs // B=1, the skipped row replaced by a wrap


def test_sft_infinite_wraps_without_stalling(tmp_path):
    convs = [([1, 5, 6, 7], [0, 0, 1, 1])] * 3 + [([1] * 20 + [9], [0] * 20 + [1])] * 3
    shard_dir = make_sft(tmp_path, convs, shards=1)
    ds = PackedDataset(shard_dir, "train", 8, 2)
    assert ds.batches_per_epoch() == 3
    batches = _batches(ds, 7)
    assert all(not (b["input_ids"] == 9).any() for b in batches)


UNEVEN = [[40, 7, 3], [9, 20], [60, 60, 60, 10], [25, 4], [12, 12, 12]]


def test_equal_batches_across_ranks_uneven_shards(tmp_path):
    shard_dir, _ = make_pretrain(tmp_path, UNEVEN)
    L, B = 8, 2
    counts, seen = [], []
    for rank in (0, 1):
        ds = PackedDataset(shard_dir, "train", L, B, rank=rank, world_size=2, infinite=False)
        batches = list(ds)
        counts.append((len(batches), ds.batches_per_epoch()))
        first_tokens = {t for b in batches for t in b["input_ids"].reshape(-1).tolist() if 10 <= t < 10 + 100}
        seen.append(first_tokens)
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] > 0
    # with workers: every (rank, worker) stream yields the same count
    for rank in (0, 1):
        ds = PackedDataset(shard_dir, "train", L, B, rank=rank, world_size=2, num_workers=2, infinite=False)
        assert len(list(build_dataloader(ds, 2))) == ds.batches_per_epoch()


def test_shard_assignment_disjoint_and_epoch_shuffled(tmp_path):
    shard_dir, _ = make_pretrain(tmp_path, UNEVEN)
    r0 = PackedDataset(shard_dir, "train", 8, 2, rank=0, world_size=2, seed=5)
    r1 = PackedDataset(shard_dir, "train", 8, 2, rank=1, world_size=2, seed=5)
    orders = []
    for epoch in range(4):
        assert r0.shard_order(epoch) == r1.shard_order(epoch)
        a, b = set(r0.worker_shards(epoch)), set(r1.worker_shards(epoch))
        assert not a & b and a | b == set(range(5))
        orders.append(tuple(r0.shard_order(epoch)))
    assert len(set(orders)) > 1
    # the documents actually read by the two ranks in one epoch come from disjoint shards
    paths = [p for p, _, _ in shard_paths(shard_dir, "train")]
    shard_of = {int(ids[0]) - 10: i for i, p in enumerate(paths) for _, ids, _ in read_shard(p)}
    got = []
    for ds in (r0, r1):
        ds.infinite = False
        toks = {t - 10 for b in ds for t in b["input_ids"].reshape(-1).tolist()} & set(shard_of)
        got.append({shard_of[k] for k in toks})
        assert got[-1] <= set(ds.worker_shards(0))
    assert got[0] and got[1] and not got[0] & got[1]
    # too few shards for 2 ranks x 3 workers
    with pytest.raises(LoaderError, match="at least 6"):
        PackedDataset(shard_dir, "train", 8, 2, world_size=2, num_workers=3)


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in KEYS)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_exact_across_epoch_boundary(tmp_path, num_workers):
    shard_dir, _ = make_pretrain(tmp_path, UNEVEN)
    L, B = 8, 2

    def loader():
        ds = PackedDataset(shard_dir, "train", L, B, num_workers=num_workers, seed=1)
        return ds, build_dataloader(ds, num_workers)

    ds, ref_loader = loader()
    per_epoch = ds.batches_per_epoch()
    k, n = per_epoch - 3, 8  # the n resumed batches cross into the next epoch
    ref = _batches(ref_loader, k + n)
    _, dl = loader()
    it = iter(dl)
    for i in range(k):
        assert _equal(next(it), ref[i])
    state = dl.state_dict()
    del it, dl
    _, dl2 = loader()
    dl2.load_state_dict(state)
    resumed = _batches(dl2, n)
    for i in range(n):
        assert _equal(resumed[i], ref[k + i]), f"batch {k + i} differs after resume"
    # and the next epoch really is a different order than the first
    assert not all(_equal(ref[i], ref[per_epoch + i]) for i in range(min(n - 3, per_epoch)))


def test_fingerprint_mismatch_raises(tmp_path):
    shard_dir, _ = make_pretrain(tmp_path, UNEVEN)
    ds = PackedDataset(shard_dir, "train", 8, 2)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    assert state["batches"] == 1
    for kwargs in ({"seq_len": 16}, {"seed": 1}, {"micro_batch_size": 1}):
        args = {"seq_len": 8, "micro_batch_size": 2, **kwargs}
        other = PackedDataset(shard_dir, "train", args["seq_len"], args["micro_batch_size"], seed=args.get("seed", 0))
        with pytest.raises(LoaderStateError, match="does not match"):
            other.load_state_dict(state)
    with pytest.raises(LoaderStateError):
        ds.load_state_dict({"foo": 1})
    same = PackedDataset(shard_dir, "train", 8, 2)
    same.load_state_dict(state)
    assert _equal(next(iter(same)), next(it))


def test_bad_config_errors(tmp_path):
    shard_dir, _ = make_pretrain(tmp_path, [[5]])
    with pytest.raises(LoaderError, match="too small"):
        PackedDataset(shard_dir, "train", 64, 4)
    with pytest.raises(LoaderError, match="seq_len"):
        PackedDataset(shard_dir, "train", 0, 4)
    ds = PackedDataset(shard_dir, "train", 2, 1)
    with pytest.raises(LoaderError, match="num_workers"):
        build_dataloader(ds, 2)
    with pytest.raises(ValueError, match="split 'val' has no shards"):
        PackedDataset(shard_dir, "val", 2, 1)
