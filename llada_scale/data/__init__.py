"""Data: the token shard format and shard building, the packing resumable loader, the tokenizer and chat
template rendering. ``DEFAULT_DATA`` is where the project's real data lives unless ``LLADA_DATA`` says
otherwise: ``../shared/data`` next to the repository."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = str(REPO_ROOT.parent / "shared" / "data")


def default_data() -> str:
    """The data directory: ``$LLADA_DATA``, else :data:`DEFAULT_DATA`."""
    return os.environ.get("LLADA_DATA") or DEFAULT_DATA
