"""Small file helpers shared by the dataset cache and the shipped weights."""

import hashlib

__all__ = ["sha256_file"]


def sha256_file(path: str) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
