"""Packed, rank-equalised, exactly resumable loader over llada_scale token shards.

:class:`PackedDataset` turns a shard directory (see :mod:`llada_scale.data.shards`) into an endless (or
one-epoch) stream of micro batches, and :func:`build_dataloader` wraps it in a torchdata
``StatefulDataLoader`` whose ``state_dict()`` resumes the stream exactly.

Batch contract (every tensor has shape ``[micro_batch_size, seq_len]``):

==================  =======  ===========================================================================
key                 dtype    meaning
==================  =======  ===========================================================================
``input_ids``       int64    token ids
``position_ids``    int64    restart at 0 at every segment: each document start and each row start (a
                             document split across rows continues in the next row as a new segment)
``document_ids``    int32    0, 1, 2, ... per segment within a row (changes exactly where positions
                             restart); SFT rows are a single segment (all 0, padding included)
``prompt_mask``     bool     SFT: True on conversation tokens outside assistant turns (system/user text,
                             role headers); False on assistant tokens and on padding. Pretraining: False
``padding_mask``    bool     SFT: True on the EOS padding after the conversation. Pretraining: False
==================  =======  ===========================================================================

Pretraining packs documents, each followed by the EOS token, into rows of exactly ``seq_len`` tokens
(no padding), carrying the remainder of a document into the next row. SFT puts one conversation per row,
truncated to ``seq_len``, padded with EOS (``position_ids`` keep counting through the padding); a row
whose assistant tokens were all truncated away is skipped.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from llada_scale.data.reshard import reshard_plan
from llada_scale.data.shards import ShardError, index_sha256, load_index, read_shard, shard_paths

__all__ = ["LoaderError", "LoaderStateError", "PackedDataset", "build_dataloader", "loader_dataset_states",
           "ShardError"]

_STATE_VERSION = 2  # 2 adds "plan"/"quota" (the epoch in which the data-parallel layout changed); 1 still loads
# Fingerprint keys that may differ when continuing under another data-parallel layout (see load_resharded).
_LAYOUT_KEYS = ("world_size", "rank", "num_workers", "micro_batch_size", "seq_len")


class LoaderError(ValueError):
    """Bad loader configuration (message says how to fix it)."""


class LoaderStateError(LoaderError):
    """A loader state dict that does not belong to this dataset configuration."""


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LoaderError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class PackedDataset(IterableDataset):
    """Micro batches of packed (pretraining) or padded (SFT) token rows from a shard directory.

    Args:
        shard_dir: directory with ``index.json`` written by ``tools/build_shards.py``.
        split: ``"train"`` or ``"val"``.
        seq_len: tokens per row ``L``.
        micro_batch_size: rows per batch ``B``.
        rank, world_size: data-parallel position of this process.
        seed: shuffling seed (shard order per epoch, document order within a shard).
        eos_token_id: separator/padding token; default: the index's tokenizer ``eos_token_id``.
        num_workers: loader worker processes this dataset will run in (0 = main process). Must equal the
            ``num_workers`` given to :func:`build_dataloader`; it is part of the deterministic split.
        infinite: True: epochs follow each other forever (training). False: stop after one epoch
            (validation; a new ``iter`` then starts the epoch again from the beginning).
        vocab_size: when given, every token id read must be below it (the model's embedding rows); a
            shard holding a larger id raises ShardError naming the shard (instead of an IndexError deep in
            the model's embedding lookup).

    Sharding (WebDataset's ``split_by_node`` + ``split_by_worker``, done explicitly so the assignment is
    deterministic, testable and changes every epoch): at epoch ``e`` the split's shard list is shuffled
    with ``random.Random(seed + e)`` -- identically on every rank -- then rank ``r`` takes
    ``shards[r::world_size]`` and its worker ``w`` takes ``that[w::max(1, num_workers)]``. Within a
    shard the documents are shuffled with a generator seeded by (seed, epoch, shard, pass). Shards are
    read with a WebDataset pipeline (``SimpleShardList`` + ``tarfile_to_samples``), one shard at a time.

    Equal batches: every (rank, worker) yields exactly ``K = batches_per_epoch() / max(1, num_workers)``
    batches per epoch, so uneven shards never desynchronise ranks. ``K`` comes from the index alone and
    holds for every epoch: each of the ``P = world_size * max(1, num_workers)`` streams gets at least
    ``k = n_shards // P`` shards, so its capacity is at least the size of the ``k`` smallest shards:
    pretraining ``K = floor(sum(tokens + documents of the k smallest) / (L * B))`` (each document adds an
    EOS), SFT ``K = floor(sum(documents of the k smallest) / B)``. Data beyond ``K`` batches in a stream
    is dropped for that epoch (waste: at most about one shard per stream plus the difference between its
    shards and the k smallest; another epoch assigns shards differently). If SFT truncation skips so many
    rows that a stream runs dry before ``K`` batches, it wraps around to its first shard (pass + 1).

    Changing the layout (world size, loader workers, micro batch, seq_len) mid-run: see
    :meth:`load_resharded` -- no document is repeated or skipped mid-shard; the exact guarantee is there.

    State: :meth:`state_dict` describes the position AFTER the last yielded batch (epoch, index into this
    worker's shard list, documents consumed in that shard, tokens of the current document already packed
    -- the packer's leftover --, batches yielded this epoch, pass) plus a fingerprint checked by
    :meth:`load_state_dict`. Rows are filled strictly from the document stream, so this position is the
    whole packer state; resume re-opens the shard list at that shard and skips the consumed documents.

    Raises (constructor):
        ShardIndexNotFoundError / ShardError: missing or invalid index, unknown split, missing shard.
        LoaderError: bad sizes, fewer shards than ``world_size * max(1, num_workers)``, or shards too small
            for even one batch per stream.
    Iteration raises ShardError naming the shard path on a truncated/corrupt tar.
    """

    def __init__(self, shard_dir: str, split: str, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, eos_token_id: int | None = None, num_workers: int = 0,
                 infinite: bool = True, vocab_size: int | None = None) -> None:
        super().__init__()
        self.seq_len = _positive_int("seq_len", seq_len)
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.world_size = _positive_int("world_size", world_size)
        self.rank = _positive_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise LoaderError(f"rank {rank} must be < world_size {world_size}")
        self.num_workers = _positive_int("num_workers", num_workers, 0)
        self.seed = int(seed)
        self.infinite = bool(infinite)
        self.shard_dir = shard_dir
        self.split = split
        self.index = load_index(shard_dir)
        self.kind = self.index["kind"]
        self.index_hash = index_sha256(shard_dir)
        self.shards = shard_paths(shard_dir, split, self.index)
        if eos_token_id is None:
            eos_token_id = self.index["tokenizer"].get("eos_token_id")
            if eos_token_id is None:
                raise LoaderError(f"{shard_dir}/index.json has no tokenizer eos_token_id; pass eos_token_id=")
        self.eos_token_id = _positive_int("eos_token_id", eos_token_id, 0)
        self.vocab_size = None if vocab_size is None else _positive_int("vocab_size", vocab_size)

        streams = self.world_size * max(1, self.num_workers)
        n = len(self.shards)
        if n < streams:
            raise LoaderError(
                f"{shard_dir}: split {split!r} has {n} shards but world_size {self.world_size} x "
                f"{max(1, self.num_workers)} loader workers needs at least {streams}; rebuild with a smaller "
                f"--shard_tokens (or use fewer workers)")
        k = n // streams
        if self.kind == "pretrain":
            sizes = sorted(tokens + docs for _, docs, tokens in self.shards)
            per_batch = self.seq_len * self.micro_batch_size
        else:
            sizes = sorted(docs for _, docs, _ in self.shards)
            per_batch = self.micro_batch_size
        self._worker_batches = sum(sizes[:k]) // per_batch
        if self._worker_batches == 0:
            raise LoaderError(
                f"{shard_dir}: split {split!r} is too small: each of the {streams} streams (ranks x workers) "
                f"gets at least {k} shard(s) holding {sum(sizes[:k])} {'tokens' if self.kind == 'pretrain' else 'rows'}, "
                f"less than one batch ({per_batch}); use a smaller seq_len/micro_batch_size or more data")
        self._pos: dict | None = None  # None = fresh start
        self._reshard_from: list[dict] | None = None  # old-layout states (load_resharded), applied lazily
        self._reshard_cache: dict | None = None

    # ------------------------------------------------------------------ public helpers
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (identical on every rank): per-worker batches x workers."""
        return self._worker_batches * max(1, self.num_workers)

    def fingerprint(self) -> dict:
        """Configuration a state dict must match: index hash, split, kind, sizes, ranks, workers, seed, eos."""
        return {"index_sha256": self.index_hash, "split": self.split, "kind": self.kind, "seq_len": self.seq_len,
                "micro_batch_size": self.micro_batch_size, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, "seed": self.seed, "eos_token_id": self.eos_token_id}

    def shard_order(self, epoch: int) -> list[int]:
        """Indices (into the split's index list) of all shards in epoch ``epoch``'s order (same on all ranks)."""
        order = list(range(len(self.shards)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def worker_shards(self, epoch: int, worker: int = 0) -> list[int]:
        """Shard indices read by (this rank, ``worker``) in epoch ``epoch``, in reading order."""
        return self.shard_order(epoch)[self.rank::self.world_size][worker::max(1, self.num_workers)]

    # ------------------------------------------------------------------ state
    def _worker_id(self) -> int:
        info = get_worker_info()
        if info is None:
            if self.num_workers > 1:
                raise LoaderError(f"dataset was built for num_workers={self.num_workers} but is iterated in the "
                                  f"main process; use build_dataloader(dataset, {self.num_workers})")
            return 0
        if info.num_workers != max(1, self.num_workers):
            raise LoaderError(f"dataset was built for num_workers={self.num_workers} but runs in a loader with "
                              f"{info.num_workers} workers; pass the same number to both")
        return info.id

    @staticmethod
    def fresh_position() -> dict:
        """The position (as in :meth:`state_dict`, without version/fingerprint) before the first batch of epoch 0."""
        return {"epoch": 0, "shard_pos": 0, "sample_pos": 0, "token_pos": 0, "batches": 0, "pass": 0,
                "finished": False, "plan": None, "quota": None}

    def _start_pos(self, worker: int) -> dict:
        """Position before the first batch: fresh, or derived from old-layout states (load_resharded)."""
        if self._reshard_from is not None:
            return self.reshard_state(self._reshard_from, worker)
        return self.fresh_position()

    def state_dict(self) -> dict:
        """Position after the last yielded batch of the current worker (JSON-serialisable dict).

        Keys: ``version``, ``fingerprint`` (see :meth:`fingerprint`), ``worker``, ``epoch``, ``shard_pos``
        (index into this worker's shard list for the epoch), ``sample_pos`` (documents fully consumed in
        that shard), ``token_pos`` (tokens of the next document already packed, the packer's leftover),
        ``batches`` (yielded this epoch), ``pass``, ``finished``.
        """
        worker = self._worker_id()
        pos = dict(self._pos) if self._pos is not None else self._start_pos(worker)
        return {"version": _STATE_VERSION, "fingerprint": self.fingerprint(), "worker": worker, **pos}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` output; the next ``iter`` continues right after that batch.

        Raises:
            LoaderStateError: not a state dict of this loader, or its fingerprint (data, seq_len, batch size,
                world size, rank, workers, seed, eos) or worker id differs from this dataset's.
        """
        if not isinstance(state, dict) or state.get("version") not in (1, _STATE_VERSION) or "fingerprint" not in state:
            raise LoaderStateError("not a PackedDataset state dict (missing version/fingerprint)")
        mine = self.fingerprint()
        theirs = state["fingerprint"]
        diff = [f"{k}: saved {theirs.get(k)!r} != now {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if diff:
            raise LoaderStateError("loader state does not match this dataset (" + "; ".join(diff) +
                                   "); resume with the same shards and loader settings, or start fresh")
        worker = self._worker_id()
        if state.get("worker") != worker:
            raise LoaderStateError(f"loader state is for worker {state.get('worker')}, loaded into worker {worker}")
        pos = self.fresh_position()
        for key in pos:
            if key not in state:
                if key in ("plan", "quota"):  # version 1
                    continue
                raise LoaderStateError(f"loader state lacks {key!r}")
            pos[key] = state[key]
        self._pos = pos
        self._reshard_from = None

    # ------------------------------------------------------------------ another data-parallel layout
    def same_layout(self, state: dict) -> bool:
        """Whether ``state`` (a :meth:`state_dict`) was written under this layout and can be loaded directly."""
        theirs = state.get("fingerprint", {}) if isinstance(state, dict) else {}
        return all(theirs.get(k) == v for k, v in self.fingerprint().items() if k != "rank")

    def load_resharded(self, old_states: list[dict]) -> None:
        """Continue from the states of ALL streams of a run with another data-parallel layout.

        ``old_states``: the :meth:`state_dict` of every (rank, worker) stream of the old run, in any order
        (a stream that never yielded may be missing: it counts as not started). World size, number of
        loader workers, micro batch size and seq_len may differ from this dataset's; the data (index hash),
        split, kind, seed and eos must not. Each new rank and worker derives its own position from the same
        list (deterministically), so no communication is needed. Applied lazily at the next ``iter``.

        Guarantee (the epoch E in which the layout changes; later epochs use the normal assignment):

        * No document is read twice in epoch E and no document is skipped mid-way: shards that old
          streams finished are not read again, the shard each old stream was in continues at the exact
          document and token where that stream stopped (its packer leftover included), and shards no old
          stream had reached are read from the start. Batches already yielded to the trainer before the
          checkpoint are exactly the ones not repeated; batches a worker had prefetched but the trainer had
          not consumed are not in the checkpoint and are produced again (they were never trained on).
        * These remaining pieces are spread over the new streams by size (largest first onto the least
          loaded stream); each new stream reads its continued (partly read) pieces first, and every new
          stream yields the same number ``quota`` of batches this epoch:
          ``floor(min stream capacity / batch size)`` (capacity in tokens incl. EOS, or rows for SFT).
          What a stream holds beyond ``quota`` batches is not read in epoch E -- at most the largest
          piece (<= one shard) plus one batch per stream, since largest-first placement keeps stream loads
          within one piece of each other: the same end-of-epoch equalisation every epoch does (data
          dropped from one epoch is read in the next, whose shard assignment differs).
        * If fewer pieces remain than new streams (``world_size x workers``), the rest of epoch E is not
          read and training continues at epoch E + 1; at an epoch boundary the layout change is seamless.
        * SFT only: as in any epoch, rows dropped for truncation may run a stream dry; it then wraps to
          the start of its pieces (pass + 1), which repeats rows, as documented for normal epochs.

        Cost: pretraining reads the tar headers of every partially read shard once (about 0.3 s per
        1M-token shard) to size what is left of it.

        Raises:
            LoaderStateError: a state of other data/split/seed, or states from mixed layouts.
        """
        if not old_states:
            raise LoaderStateError("load_resharded needs the loader states of the old run's streams, got none")
        for st in old_states:
            if not isinstance(st, dict) or st.get("version") not in (1, _STATE_VERSION) or "fingerprint" not in st:
                raise LoaderStateError("not a PackedDataset state dict (missing version/fingerprint)")
            theirs, mine = st["fingerprint"], self.fingerprint()
            diff = [f"{k}: saved {theirs.get(k)!r} != now {v!r}" for k, v in mine.items()
                    if k not in _LAYOUT_KEYS and theirs.get(k) != v]
            if diff:
                raise LoaderStateError("loader state is of other data (" + "; ".join(diff) + "); resume with the "
                                       "same shards, seed and tokenizer, or start the loader fresh")
        layouts = {tuple(st["fingerprint"].get(k) for k in _LAYOUT_KEYS if k != "rank") for st in old_states}
        if len(layouts) != 1:
            raise LoaderStateError(f"loader states come from several layouts {sorted(layouts)}")
        self._reshard_from = [dict(st) for st in old_states]
        self._reshard_cache = None
        self._pos = None

    def reshard_state(self, old_states: list[dict], worker: int = 0) -> dict:
        """Position (as in :meth:`state_dict`, without version/fingerprint) of (this rank, ``worker``) when
        continuing from ``old_states`` of another layout; see :meth:`load_resharded` for the guarantee."""
        if self._reshard_cache is None:
            self._reshard_cache = reshard_plan(self, old_states)
        plan = self._reshard_cache
        if "plans" not in plan:
            return {**self.fresh_position(), "epoch": plan["epoch"]}
        segs = plan["plans"][self.rank * max(1, self.num_workers) + worker]
        return {**self.fresh_position(), "epoch": plan["epoch"], "sample_pos": segs[0][1], "token_pos": segs[0][2],
                "plan": segs, "quota": plan["quota"]}

    # ------------------------------------------------------------------ iteration
    def _load_docs(self, shard_idx: int, epoch: int, pas: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        path, docs, tokens = self.shards[shard_idx]
        samples = read_shard(path, expected_documents=docs, expected_tokens=tokens)
        if self.vocab_size is not None and samples:
            top = max((int(ids.max()) for _, ids, _ in samples if ids.size), default=-1)
            if top >= self.vocab_size:
                raise ShardError(f"{path}: token id {top} is outside the model's vocabulary ({self.vocab_size} rows); "
                                 "the shards were built with another tokenizer: rebuild them with the recipe's")
        order = np.random.default_rng([self.seed, epoch, shard_idx, pas]).permutation(len(samples))
        out = []
        for i in order:
            _, ids, mask = samples[i]
            if self.kind == "pretrain":
                arr = np.empty(ids.size + 1, dtype=np.int64)
                arr[:-1] = ids
                arr[-1] = self.eos_token_id
                out.append((arr, None))
            else:
                out.append((ids.astype(np.int64), mask.astype(bool)))
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield micro batches ``{input_ids, position_ids, document_ids, prompt_mask, padding_mask}``.

        Shapes ``[micro_batch_size, seq_len]``, dtypes as in the module docstring. Raises ShardError on a
        corrupt shard, LoaderError on a worker-count mismatch.
        """
        worker = self._worker_id()
        pos = dict(self._pos) if self._pos is not None else self._start_pos(worker)
        if pos["finished"]:
            pos = self.fresh_position()
        L, B = self.seq_len, self.micro_batch_size
        eos = self.eos_token_id

        def piece_start(i: int) -> dict:  # where piece i of a resharded epoch begins (first pass only)
            if pos.get("plan") and pos["pass"] == 0 and i < len(pos["plan"]):
                return {"sample_pos": pos["plan"][i][1], "token_pos": pos["plan"][i][2]}
            return {"sample_pos": 0, "token_pos": 0}

        cache_key, docs = None, []
        shards: list[int] = []
        shards_epoch = None
        rows_this_pass = 0

        while True:
            K = pos["quota"] if pos.get("plan") else self._worker_batches
            if pos["batches"] >= K:  # epoch done
                if not self.infinite:
                    pos["finished"] = True
                    self._pos = pos
                    return
                pos = {**self.fresh_position(), "epoch": pos["epoch"] + 1}
            if shards_epoch != (pos["epoch"], bool(pos.get("plan"))):
                shards = [s[0] for s in pos["plan"]] if pos.get("plan") else self.worker_shards(pos["epoch"], worker)
                shards_epoch = (pos["epoch"], bool(pos.get("plan")))

            input_ids = np.empty((B, L), dtype=np.int64)
            position_ids = np.empty((B, L), dtype=np.int64)
            document_ids = np.empty((B, L), dtype=np.int32)
            prompt_mask = np.zeros((B, L), dtype=bool)
            padding_mask = np.zeros((B, L), dtype=bool)
            b = 0
            filled = 0
            seg = 0
            while b < B:
                if pos["shard_pos"] >= len(shards):  # stream ran dry before K batches: wrap around
                    if rows_this_pass == 0 and pos["pass"] > 0:
                        raise LoaderError(f"{self.shard_dir}: worker {worker} of rank {self.rank} found no usable "
                                          f"row in its shards (all assistant tokens beyond seq_len {L}?)")
                    pos.update(shard_pos=0, sample_pos=0, token_pos=0, **{"pass": pos["pass"] + 1})  # no plan offsets
                    rows_this_pass = 0
                key = (pos["epoch"], shards[pos["shard_pos"]], pos["pass"])
                if key != cache_key:
                    docs = self._load_docs(shards[pos["shard_pos"]], pos["epoch"], pos["pass"])
                    cache_key = key
                if pos["sample_pos"] >= len(docs):
                    pos.update(shard_pos=pos["shard_pos"] + 1, **piece_start(pos["shard_pos"] + 1))
                    continue
                ids, mask = docs[pos["sample_pos"]]
                if self.kind == "pretrain":
                    start = pos["token_pos"]
                    take = min(ids.size - start, L - filled)
                    input_ids[b, filled:filled + take] = ids[start:start + take]
                    position_ids[b, filled:filled + take] = np.arange(take)
                    document_ids[b, filled:filled + take] = seg
                    filled += take
                    seg += 1
                    if start + take == ids.size:
                        pos.update(sample_pos=pos["sample_pos"] + 1, token_pos=0)
                    else:
                        pos["token_pos"] = start + take
                    if filled == L:
                        b += 1
                        filled = 0
                        seg = 0
                        rows_this_pass += 1
                else:
                    pos.update(sample_pos=pos["sample_pos"] + 1)
                    n = min(ids.size, L)
                    if not mask[:n].any():
                        continue  # every assistant token truncated away
                    input_ids[b, :n] = ids[:n]
                    input_ids[b, n:] = eos
                    position_ids[b] = np.arange(L)
                    document_ids[b] = 0
                    prompt_mask[b, :n] = ~mask[:n]
                    padding_mask[b, n:] = True
                    b += 1
                    rows_this_pass += 1
            pos["batches"] += 1
            self._pos = dict(pos)  # position AFTER this batch, recorded before yielding
            yield {
                "input_ids": torch.from_numpy(input_ids),
                "position_ids": torch.from_numpy(position_ids),
                "document_ids": torch.from_numpy(document_ids),
                "prompt_mask": torch.from_numpy(prompt_mask),
                "padding_mask": torch.from_numpy(padding_mask),
            }


def loader_dataset_states(loader_state: dict) -> list[dict]:
    """The :meth:`PackedDataset.state_dict` of every worker inside a ``StatefulDataLoader.state_dict()``.

    One entry with ``num_workers=0``; one per worker that has yielded a batch otherwise.
    """
    if not isinstance(loader_state, dict):
        return []
    if loader_state.get("dataset_state") is not None:
        return [loader_state["dataset_state"]]
    workers = (loader_state.get("_snapshot") or {}).get("_worker_snapshots") or {}
    return [w["dataset_state"] for w in workers.values() if isinstance(w, dict) and w.get("dataset_state")]


def build_dataloader(dataset: PackedDataset, num_workers: int):
    """Wrap ``dataset`` in a ``torchdata.stateful_dataloader.StatefulDataLoader`` (``batch_size=None``).

    The dataset already yields whole micro batches; the loader only moves them across worker processes
    (round-robin over workers, each yielding the same number per epoch) and records every worker's
    :meth:`PackedDataset.state_dict` so ``loader.state_dict()`` / ``load_state_dict()`` resume exactly.

    Raises:
        LoaderError: ``num_workers`` differs from the ``num_workers`` the dataset was built with.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    if not isinstance(dataset, IterableDataset) or not hasattr(dataset, "load_resharded"):
        raise LoaderError(f"build_dataloader needs a PackedDataset or MixtureDataset, got {type(dataset).__name__}")
    if int(num_workers) != dataset.num_workers:
        raise LoaderError(f"build_dataloader(num_workers={num_workers}) but the dataset was built with "
                          f"num_workers={dataset.num_workers}; they must match (it fixes the shard split)")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=2, persistent_workers=False)
    return StatefulDataLoader(dataset, batch_size=None, num_workers=num_workers,
                              pin_memory=torch.cuda.is_available(), **kwargs)
