"""rev_det's pretrained weights, named ``rev_det://NAME`` in ``MODEL.WEIGHTS`` / ``init_checkpoint``.

Detectron2 resolves ``detectron2://`` names of its model zoo through a path handler of its
``PathManager``; rev_det registers one for ``rev_det://`` (at ``import rev_det``). The weights
ship inside the package, and every load checks the file's sha256 against the one recorded here,
so a missing, truncated or modified file ends in an error that names the command which rebuilds
it, never in a silently different model.
"""

import os
from dataclasses import dataclass
from typing import Dict

from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler

from ..utils.files import sha256_file

__all__ = ["PREFIX", "WEIGHTS", "WeightFile", "RevDetHandler", "weight_path"]

PREFIX = "rev_det://"
_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


@dataclass(frozen=True)
class WeightFile:
    """One shipped checkpoint: its file under ``rev_det/model_zoo/weights``, its sha256 and the
    command (run from the repository root) that produced it."""

    file: str
    sha256: str
    command: str


WEIGHTS: Dict[str, WeightFile] = {
    # The demo's RevViT trunk (convolutional stem, embed 192, depth 6), pretrained by dense shape
    # segmentation and object classification on the shapes generator's "pretrain" stream in two
    # stages of 1500 steps of 16 images (59 + 44 min on a 2-core AMD EPYC); docs/pretrained_trunk.md
    # has its runs and numbers.
    "demo/rev_vit_demo_trunk.pth": WeightFile(
        file="rev_vit_demo_trunk.pth",
        sha256="5b299a9b34c5568a089621a257d75fb77a172f13be871169aa565f5a85f6cc79",
        command=(
            "python tools/pretrain_trunk.py --config-file configs/demo/mask_rcnn_rev_vit_demo.yaml "
            "--output-dir output/pretrain_demo --iterations 1500 --warmup 100 && "
            "python tools/pretrain_trunk.py --config-file configs/demo/mask_rcnn_rev_vit_demo.yaml "
            "--output-dir output/pretrain_demo_2 --init output/pretrain_demo/pretrain_last.pth "
            "--seed 1 --iterations 1500 --lr 5e-4 --warmup 50 "
            "--export rev_det/model_zoo/weights/rev_vit_demo_trunk.pth --half"
        ),
    ),
}


def weight_path(name: str) -> str:
    """The checked local file of ``rev_det://name`` (or of ``name`` without the prefix).

    Raises:
        KeyError: no such weights (the message lists the known names).
        FileNotFoundError: the file is missing; the message gives the command that rebuilds it.
        RuntimeError: the file's sha256 differs from the recorded one (corrupt, truncated or
            replaced); the message gives the command that rebuilds it.
    """
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if key not in WEIGHTS:
        known = ", ".join(PREFIX + k for k in sorted(WEIGHTS))
        raise KeyError(f"{PREFIX}{key} names no rev_det weights; known: {known}.")
    entry = WEIGHTS[key]
    path = os.path.join(_WEIGHTS_DIR, entry.file)
    rebuild = (
        f"Restore it from the repository (git checkout -- {os.path.relpath(path)}) or rebuild it "
        f"with: {entry.command}"
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{PREFIX}{key}: {path} is missing. {rebuild}")
    found = sha256_file(path)
    if found != entry.sha256:
        raise RuntimeError(
            f"{PREFIX}{key}: {path} has sha256 {found}, not the recorded {entry.sha256}: the file "
            f"is corrupt or was replaced. {rebuild} (a rebuilt file has a new sha256: record it "
            "in rev_det/model_zoo/__init__.py)."
        )
    return path


class RevDetHandler(PathHandler):
    """Resolves ``rev_det://NAME`` to the checked local file of :data:`WEIGHTS` ``[NAME]``."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path: str, **kwargs) -> str:
        return weight_path(path)

    def _open(self, path: str, mode: str = "r", **kwargs):
        return PathManager.open(weight_path(path), mode, **kwargs)


PathManager.register_handler(RevDetHandler())
