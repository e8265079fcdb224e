"""Checks of checkpoint and weights files.

:func:`checkpoint_file_problem` says why a local file cannot be a checkpoint (missing, empty,
a directory, a truncated zip archive, a Git LFS pointer, a text file);
:func:`check_weights_file` raises an error naming the weights setting
(``MODEL.WEIGHTS`` / ``train.init_checkpoint``) and the fix.
"""

import os
import zipfile
from typing import Optional

from .names import YACS, SettingNames

__all__ = [
    "check_weights_file",
    "checkpoint_file_problem",
]


_ZIP_MAGIC = b"PK\x03\x04"


def checkpoint_file_problem(path: str) -> Optional[str]:
    """Why the local file ``path`` cannot be a checkpoint, as a phrase completing "the file ...",
    or None if it may be one (a zip archive as torch.save writes, or a pickle)."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a directory, not a checkpoint file"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes), not a checkpoint"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return (
                f"is a damaged or truncated zip archive ({size} bytes; {e}), the format "
                "torch.save writes: it was not downloaded or written completely"
            )
        return None
    # Pickle protocols 2-5 start with the PROTO opcode; legacy torch.save files with a pickled
    # magic number too.
    if head[:1] == b"\x80":
        return None
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the checkpoint itself: fetch it with `git lfs pull`"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"is a text file (it starts with {first!r}), not a checkpoint"
    return (
        f"is neither a zip archive as torch.save writes nor a pickle (it starts with bytes "
        f"{head[:8].hex(' ')}): not a checkpoint"
    )


def check_weights_file(path: str, names: SettingNames = YACS) -> None:
    """Raise ValueError if ``path`` (``MODEL.WEIGHTS`` / ``train.init_checkpoint``) is a local
    file that cannot be a checkpoint. URLs and missing files are left to the loader."""
    # A missing file may not be needed (a resumed run loads its last checkpoint instead); the
    # loader names it if it is.
    if not path or "://" in path or not os.path.exists(path):
        return
    problem = checkpoint_file_problem(path)
    if problem is not None:
        raise ValueError(
            f"{names.weights} = {path!r}: the file {problem}. Point {names.weights} at a "
            "checkpoint written by torch.save or Detectron2 (.pth), a Detectron2 model-zoo "
            ".pkl, or a published trunk converted with tools/convert_pretrained.py; or set it "
            "to '' to train from scratch."
        )
