"""File helpers shared by checkpoints and stage keys (no torch: stage keys import it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
