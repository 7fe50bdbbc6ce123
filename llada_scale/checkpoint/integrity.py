"""SHA-256 digests of checkpoint files: computing them when a checkpoint or converter output is written, and
verifying them before the files are used.

Where the digests live:

* a training checkpoint (DeepSpeed tag directory): ``llada_scale.json`` key ``sha256`` (relative path -> hex),
  written by :func:`llada_scale.checkpoint.checkpointer.save` before the rename that publishes the checkpoint;
* a directory written by a converter (``tools/convert_checkpoint.py``): ``SHA256SUMS`` in ``sha256sum`` format
  (``<hex>  <name>`` per line; ``sha256sum -c SHA256SUMS`` checks it by hand), written into the staged directory
  before it is renamed into place; it is also how a later ``--force`` recognises a directory it wrote;
* imported directories may bring their own: a ``SHA256SUMS`` / ``sha256sums.txt`` / ``checksums.sha256`` file,
  a ``<file>.sha256`` sidecar next to a weight file, or ``metadata.sha256`` (name -> hex) in a
  ``*.index.json``. Whatever is present is verified; a source without any is read as before.

Verification reads each file once in 1 MiB chunks (several files in parallel threads; hashlib releases the GIL)
and remembers files already verified in this process (same path, size and mtime), so a source resolved twice
is hashed once. ``LLADA_SCALE_VERIFY=0`` in the environment (``--no_verify`` in the converters) skips it, for
very large files on trusted storage; the default verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from llada_scale.checkpoint.files import META_FILE, CheckpointError, atomic_write_text

__all__ = ["SUMS_FILE", "sha256_file", "digests", "write_sums", "read_sums", "check_digests", "found_digests",
           "verify_source", "verification_enabled"]

SUMS_FILE = "SHA256SUMS"
_OTHER_SUMS = ("sha256sums.txt", "checksums.sha256", "SHA256SUMS.txt")
_CHUNK = 1 << 20
_verified: dict[tuple, str] = {}  # (realpath, size, mtime_ns) -> hex, files verified in this process


def verification_enabled() -> bool:
    """False when ``LLADA_SCALE_VERIFY`` is ``0`` / ``false`` / ``off`` / ``no`` (default: verify)."""
    return os.environ.get("LLADA_SCALE_VERIFY", "1").strip().lower() not in ("0", "false", "off", "no")


def sha256_file(path: str) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks. Raises OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _workers(n: int) -> int:
    return max(1, min(n, 8, os.cpu_count() or 1))


def digests(root: str, names: list[str] | None = None) -> dict[str, str]:
    """Relative path -> hex SHA-256 of ``names`` under ``root`` (default: every file below it, recursively,
    except ``SHA256SUMS`` and ``llada_scale.json``), sorted by name."""
    root = os.fspath(root)
    if names is None:
        names = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                       if not (d == root and f in (SUMS_FILE, META_FILE)))
    with ThreadPoolExecutor(_workers(len(names))) as pool:
        hexes = list(pool.map(lambda n: sha256_file(os.path.join(root, n)), names))
    return dict(zip(names, hexes))


def write_sums(root: str) -> dict[str, str]:
    """Write ``root/SHA256SUMS`` covering every other file below ``root``; returns the digests."""
    table = digests(root)
    atomic_write_text(os.path.join(root, SUMS_FILE), "".join(f"{h}  {n}\n" for n, h in table.items()))
    return table


def read_sums(path: str) -> dict[str, str]:
    """Name -> hex of a ``sha256sum``-format file (``<hex>  <name>`` or ``<hex> *<name>``; a bare ``<hex>`` is
    named ``-``; blank lines and ``#`` comments ignored). Raises CheckpointError on a malformed line."""
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) == 1:  # a bare digest (a "<file>.sha256" sidecar of one file)
                parts = [parts[0], "-"]
            if len(parts[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in parts[0]):
                raise CheckpointError(f"{path}:{i} is not a sha256sum line (<64 hex digits>  <file name>)")
            out[parts[1].lstrip("*").strip()] = parts[0].lower()
    return out


def check_digests(root: str, table: dict[str, str], source: str) -> str | None:
    """Why the files of ``table`` (relative path -> hex) under ``root`` do not match, or None when every one
    does. The first mismatching or missing file is named; the others are not hashed after it."""
    def one(item):
        name, want = item
        path = os.path.join(root, name)
        try:
            st = os.stat(path)
        except OSError:
            return f"{path} is missing (listed in {source})"
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if _verified.get(key) == want:
            return None
        try:
            got = sha256_file(path)
        except OSError as e:
            return f"{path} cannot be read ({e.strerror or e})"
        if got != want:
            return f"{path} does not match its SHA-256 in {source} (file damaged or replaced after it was written)"
        _verified[key] = got
        return None

    items = sorted(table.items())
    with ThreadPoolExecutor(_workers(len(items))) as pool:
        for why in pool.map(one, items):
            if why:
                return why
    return None


def found_digests(root: str) -> tuple[dict[str, str], str] | None:
    """The digests a directory brings (see the module docstring) and where they come from, or None."""
    for name in (SUMS_FILE, *_OTHER_SUMS):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return read_sums(p), p
    table, where = {}, []
    for f in sorted(os.listdir(root)):
        p = os.path.join(root, f)
        if f.endswith(".sha256") and os.path.isfile(p):
            sums = read_sums(p)
            table.update({f[:-len(".sha256")] if n == "-" or len(sums) == 1 else n: h for n, h in sums.items()})
            where.append(f)
        elif f.endswith(".index.json") and os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as fh:
                    meta = (json.load(fh) or {}).get("metadata") or {}
            except (OSError, ValueError, AttributeError):
                continue  # the index reader reports a broken index
            if isinstance(meta, dict) and isinstance(meta.get("sha256"), dict):
                table.update({str(k): str(v).lower() for k, v in meta["sha256"].items()})
                where.append(f"{f} metadata.sha256")
    return (table, os.path.join(root, ", ".join(where))) if table else None


def verify_source(kind: str, path: str) -> None:
    """Verify the digests of a resolved checkpoint (``kind``/``path`` from
    :func:`llada_scale.checkpoint.weights.resolve_checkpoint`) when it has any and verification is on.

    Raises:
        CheckpointError: one line naming the first file whose bytes do not match (or that is missing).
    """
    if not verification_enabled():
        return
    if kind == "deepspeed":
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            return
        try:
            with open(meta_path, encoding="utf-8") as f:
                table = json.load(f).get("sha256")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from None
        found = (table, meta_path) if isinstance(table, dict) else None
        root = path
    else:
        root = path if os.path.isdir(path) else os.path.dirname(path)
        found = found_digests(root)
        if found and kind == "safetensors_file":
            name = os.path.basename(path)
            found = ({name: found[0][name]}, found[1]) if name in found[0] else None
    if found:
        why = check_digests(root, found[0], found[1])
        if why:
            raise CheckpointError(f"{why}; restore it from a copy or use another checkpoint "
                                  "(LLADA_SCALE_VERIFY=0 skips this check)")
