"""Weighted data mixtures: ``data.train_shards`` as a list of ``{path, weight[, name]}`` sources.

:class:`MixtureDataset` holds one :class:`~llada_scale.data.loader.PackedDataset` per source (each cut into
single rows, each with its own epochs and shard split over ranks and loader workers) and fills every micro batch
row by row: row ``i`` of a stream's ``n``-th batch comes from source ``s`` drawn with probability
``weight_s / sum(weights)`` by ``numpy.random.default_rng([seed, rank, worker, n])``, so the draws are
deterministic for a seed and need no state beyond the batch counter. Its state is that counter plus every
source's own loader state, so a resumed run sees exactly the rows of an uninterrupted one, and a run resumed
under another data-parallel layout reshards every source as a single-source run does
(:meth:`PackedDataset.load_resharded`). Batches carry ``source`` (int64 [B]), the source index of each row,
from which the trainer counts tokens per source.

Sources may live anywhere :mod:`llada_scale.data.remote` reads (local, ``pipe:``, fsspec URLs).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from llada_scale.data.loader import LoaderError, LoaderStateError, PackedDataset

__all__ = ["normalize_sources", "source_names", "MixtureDataset"]

_STATE_VERSION = 1


def normalize_sources(value: Any, key: str = "data.train_shards") -> str | list[dict]:
    """A shard location string as it is, or a mixture as ``[{"path", "weight", "name"}, ...]`` (weights as given).

    A source is a mapping with ``path`` (a shard location) and ``weight`` (a number > 0) and an optional
    ``name`` (default: the last component of the path); names must be unique.

    Raises:
        LoaderError: naming the key and the bad entry.
    """
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise LoaderError(f"{key} must be a shard location or a non-empty list of {{path, weight}} sources, "
                          f"not {value!r}")
    out = []
    for i, src in enumerate(value):
        if not isinstance(src, dict) or set(src) - {"path", "weight", "name"} or "path" not in src:
            raise LoaderError(f"{key}[{i}] must be a mapping with keys path, weight (and optionally name), "
                              f"not {src!r}")
        path, weight = src["path"], src.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            raise LoaderError(f"{key}[{i}].path must be a non-empty string, not {path!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            raise LoaderError(f"{key}[{i}].weight must be a number > 0, not {weight!r}")
        out.append({"path": path, "weight": float(weight), "name": str(src.get("name") or _default_name(path))})
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):
        raise LoaderError(f"{key}: two sources have the same name ({names}); give them distinct `name:` keys")
    return out


def _default_name(path: str) -> str:
    return os.path.basename(path.replace("{}", "").rstrip("/ ").split()[-1].rstrip("/")) or path


def source_names(sources: list[dict]) -> list[str]:
    """The names of normalised sources, in order."""
    return [s["name"] for s in sources]


class MixtureDataset(IterableDataset):
    """Micro batches whose rows are drawn from weighted sources (see the module docstring).

    Args:
        sources: :func:`normalize_sources` output (a list).
        split, seq_len, micro_batch_size, rank, world_size, seed, eos_token_id, num_workers, vocab_size: as
            :class:`PackedDataset`; every source is built with them (one row per batch).

    Batches: the keys and shapes of :class:`PackedDataset` (``[micro_batch_size, seq_len]``) plus ``source``
    (int64 ``[micro_batch_size]``).

    Raises (constructor):
        LoaderError / ShardError: any source's (see :class:`PackedDataset`, the message names the source), or
            sources of different kinds (pretraining and SFT).
    """

    def __init__(self, sources: list[dict], split: str, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, eos_token_id: int | None = None, num_workers: int = 0,
                 vocab_size: int | None = None) -> None:
        super().__init__()
        self.config = normalize_sources(list(sources))
        self.names = source_names(self.config)
        total = sum(s["weight"] for s in self.config)
        self.probs = np.array([s["weight"] / total for s in self.config])
        self.sources = []
        for s in self.config:
            try:
                self.sources.append(PackedDataset(s["path"], split, seq_len, 1, rank=rank, world_size=world_size,
                                                  seed=seed, eos_token_id=eos_token_id, num_workers=num_workers,
                                                  vocab_size=vocab_size))
            except (ValueError, OSError) as e:  # ShardError, LoaderError, ShardIndexNotFoundError
                raise type(e)(f"source {s['name']!r}: {e}") from None
        kinds = {src.kind for src in self.sources}
        if len(kinds) > 1:
            raise LoaderError(f"the sources mix shard kinds {sorted(kinds)}: "
                              + ", ".join(f"{n}={d.kind}" for n, d in zip(self.names, self.sources)))
        self.kind = kinds.pop()
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, int(seed), num_workers
        self._batches: int | None = None  # batches this stream has yielded (None: fresh or resharded start)
        self._start_batches = 0

    def fingerprint(self) -> dict:
        """The mixture a state must match: source paths, weights and names (the sources check their data)."""
        return {"sources": [[s["name"], s["path"], s["weight"]] for s in self.config]}

    def _worker(self) -> int:
        info = get_worker_info()
        return 0 if info is None else info.id

    def state_dict(self) -> dict:
        """``{version, mixture, worker, batches, sources: [PackedDataset.state_dict() per source]}``, the position
        after the last yielded batch."""
        return {"version": _STATE_VERSION, "mixture": self.fingerprint(), "worker": self._worker(),
                "batches": self._start_batches if self._batches is None else self._batches,
                "sources": [src.state_dict() for src in self.sources]}

    def _check(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION or "mixture" not in state:
            raise LoaderStateError("not a mixture loader state (data.train_shards was a single location when it "
                                   "was saved?); resume with the same data.train_shards, or start fresh")
        if state["mixture"] != self.fingerprint():
            raise LoaderStateError(f"loader state is of another mixture (saved {state['mixture']['sources']}, now "
                                   f"{self.fingerprint()['sources']}); resume with the same data.train_shards")

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly after the batch :meth:`state_dict` described. Raises LoaderStateError (another
        mixture, or a source state that does not match, see :meth:`PackedDataset.load_state_dict`)."""
        self._check(state)
        for src, st in zip(self.sources, state["sources"]):
            src.load_state_dict(st)
        self._batches, self._start_batches = int(state["batches"]), int(state["batches"])

    def same_layout(self, state: dict) -> bool:
        """Whether ``state`` was written under this data-parallel layout (every source's, see PackedDataset)."""
        return isinstance(state, dict) and state.get("mixture") == self.fingerprint() and \
            all(src.same_layout(st) for src, st in zip(self.sources, state.get("sources", [])))

    def load_resharded(self, old_states: list[dict]) -> None:
        """Continue from the states of all streams of a run with another layout: every source is resharded
        (:meth:`PackedDataset.load_resharded`, its guarantee per source), the row draws continue at the old
        streams' largest batch count."""
        if not old_states:
            raise LoaderStateError("load_resharded needs the loader states of the old run's streams, got none")
        for st in old_states:
            self._check(st)
        for i, src in enumerate(self.sources):
            src.load_resharded([st["sources"][i] for st in old_states])
        self._batches, self._start_batches = None, max(int(st["batches"]) for st in old_states)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = self._worker()
        n = self._start_batches if self._batches is None else self._batches
        iters: list = [None] * len(self.sources)
        B = self.micro_batch_size
        while True:
            draw = np.random.default_rng([self.seed, self.rank, worker, n]).choice(len(self.sources), B, p=self.probs)
            rows = []
            for s in draw:
                if iters[s] is None:
                    iters[s] = iter(self.sources[s])
                rows.append(next(iters[s]))
            n += 1
            self._batches = n  # position AFTER this batch, recorded before yielding
            batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
            batch["source"] = torch.from_numpy(draw.astype(np.int64))
            yield batch
