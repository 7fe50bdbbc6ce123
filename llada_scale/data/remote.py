"""Where shards live: local directories, ``pipe:`` commands and fsspec URLs (``s3://``, ``gs://``, ``memory://``,
``file://``, ...), read the same way for ``index.json`` and for the tar shards.

A shard location names a directory-like place; a file in it is found by :func:`join`:

* a local path: ``<dir>/<name>``;
* a URL with a scheme (``s3://bucket/web``): ``<url>/<name>``, opened with fsspec (its protocol packages, e.g.
  ``s3fs`` or ``gcsfs``, must be installed; ``memory://`` and ``file://`` need none);
* ``pipe:<command>`` holding ``{}``: the command with ``{}`` replaced by the file name, its standard output
  read (e.g. ``pipe:aws s3 cp s3://bucket/web/{} -`` or ``pipe:cat /data/web/{}``), as WebDataset runs
  ``pipe:`` URLs.

The tar shards are read by WebDataset's own ``gopen`` (:func:`register`: URL schemes WebDataset has no handler
for are routed to fsspec).
"""

from __future__ import annotations

import os
import subprocess
from typing import IO

__all__ = ["is_local", "is_pipe", "join", "read_bytes", "exists", "open_stream", "register"]


def is_pipe(location: str) -> bool:
    """A ``pipe:`` command."""
    return location.startswith("pipe:")


def is_local(location: str) -> bool:
    """A plain local path (no ``scheme://``, not ``pipe:``)."""
    return not is_pipe(location) and "://" not in location


def join(location: str, name: str) -> str:
    """The location of file ``name`` in the shard location ``location`` (see the module docstring).

    Raises:
        ValueError: a ``pipe:`` location without ``{}``.
    """
    if is_pipe(location):
        if "{}" not in location:
            raise ValueError(f"{location}: a pipe: shard location needs {{}} where the file name goes, e.g. "
                             "pipe:aws s3 cp s3://bucket/web/{} -")
        return location.replace("{}", name)
    if is_local(location):
        return os.path.abspath(os.path.join(location, name))
    return location.rstrip("/") + "/" + name


def read_bytes(url: str) -> bytes:
    """The whole content of a local file, fsspec URL or ``pipe:`` command.

    Raises:
        OSError: missing/unreadable (FileNotFoundError for a missing local or fsspec file), or a pipe command
            that exits non-zero (its stderr in the message).
    """
    if is_pipe(url):
        r = subprocess.run(url[len("pipe:"):], shell=True, capture_output=True)
        if r.returncode != 0:
            detail = r.stderr.decode(errors="replace").strip().splitlines()
            raise OSError(f"command exited with status {r.returncode}: {detail[-1] if detail else 'no output'}")
        return r.stdout
    if is_local(url):
        with open(url, "rb") as f:
            return f.read()
    with _fsspec_open(url) as f:
        return f.read()


def exists(url: str) -> bool | None:
    """Whether the file exists; None for a ``pipe:`` command (known only by running it)."""
    if is_pipe(url):
        return None
    if is_local(url):
        return os.path.isfile(url)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.isfile(path)


def open_stream(url: str) -> IO[bytes]:
    """A readable binary stream (local file, fsspec file, or a ``pipe:`` command's output via WebDataset)."""
    if is_local(url):
        return open(url, "rb")
    register(url)
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def _fsspec_open(url: str):
    try:
        import fsspec
    except ImportError:
        raise OSError(f"{url}: reading URLs needs fsspec (pip install fsspec)") from None
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package (s3fs, gcsfs, ...) missing
        raise OSError(f"{url}: fsspec cannot open it ({e})") from None


def register(url: str) -> None:
    """Let WebDataset's ``gopen`` open ``url``: a ``scheme://`` WebDataset has no handler for is opened with fsspec
    (WebDataset's own handlers -- ``pipe:``, ``http(s)`` via curl, ``gs`` via gsutil, ... -- are kept)."""
    if is_local(url) or is_pipe(url):
        return
    from webdataset.gopen import gopen_schemes

    scheme = url.split("://", 1)[0]
    if scheme not in gopen_schemes or scheme == "file":
        gopen_schemes[scheme] = _gopen_fsspec


def _gopen_fsspec(url, mode="rb", bufsize=8192):
    return _fsspec_open(url)
