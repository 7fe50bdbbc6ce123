"""Resharding a loader position to another data-parallel layout (world size, loader workers, micro batch,
seq_len): which pieces of the interrupted epoch are left, and how they are spread over the new streams.

The guarantee is stated in :meth:`llada_scale.data.loader.PackedDataset.load_resharded`; the functions here take
the (new-layout) :class:`~llada_scale.data.loader.PackedDataset` as ``ds``.
"""

from __future__ import annotations

import heapq

import numpy as np

from llada_scale.data.shards import read_shard


def stream_quota(ds, fp: dict) -> int:
    """Batches per epoch of one stream under the (old) layout described by fingerprint ``fp``."""
    streams = fp["world_size"] * max(1, fp["num_workers"])
    k = len(ds.shards) // streams
    if ds.kind == "pretrain":
        sizes = sorted(tokens + docs for _, docs, tokens in ds.shards)
        return sum(sizes[:k]) // (fp["seq_len"] * fp["micro_batch_size"])
    return sum(sorted(docs for _, docs, _ in ds.shards)[:k]) // fp["micro_batch_size"]


def doc_lengths(ds, shard_idx: int) -> np.ndarray:
    """Token counts of the documents of a shard in tar order, from the tar headers (no decoding)."""
    import tarfile

    path, docs, tokens = ds.shards[shard_idx]
    itemsize = np.dtype(ds.index.get("dtype", "uint16")).itemsize
    from llada_scale.data import remote

    with remote.open_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:  # also pipe: / URLs
        sizes = np.array([m.size for m in tf if m.name.endswith(".input_ids.npy")], dtype=np.int64)
    lengths = (sizes - 128) // itemsize  # np.save v1.0 header of a 1-D array: 128 bytes
    if len(lengths) != docs or int(lengths.sum()) != tokens:  # another header size: decode for real
        lengths = np.array([s[1].size for s in read_shard(path, docs, tokens)], dtype=np.int64)
    return lengths


def remaining_capacity(ds, shard_idx: int, epoch: int, sample_pos: int, token_pos: int) -> int:
    """Capacity left in a shard from (sample_pos, token_pos) on: tokens incl. EOS, or SFT rows."""
    _, docs, tokens = ds.shards[shard_idx]
    if ds.kind != "pretrain":
        return max(0, docs - sample_pos)
    if sample_pos == 0 and token_pos == 0:
        return tokens + docs
    if sample_pos >= docs:
        return 0
    lengths = doc_lengths(ds, shard_idx)
    order = np.random.default_rng([ds.seed, epoch, shard_idx, 0]).permutation(docs)
    return int((lengths[order[sample_pos:]] + 1).sum()) - token_pos


def reshard_plan(ds, old_states: list[dict]) -> dict:
    """{'epoch', 'quota', 'plans': {stream: [[shard, sample, token], ...]}} or {'epoch'} for a fresh epoch."""
    fp = old_states[0]["fingerprint"]
    W, nw = fp["world_size"], max(1, fp["num_workers"])
    k_old = stream_quota(ds, fp)
    by_stream: dict[tuple[int, int], dict] = {}
    for st in old_states:
        pos = {**ds.fresh_position(), **{k: st[k] for k in ds.fresh_position() if k in st}}
        quota = pos["quota"] if pos.get("plan") else k_old
        if pos["finished"] or pos["batches"] >= quota:  # this stream finished its epoch
            pos = {**ds.fresh_position(), "epoch": pos["epoch"] + 1}
        by_stream[(st["fingerprint"]["rank"], st.get("worker", 0))] = pos
    epoch = min(p["epoch"] for p in by_stream.values())
    # A stream without a state never yielded a batch: it has not started (only possible in epoch 0).
    streams_old = [by_stream.get((r, w), {**ds.fresh_position(), "epoch": epoch})
                   for r in range(W) for w in range(nw)]
    untouched = {**ds.fresh_position(), "epoch": epoch}
    if all(p == untouched for p in streams_old):
        return {"epoch": epoch}  # at an epoch boundary: the new layout's normal assignment
    pieces: list[list[int]] = []
    for i, pos in enumerate(streams_old):
        # Streams run in lockstep, so a stream ahead (epoch + 1) is one that finished `epoch`: nothing left.
        # After an SFT wrap-around (pass > 0) every row of the stream was read once: nothing left either.
        if pos["epoch"] != epoch or pos["pass"] > 0:
            continue
        r, w = divmod(i, nw)
        segs = pos["plan"] or [[s, 0, 0] for s in ds.shard_order(epoch)[r::W][w::nw]]
        sp = pos["shard_pos"]
        if sp < len(segs):
            pieces.append([segs[sp][0], pos["sample_pos"], pos["token_pos"]])
            pieces.extend([list(x) for x in segs[sp + 1:]])
    caps = [remaining_capacity(ds, s, epoch, a, t) for s, a, t in pieces]
    keep = [i for i, c in enumerate(caps) if c > 0]
    streams = ds.world_size * max(1, ds.num_workers)
    load = [0] * streams
    members: list[list[int]] = [[] for _ in range(streams)]
    heap = [(0, j) for j in range(streams)]
    for i in sorted(keep, key=lambda i: (-caps[i], i)):  # largest piece onto the least loaded stream
        _, j = heapq.heappop(heap)
        load[j] += caps[i]
        members[j].append(i)
        heapq.heappush(heap, (load[j], j))
    per_batch = ds.seq_len * ds.micro_batch_size if ds.kind == "pretrain" else ds.micro_batch_size
    quota = min(load) // per_batch
    if quota == 0:
        return {"epoch": epoch + 1}
    started = lambda i: pieces[i][1] > 0 or pieces[i][2] > 0  # noqa: E731  (continued first)
    return {"epoch": epoch, "quota": quota,
            "plans": {j: [pieces[i] for i in sorted(m, key=lambda i: (not started(i), i))]
                      for j, m in enumerate(members)}}
