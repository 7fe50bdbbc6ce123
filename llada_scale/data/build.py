"""Building token shards from jsonl / jsonl.gz rows (the engine of ``tools/build_shards.py``): parse and
validate rows, tokenize them in worker processes (pretraining text, or SFT conversations rendered with the chat
template and their assistant mask), split train/val and write the shard directory of :mod:`llada_scale.data.shards`.

Hostile input is a skipped row, never an abort: undecodable or lone-surrogate text, a corrupt or truncated
``.gz`` (the rows read before the damage are kept; but a ``.gz`` whose checksum fails at its end is refused,
since any of its rows may be garbled), and the literal mask-token text in a document (encoded as
plain text in pretraining rows; an SFT row holding it is skipped). ``--overwrite`` builds the new shards beside
the old ones and swaps them in at the end, so an interrupted rebuild leaves the old shards usable.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from llada_scale.data.shards import SPLITS, BuildError, Document, _prepare_output_dir, write_shard_dir

__all__ = ["build_shards"]

class _Row(NamedTuple):
    file: str
    line: int
    payload: Any  # str (pretrain text) or list (conversation)


class _Unreadable(Exception):
    """The rest of an input file cannot be read (corrupt or truncated compression); args: (line, reason)."""


def _open_text_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of a .jsonl / .jsonl.gz file; raises :class:`_Unreadable` at the first
    undecompressable byte (the lines before it have been yielded)."""
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        if "CRC check failed" in str(e) or "Incorrect length" in str(e):  # found at the end: every row is suspect
            raise BuildError(f"{path}: the gzip checksum does not match its data ({e}): the {lineno} lines read from "
                             "it may be garbled; fetch the file again or leave it out of --input") from None
        what = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise _Unreadable(lineno + 1, f"{what} gzip data ({type(e).__name__}: {e or 'unexpected end'}); the rest of "
                                      f"the file is skipped ({lineno} lines read)") from None


def _is_unicode(text: str) -> bool:
    """False for strings JSON allows but UTF-8 does not (lone surrogates such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parse_row(raw: bytes, kind: str) -> tuple[Any, str | None]:
    """Return (payload, None) or (None, reason)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid UTF-8"
    if not text.strip():
        return None, "blank line"
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return None, f"bad JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if kind == "pretrain":
        t = obj.get("text")
        if t is None:
            return None, 'missing "text"'
        if not isinstance(t, str):
            return None, f'"text" is a {type(t).__name__}, expected a string'
        if not t.strip():
            return None, 'blank "text"'
        if not _is_unicode(t):
            return None, '"text" holds a lone surrogate (e.g. \\ud800), not valid Unicode'
        return t, None
    conv = obj.get("conversations")
    if conv is None:
        return None, 'missing "conversations"'
    if not isinstance(conv, list) or not conv:
        return None, '"conversations" must be a non-empty list'
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, f'conversations[{i}] must be {{"role": str, "content": str}}'
        if not _is_unicode(m["content"]) or not _is_unicode(m["role"]):
            return None, f"conversations[{i}] holds a lone surrogate (e.g. \\ud800), not valid Unicode"
    if not any(m["role"] == "assistant" for m in conv):
        return None, "conversation has no assistant turn"
    return conv, None


_WORKER_TOK = None


def _worker_init(tokenizer_path: str, mask_token: str | None) -> None:
    global _WORKER_TOK
    from llada_scale.data.tokenizer import Tokenizer

    _WORKER_TOK = Tokenizer.load(tokenizer_path, mask_token=mask_token)


MASK_LITERAL = "literal mask token"  # _tokenize's note for a pretraining row whose text holds the mask token


def _encode_plain(tok, text: str) -> tuple[list[int], bool]:
    """Token ids of pretraining ``text`` in which the mask-token string is ordinary text (the mask id never
    comes from data: a clean x_0 holding it would teach the model to predict masks). Returns (ids, whether the
    text held the mask-token string)."""
    ids = tok.encode(text)
    if tok.mask_token_id not in ids:
        return ids, False
    literal = [i for half in (tok.mask_token[:2], tok.mask_token[2:]) for i in tok.encode(half)]
    parts = text.split(tok.mask_token)
    out = tok.encode(parts[0])
    for part in parts[1:]:
        out += literal + tok.encode(part)
    return [i for i in out if i != tok.mask_token_id], True


def _tokenize(payload: Any) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """``(ids, assistant mask or None, reason for skipping or None)``; a pretraining row whose text holds the
    mask-token string comes back with reason :data:`MASK_LITERAL` AND its ids (encoded as plain text)."""
    from llada_scale.data.tokenizer import TokenizerError

    tok = _WORKER_TOK
    dtype = np.uint16 if tok.padded_vocab_size() <= 2**16 else np.uint32
    try:
        if isinstance(payload, str):
            ids, literal = _encode_plain(tok, payload)
            if not ids:
                return None, None, "text tokenizes to nothing"
            return np.asarray(ids, dtype=dtype), None, MASK_LITERAL if literal else None
        if any(tok.mask_token in m["content"] for m in payload):
            return None, None, f"a message holds the literal mask token {tok.mask_token} (SFT rows with it are skipped)"
        ids, mask = tok.render_chat(payload)
        if not any(mask):
            return None, None, "no assistant tokens after rendering"
        return np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=np.uint8), None
    except TokenizerError as exc:
        return None, None, str(exc)
    except (TypeError, ValueError) as exc:  # the Rust tokenizer's complaints about odd strings: skip the row
        return None, None, f"cannot tokenize: {type(exc).__name__}: {exc}"


def build_shards(inputs: Sequence[str], tokenizer: str, output: str, kind: str, *, val_fraction: float = 0.01,
                 val_docs: int | None = None, shard_tokens: int = 1_000_000, max_docs: int | None = None,
                 max_tokens: int | None = None, num_workers: int = 1, seed: int = 0, overwrite: bool = False,
                 strict: bool = False, progress: bool = True, mask_token: str | None = None,
                 log: Callable[[str], None] | None = None) -> dict:
    """Tokenize jsonl / jsonl.gz inputs and write a shard directory (the engine of tools/build_shards.py).

    Rows: pretraining ``{"text": str}``; SFT ``{"conversations": [{"role", "content"}, ...]}`` (rendered
    with the tokenizer's chat template; the assistant mask is stored). Malformed rows are reported as
    ``file:line: reason`` (first 20, then a count) and skipped, unless ``strict``.

    Steps: read rows in input order (stopping after ``max_docs`` valid documents or once ``max_tokens``
    tokens are reached), tokenize in a ``num_workers`` process pool (order preserving), shuffle documents
    with ``numpy.random.default_rng(seed)``, put the first ``val_docs`` (or ``round(val_fraction * n)``,
    at least 1 when the fraction is > 0) in ``val`` and the rest in ``train``, and write shards of about
    ``shard_tokens`` tokens. ``mask_token`` None = the tokenizer's own (:meth:`Tokenizer.load`: its
    ``tokenizer_config.json``'s ``mask_token``, else ``<|mask|>``), the one the trainer will use.

    Returns:
        Summary dict: ``documents``, ``tokens``, ``bad_rows``, ``seconds``, ``tokens_per_s``,
        ``splits: {split: {"documents", "tokens", "shards"}}``, ``index``.

    Raises:
        FileNotFoundError: a missing input file or tokenizer.
        BuildError: bad arguments, a bad row with ``strict``, no valid documents, or an existing index
            without ``overwrite``.
        TokenizerError: an unusable tokenizer.
    """
    from llada_scale.data.tokenizer import Tokenizer

    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    if kind not in ("pretrain", "sft"):
        raise BuildError(f"--kind must be pretrain or sft, got {kind!r}")
    if not inputs:
        raise BuildError("no --input files given")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
    if val_docs is not None and val_docs < 0:
        raise BuildError(f"--val_docs must be >= 0, got {val_docs}")
    if not 0.0 <= val_fraction < 1.0:
        raise BuildError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    for name, value in (("--max_docs", max_docs), ("--max_tokens", max_tokens)):
        if value is not None and value < 1:
            raise BuildError(f"{name} must be >= 1, got {value}")
    if shard_tokens < 1:
        raise BuildError(f"--shard_tokens must be >= 1, got {shard_tokens}")
    if num_workers < 1:
        raise BuildError(f"--num_workers must be >= 1, got {num_workers}")
    tok = Tokenizer.load(tokenizer, mask_token=mask_token)
    index_path = os.path.join(output, "index.json")
    if os.path.exists(index_path) and not overwrite:  # fail before the (slow) tokenization
        raise BuildError(f"{output} already holds a shard index (index.json); pass --overwrite to replace it "
                         "or choose another --output")

    bad: list[str] = []

    def report(file: str, line: int, reason: str) -> None:
        msg = f"{file}:{line}: {reason}"
        if strict:
            raise BuildError(f"{msg} (bad row; drop --strict to skip bad rows)")
        bad.append(msg)
        if len(bad) <= 20:
            log(f"warning: skipping {msg}")

    def rows() -> Iterator[_Row]:
        for path in inputs:
            try:
                for lineno, raw in _open_text_lines(path):
                    payload, reason = _parse_row(raw, kind)
                    if reason is not None:
                        if reason != "blank line":
                            report(path, lineno, reason)
                        continue
                    yield _Row(path, lineno, payload)
            except _Unreadable as e:
                report(path, *e.args)

    mask_literals = 0

    ids_list: list[np.ndarray] = []
    mask_list: list[np.ndarray | None] = []
    total_tokens = 0
    from tqdm import tqdm

    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    block_size = 2048 * num_workers
    pool = None
    try:
        if num_workers > 1:
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=(tok.path, mask_token))
        else:
            _worker_init(tok.path, mask_token)
        it = rows()
        done = False
        while not done:
            block = []
            for row in it:
                block.append(row)
                if len(block) >= block_size:
                    break
            if not block:
                break
            payloads = [r.payload for r in block]
            if pool is not None:
                results = pool.map(_tokenize, payloads, chunksize=max(1, len(block) // (4 * num_workers)))
            else:
                results = [_tokenize(p) for p in payloads]
            for row, (ids, mask, reason) in zip(block, results):
                if reason == MASK_LITERAL:
                    mask_literals += 1
                elif reason is not None:
                    report(row.file, row.line, reason)
                    continue
                ids_list.append(ids)
                mask_list.append(mask)
                total_tokens += int(ids.size)
                bar.update(1)
                if (max_docs is not None and len(ids_list) >= max_docs) or \
                        (max_tokens is not None and total_tokens >= max_tokens):
                    done = True
                    break
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if len(bad) > 20:
        log(f"warning: {len(bad)} bad rows skipped in total ({len(bad) - 20} not shown)")
    if mask_literals:
        log(f"warning: {mask_literals} document(s) contain the literal text {tok.mask_token}; it was encoded as "
            "plain text, never as the mask token")

    n = len(ids_list)
    if n == 0:
        raise BuildError("no valid documents in the inputs (check --kind and the row format)")
    if val_docs is not None:
        n_val = val_docs
    else:
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n_val == 0 and n >= 2:
            n_val = 1
    if n_val >= n:
        raise BuildError(f"validation split ({n_val} documents) would leave no training documents out of {n}; "
                         "lower --val_docs/--val_fraction")
    perm = np.random.default_rng(seed).permutation(n)
    docs = [Document(int(i), ids_list[i], mask_list[i]) for i in perm]
    splits = {"val": docs[:n_val], "train": docs[n_val:]}
    wbar = tqdm(total=n, desc="writing", unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    staging = os.path.normpath(output) + ".building"  # beside the old shards; swapped in when complete
    shutil.rmtree(staging, ignore_errors=True)
    try:
        index = write_shard_dir(staging, kind, splits, tok.identity(), seed=seed,
                                sources=[os.path.abspath(p) for p in inputs], shard_tokens=shard_tokens,
                                overwrite=False, progress=wbar.update)
        _swap_in(staging, output)
    finally:
        wbar.close()
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.time() - t0
    summary = {
        "documents": n,
        "tokens": total_tokens,
        "bad_rows": len(bad),
        "seconds": seconds,
        "tokens_per_s": total_tokens / max(seconds, 1e-9),
        "splits": {s: {"documents": sum(e["documents"] for e in index["splits"][s]),
                       "tokens": sum(e["tokens"] for e in index["splits"][s]),
                       "shards": len(index["splits"][s])} for s in SPLITS},
        "bad_row_messages": bad,
        "mask_literal_documents": mask_literals,
        "index": index,
    }
    return summary


def _swap_in(staging: str, output: str) -> None:
    """Move a complete shard directory ``staging`` into ``output``: the old index first (so a half-swapped
    directory never looks valid), then the old shards go, the new shards move in and the new index last.
    Other files in ``output`` are left alone. Only renames: a second at most, against minutes of building."""
    _prepare_output_dir(output, overwrite=True)
    for name in sorted(os.listdir(staging)):
        if name != "index.json":
            os.replace(os.path.join(staging, name), os.path.join(output, name))
    os.replace(os.path.join(staging, "index.json"), os.path.join(output, "index.json"))
