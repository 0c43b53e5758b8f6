"""SHA-256 digests of files and bytes: bundle files, checkpoints, images (feature-cache keys), downloads.

One definition, so a checkpoint verified by `model pull`, the digest a bundle card records and the
key under which an image's features are cached are the same number for the same file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def parts_digest(*parts: object) -> str:
    """sha256 hex of the parts' str() joined by the unit separator: the key of a recipe (a phantom
    rendered in memory, a shifted copy) that is never written to a file."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def bytes_digest(data: bytes) -> str:
    """sha256 hex of bytes (equal to file_digest of a file holding them)."""
    return hashlib.sha256(data).hexdigest()
