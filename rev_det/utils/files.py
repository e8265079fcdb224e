"""Small file helpers shared by the dataset cache, the shipped weights and the tools."""

import hashlib
import json
import os

__all__ = ["sha256_file", "write_results"]


def sha256_file(path: str) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_results(out_dir: str, markdown: str, data, name: str = "results") -> None:
    """Write a measurement's report as ``<out_dir>/<name>.md`` and its data as ``<name>.json``
    (creating ``out_dir``): the form every tool under tools/ leaves its results in."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
