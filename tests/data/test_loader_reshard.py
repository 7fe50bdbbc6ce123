"""PackedDataset.load_resharded: continuing a run under another data-parallel layout (world size, loader
workers, micro batch) repeats no document and skips none mid-way (see the method's docstring)."""

import json
import warnings
from collections import Counter

import numpy as np
import pytest

from llada_scale.data.loader import LoaderStateError, PackedDataset, build_dataloader, loader_dataset_states
from llada_scale.data.shards import FORMAT, Document, write_shard

warnings.filterwarnings("ignore", message=".*set_vital.*")

EOS = 2
IDENT = {"eos_token_id": EOS, "vocab_size": 65000, "padded_vocab_size": 65024, "mask_token_id": 64999}


def make_shards(tmp_path, n_shards=10, docs_per_shard=6, seed=0):
    """Token ``3 + doc * 200 + offset`` names its document and offset; lengths 20..150."""
    rng = np.random.default_rng(seed)
    out = tmp_path / "shards"
    out.mkdir()
    entries, doc = [], 0
    for i in range(n_shards):
        docs = []
        for _ in range(docs_per_shard):
            n = int(rng.integers(20, 150))
            docs.append(Document(doc, 3 + doc * 200 + np.arange(n)))
            doc += 1
        shard = f"train-{i:06d}.tar"
        n_docs, n_tokens = write_shard(str(out / shard), docs, np.uint16)
        entries.append({"shard": shard, "documents": n_docs, "tokens": n_tokens})
    index = {"format": FORMAT, "kind": "pretrain", "tokenizer": IDENT, "dtype": "uint16", "seed": 0,
             "shard_tokens": 0, "sources": [], "splits": {"train": entries, "val": []}}
    (out / "index.json").write_text(json.dumps(index))
    return str(out)


def tokens_of(batch):
    ids = batch["input_ids"].reshape(-1).numpy()
    return [int(t) for t in ids if t != EOS]


def run_epoch_part(shard_dir, world, workers, mb, n_batches=None, old_states=None, seq_len=32):
    """Iterate every rank; return (tokens per rank, final loader states of every rank, batches per rank)."""
    tokens, states, counts = [], [], []
    for rank in range(world):
        ds = PackedDataset(shard_dir, "train", seq_len, mb, rank=rank, world_size=world, num_workers=workers)
        if old_states is not None:
            ds.load_resharded(old_states)
        dl = build_dataloader(ds, workers)
        it = iter(dl)
        got, n = [], 0
        if n_batches is not None:
            for _ in range(n_batches):
                got.extend(tokens_of(next(it)))
                n += 1
        else:  # to the end of epoch 0 (every worker's state says epoch 1); keep only epoch-0 batches
            while True:
                b = next(it)
                sd = dl.state_dict()
                ws = {s["worker"]: s for s in loader_dataset_states(sd)}
                w = sd["_snapshot"]["_last_yielded_worker_id"] if workers else 0
                if ws[w]["epoch"] == 0:
                    got.extend(tokens_of(b))
                    n += 1
                if len(ws) == max(1, workers) and all(s["epoch"] >= 1 for s in ws.values()):
                    break
        tokens.append(got)
        states.append(dl.state_dict())
        counts.append(n)
    return tokens, states, counts


def check_no_repeat_no_gap(all_tokens):
    """No token twice; per document the offsets read form a prefix 0..k (nothing skipped mid-document)."""
    counts = Counter(all_tokens)
    assert max(counts.values()) == 1, [t for t, c in counts.items() if c > 1][:10]
    by_doc: dict[int, list[int]] = {}
    for t in all_tokens:
        by_doc.setdefault((t - 3) // 200, []).append((t - 3) % 200)
    for doc, offs in by_doc.items():
        assert sorted(offs) == list(range(len(offs))), f"document {doc} has a gap: {sorted(offs)[:20]}..."


@pytest.mark.parametrize("old,new", [((2, 0, 4), (1, 0, 8)), ((2, 0, 4), (3, 0, 4)), ((1, 2, 4), (2, 0, 2)),
                                     ((3, 0, 2), (2, 2, 4))])
def test_reshard_mid_epoch_repeats_and_skips_nothing(tmp_path, old, new):
    shard_dir = make_shards(tmp_path)
    (w0, nw0, mb0), (w1, nw1, mb1) = old, new
    before, states, _ = run_epoch_part(shard_dir, w0, nw0, mb0, n_batches=3)
    old_ds = [s for st in states for s in loader_dataset_states(st)]
    after, _, counts = run_epoch_part(shard_dir, w1, nw1, mb1, old_states=old_ds)
    assert len(set(counts)) == 1 and counts[0] > 0, f"new ranks yield {counts} batches in the resharded epoch"
    check_no_repeat_no_gap([t for r in before + after for t in r])
    # every document an old rank was in the middle of is finished after the change (continued first)
    lengths = {}
    for t in [t for r in before + after for t in r]:
        lengths[(t - 3) // 200] = max(lengths.get((t - 3) // 200, 0), (t - 3) % 200 + 1)
    unfinished = {d for d, n in lengths.items() if n < doc_length(shard_dir, d)}
    in_progress = {(r[-1] - 3) // 200 for r in before if r}  # the document each old rank stopped in
    assert not (unfinished & in_progress), "a document the old run was in was not continued"


def doc_length(shard_dir, doc):
    from llada_scale.data.shards import read_shard
    if not hasattr(doc_length, "cache"):
        doc_length.cache = {}
    if shard_dir not in doc_length.cache:
        lens = {}
        for i in range(10):
            for key, ids, _ in read_shard(f"{shard_dir}/train-{i:06d}.tar"):
                lens[int(key)] = ids.size
        doc_length.cache[shard_dir] = lens
    return doc_length.cache[shard_dir][doc]


def test_reshard_state_roundtrip_and_next_epoch_normal(tmp_path):
    """A resharded position saves/loads like any state; the epoch after uses the normal assignment."""
    shard_dir = make_shards(tmp_path)
    _, states, _ = run_epoch_part(shard_dir, 2, 0, 4, n_batches=2)
    old_ds = [s for st in states for s in loader_dataset_states(st)]
    ds = PackedDataset(shard_dir, "train", 32, 4, rank=0, world_size=1)
    ds.load_resharded(old_ds)
    dl = build_dataloader(ds, 0)
    it = iter(dl)
    first = [next(it) for _ in range(2)]
    saved = dl.state_dict()
    assert saved["dataset_state"]["plan"] and saved["dataset_state"]["quota"]
    rest = [next(it) for _ in range(3)]
    ds2 = PackedDataset(shard_dir, "train", 32, 4, rank=0, world_size=1)
    dl2 = build_dataloader(ds2, 0)
    dl2.load_state_dict(saved)
    it2 = iter(dl2)
    for a in rest:
        assert (next(it2)["input_ids"] == a["input_ids"]).all()
    # run to epoch 1 and compare with a fresh 1-rank loader's epoch 1
    quota = saved["dataset_state"]["quota"]
    for _ in range(quota - 5):
        next(it2)
    fresh = PackedDataset(shard_dir, "train", 32, 4, rank=0, world_size=1)
    fresh.load_state_dict({**fresh.state_dict(), "epoch": 1})
    want = next(iter(build_dataloader(fresh, 0)))
    assert (next(it2)["input_ids"] == want["input_ids"]).all()
    assert first


def test_reshard_at_epoch_boundary_is_the_normal_assignment(tmp_path):
    shard_dir = make_shards(tmp_path)
    ds = PackedDataset(shard_dir, "train", 32, 4, rank=0, world_size=2)
    k = ds.batches_per_epoch()
    _, states, _ = run_epoch_part(shard_dir, 2, 0, 4, n_batches=k)
    ds1 = PackedDataset(shard_dir, "train", 32, 4, rank=0, world_size=1)
    ds1.load_resharded([s for st in states for s in loader_dataset_states(st)])
    st = ds1.state_dict()
    assert st["epoch"] == 1 and st["plan"] is None and st["batches"] == 0


def test_reshard_rejects_other_data(tmp_path):
    shard_dir = make_shards(tmp_path)
    _, states, _ = run_epoch_part(shard_dir, 2, 0, 4, n_batches=1)
    ds = PackedDataset(shard_dir, "train", 32, 4, rank=0, world_size=1, seed=5)
    with pytest.raises(LoaderStateError, match="seed"):
        ds.load_resharded([s for st in states for s in loader_dataset_states(st)])
    with pytest.raises(LoaderStateError):
        ds.load_resharded([])
