"""Token shard format (``llada_scale.shards.v1``): writing and reading (building from jsonl: :mod:`llada_scale.data.build`).

A shard directory holds::

    index.json              written last, atomically; describes everything below
    train-000000.tar ...    WebDataset tar shards, one sample per document
    val-000000.tar ...

``index.json``::

    {"format": "llada_scale.shards.v1", "kind": "pretrain" | "sft",
     "tokenizer": Tokenizer.identity(), "dtype": "uint16" | "uint32", "seed": int,
     "sources": [input files], "shard_tokens": int,
     "splits": {"train": [{"shard": "train-000000.tar", "documents": n, "tokens": m}, ...], "val": [...]}}

Each sample has key ``%09d`` (the document's index among the accepted input documents, in input order)
and member ``input_ids.npy`` (1-D numpy array of ``dtype``, the smallest unsigned type holding the
padded vocab); SFT samples also carry ``assistant_mask.npy`` (1-D uint8 0/1, same length). Documents
carry NO appended EOS: the packer adds it. SFT documents are the rendered chat, whose turns already end
with the eos token (``<|im_end|>``).

Shards are byte-reproducible: same inputs + tokenizer + seed + options give identical files (fixed
mtime/uid/uname/mode in the tar headers, deterministic shuffle, order-preserving tokenization).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from llada_scale.data import remote

__all__ = [
    "FORMAT", "SPLITS", "ShardError", "ShardIndexNotFoundError", "BuildError", "Document",
    "dtype_for_vocab", "encode_npy", "decode_npy", "write_shard", "write_shard_dir", "load_index",
    "shard_paths", "index_sha256", "read_shard", "iter_shard",
]

FORMAT = "llada_scale.shards.v1"
SPLITS = ("train", "val")
_SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar(\.tmp)?$")
_TAR_MTIME = 0  # fixed header fields make the tars byte-reproducible
_TAR_USER = "llada"
REBUILD_HINT = "rebuild it with tools/build_shards.py"


class ShardError(ValueError):
    """A shard directory, index or tar shard is missing, invalid or corrupt (message names the path)."""


class ShardIndexNotFoundError(FileNotFoundError):
    """``index.json`` is missing from a shard directory."""


class BuildError(ValueError):
    """Bad build arguments or input (message says what is wrong and how to fix it)."""


class Document(NamedTuple):
    """One document to write.

    key: int, its global document index (written as the ``%09d`` sample key; unique within a build).
    input_ids: 1-D integer array-like of token ids (no appended EOS).
    assistant_mask: 1-D 0/1 array-like of the same length for SFT, ``None`` for pretraining.
    """

    key: int
    input_ids: Any
    assistant_mask: Any = None


# ---------------------------------------------------------------------------------------------- encoding
def dtype_for_vocab(padded_vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids ``< padded_vocab_size``: uint16 up to 65536, else uint32.

    Raises ValueError if ``padded_vocab_size`` is not in ``[1, 2**32]``.
    """
    if not 1 <= int(padded_vocab_size) <= 2**32:
        raise ValueError(f"padded_vocab_size must be in [1, 2**32], got {padded_vocab_size}")
    return np.dtype(np.uint16) if padded_vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_npy(arr: np.ndarray) -> bytes:
    """Serialise a numpy array to ``.npy`` bytes (deterministic; no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Parse ``.npy`` bytes (no pickle). Raises ValueError on malformed data."""
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---------------------------------------------------------------------------------------------- writing
def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_shard(path: str, documents: Sequence[Document], dtype: Any) -> tuple[int, int]:
    """Write one WebDataset tar shard atomically (``path + '.tmp'`` then ``os.replace``).

    Args:
        path: destination ``*.tar`` path.
        documents: the documents, written in this order.
        dtype: numpy dtype of the stored ids (``uint16``/``uint32``).

    Returns:
        ``(documents, tokens)`` written.

    Raises:
        ShardError: an id does not fit ``dtype``, a mask length differs from its ids, or an empty document.
    """
    import webdataset as wds

    dtype = np.dtype(dtype)
    limit = np.iinfo(dtype).max
    tmp = path + ".tmp"
    tokens = 0
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, user=_TAR_USER, group=_TAR_USER, mode=0o444, mtime=_TAR_MTIME,
                               encoder=False) as writer:
                for doc in documents:
                    ids = np.asarray(doc.input_ids)
                    if ids.ndim != 1 or ids.size == 0:
                        raise ShardError(f"document {doc.key}: input_ids must be a non-empty 1-D array")
                    if ids.min() < 0 or ids.max() > limit:
                        raise ShardError(f"document {doc.key}: token id out of range for {dtype.name}")
                    sample = {"__key__": f"{int(doc.key):09d}", "input_ids.npy": encode_npy(ids.astype(dtype))}
                    if doc.assistant_mask is not None:
                        mask = np.asarray(doc.assistant_mask).astype(np.uint8)
                        if mask.shape != ids.shape:
                            raise ShardError(f"document {doc.key}: assistant_mask length {mask.size} != "
                                             f"input_ids length {ids.size}")
                        sample["assistant_mask.npy"] = encode_npy(mask)
                    writer.write(sample)
                    tokens += int(ids.size)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(documents), tokens


def _prepare_output_dir(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise BuildError(f"{output}: exists and is not a directory; pick another --output")
    os.makedirs(output, exist_ok=True)
    index = os.path.join(output, "index.json")
    if os.path.exists(index):
        if not overwrite:
            raise BuildError(f"{output} already holds a shard index (index.json); pass --overwrite to replace it "
                             "or choose another --output")
        os.remove(index)  # first, so an interrupted rebuild never leaves a valid-looking index
    for name in os.listdir(output):  # stale shards of an earlier/interrupted build (no index references them)
        if _SHARD_RE.match(name):
            os.remove(os.path.join(output, name))


def write_shard_dir(output: str, kind: str, splits: dict[str, Sequence[Document]], tokenizer_identity: dict,
                    seed: int = 0, sources: Sequence[str] = (), shard_tokens: int = 1_000_000,
                    overwrite: bool = False, progress: Callable[[int], None] | None = None) -> dict:
    """Write a complete shard directory (shards first, ``index.json`` last, all atomically).

    Args:
        output: directory (created if missing).
        kind: ``"pretrain"`` or ``"sft"`` (SFT documents must carry ``assistant_mask``).
        splits: ``{"train": [Document, ...], "val": [...]}``, documents already in their final order.
            A split may be empty (then it has no shards).
        tokenizer_identity: ``Tokenizer.identity()`` (needs ``padded_vocab_size`` or ``vocab_size``,
            and ``eos_token_id``); stored in the index.
        seed: recorded in the index.
        sources: input file names recorded in the index.
        shard_tokens: a shard is closed once it holds at least this many tokens (>= 1 document each).
        overwrite: replace an existing index (otherwise refuse).
        progress: optional callback called with the number of documents written after each shard.

    Returns:
        The index dict that was written.

    Raises:
        BuildError: bad kind/split name/shard_tokens, or an existing index without ``overwrite``.
        ShardError: a document that cannot be stored (see :func:`write_shard`).
    """
    if kind not in ("pretrain", "sft"):
        raise BuildError(f"kind must be 'pretrain' or 'sft', got {kind!r}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise BuildError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    for name in splits:
        if name not in SPLITS:
            raise BuildError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
    if "eos_token_id" not in tokenizer_identity:
        raise BuildError("tokenizer identity lacks eos_token_id")
    vocab = tokenizer_identity.get("padded_vocab_size") or tokenizer_identity.get("vocab_size")
    if not vocab:
        raise BuildError("tokenizer identity lacks padded_vocab_size/vocab_size")
    dtype = dtype_for_vocab(int(vocab))
    _prepare_output_dir(output, overwrite)

    index_splits: dict[str, list[dict]] = {}
    for split in SPLITS:
        docs = list(splits.get(split, ()))
        entries = []
        start = 0
        while start < len(docs):
            end, tokens = start, 0
            while end < len(docs) and (tokens < shard_tokens or end == start):
                d = docs[end]
                if kind == "sft" and d.assistant_mask is None:
                    raise ShardError(f"document {d.key}: SFT documents need an assistant_mask")
                tokens += len(d.input_ids)
                end += 1
            name = f"{split}-{len(entries):06d}.tar"
            n_docs, n_tokens = write_shard(os.path.join(output, name), docs[start:end], dtype)
            entries.append({"shard": name, "documents": n_docs, "tokens": n_tokens})
            if progress is not None:
                progress(n_docs)
            start = end
        index_splits[split] = entries

    index = {
        "format": FORMAT,
        "kind": kind,
        "tokenizer": tokenizer_identity,
        "dtype": dtype.name,
        "seed": int(seed),
        "shard_tokens": int(shard_tokens),
        "sources": list(sources),
        "splits": index_splits,
    }
    _atomic_write_bytes(os.path.join(output, "index.json"),
                        (json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    return index


# ---------------------------------------------------------------------------------------------- reading
def load_index(shard_dir: str) -> dict:
    """Read and validate ``shard_dir/index.json``.

    Returns:
        The index dict (see the module docstring).

    Raises:
        ShardIndexNotFoundError: no index.json (the directory was never built, or the build did not finish).
        ShardError: unreadable JSON, a ``format`` other than ``llada_scale.shards.v1``, or missing fields.
    """
    if not remote.is_local(shard_dir):
        return _check_index(json_loads_index(shard_dir), remote.join(shard_dir, "index.json"))
    path = os.path.join(shard_dir, "index.json")
    if not os.path.isfile(path):
        why = "directory does not exist" if not os.path.isdir(shard_dir) else "no index.json"
        raise ShardIndexNotFoundError(f"{path}: {why}; build shards with tools/build_shards.py --output {shard_dir}")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: cannot parse shard index ({exc}); {REBUILD_HINT} --overwrite") from exc
    return _check_index(index, path)


def _index_bytes(shard_dir: str) -> bytes:
    """The bytes of ``index.json`` of a remote location (``pipe:`` or URL, see :mod:`llada_scale.data.remote`)."""
    url = remote.join(shard_dir, "index.json")
    try:
        return remote.read_bytes(url)
    except OSError as exc:
        raise ShardIndexNotFoundError(f"{url}: cannot read the shard index ({exc}); check the location and its "
                                      "credentials, or build shards with tools/build_shards.py") from None


def json_loads_index(shard_dir: str) -> dict:
    """Parse the ``index.json`` of a remote location. Raises ShardIndexNotFoundError / ShardError."""
    try:
        return json.loads(_index_bytes(shard_dir))
    except ValueError as exc:
        raise ShardError(f"{remote.join(shard_dir, 'index.json')}: cannot parse shard index ({exc})") from None


def _check_index(index, path: str) -> dict:
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ShardError(f"{path}: format {got!r} is not {FORMAT!r}; {REBUILD_HINT} --overwrite")
    for key in ("kind", "tokenizer", "dtype", "splits"):
        if key not in index:
            raise ShardError(f"{path}: missing field {key!r}; {REBUILD_HINT} --overwrite")
    if index["kind"] not in ("pretrain", "sft"):
        raise ShardError(f"{path}: unknown kind {index['kind']!r}")
    if index["dtype"] not in ("uint16", "uint32"):
        raise ShardError(f"{path}: unknown dtype {index['dtype']!r}")
    return index


def index_sha256(shard_dir: str) -> str:
    """sha256 hex digest of ``shard_dir/index.json`` bytes (identifies a build). Raises like load_index."""
    load_index(shard_dir)
    if not remote.is_local(shard_dir):
        return hashlib.sha256(_index_bytes(shard_dir)).hexdigest()
    with open(os.path.join(shard_dir, "index.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shard_paths(shard_dir: str, split: str, index: dict | None = None) -> list[tuple[str, int, int]]:
    """The shards of one split as ``[(absolute path, documents, tokens), ...]`` in index order.

    Raises:
        ShardError: unknown/empty split, or a listed shard file is missing.
        ShardIndexNotFoundError: no index.json.
    """
    if index is None:
        index = load_index(shard_dir)
    splits = index["splits"]
    if split not in splits or not splits[split]:
        have = ", ".join(f"{k} ({len(v)} shards)" for k, v in splits.items())
        raise ShardError(f"{shard_dir}: split {split!r} has no shards (index has: {have})")
    out = []
    for entry in splits[split]:
        path = remote.join(shard_dir, entry["shard"])
        if remote.exists(path) is False:  # a pipe: command is checked when it runs
            raise ShardError(f"{path}: shard listed in index.json is missing; {REBUILD_HINT}")
        out.append((path, int(entry["documents"]), int(entry["tokens"])))
    return out


def iter_shard(path: str) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Stream one tar shard through a WebDataset pipeline.

    Yields:
        ``(key, input_ids, assistant_mask)``: key str (``%09d``), input_ids 1-D uint16/uint32 array,
        assistant_mask 1-D uint8 array or ``None`` (pretraining).

    Raises:
        ShardError: the tar is truncated/corrupt or a sample is malformed; the message names ``path``.
    """
    import webdataset as wds

    def reraise(exn):
        raise exn

    remote.register(path)
    pipeline = wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples(handler=reraise))
    try:
        for sample in pipeline:
            if "input_ids.npy" not in sample:
                raise ShardError(f"{path}: sample {sample.get('__key__')!r} has no input_ids.npy; {REBUILD_HINT}")
            ids = decode_npy(sample["input_ids.npy"])
            mask = decode_npy(sample["assistant_mask.npy"]) if "assistant_mask.npy" in sample else None
            if ids.ndim != 1 or (mask is not None and mask.shape != ids.shape):
                raise ShardError(f"{path}: sample {sample['__key__']!r} has malformed arrays; {REBUILD_HINT}")
            yield sample["__key__"], ids, mask
    except ShardError:
        raise
    except Exception as exc:  # tarfile.ReadError, EOFError, OSError, ValueError from np.load ...
        detail = str(exc.args[0]) if getattr(exc, "args", None) else type(exc).__name__
        detail = detail.split(" @ ")[0]
        raise ShardError(f"{path}: unreadable shard ({type(exc).__name__}: {detail}; the file is truncated or "
                         f"corrupt); {REBUILD_HINT}") from exc


def read_shard(path: str, expected_documents: int | None = None,
               expected_tokens: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """Read a whole shard (see :func:`iter_shard`) and check it against the index counts.

    Raises:
        ShardError: unreadable shard, or its document/token count differs from the expected one (a
            truncated tar that happens to end on a member boundary).
    """
    samples = list(iter_shard(path))
    if expected_documents is not None and len(samples) != expected_documents:
        raise ShardError(f"{path}: holds {len(samples)} documents but index.json says {expected_documents} "
                         f"(truncated?); {REBUILD_HINT}")
    if expected_tokens is not None:
        tokens = sum(int(s[1].size) for s in samples)
        if tokens != expected_tokens:
            raise ShardError(f"{path}: holds {tokens} tokens but index.json says {expected_tokens}; {REBUILD_HINT}")
    return samples
