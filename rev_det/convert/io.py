"""Reading checkpoint files into state dicts, and writing converted weights for Detectron2."""

from typing import Dict, Mapping

import torch

from .core import Conversion, ConversionError

__all__ = ["extract_state_dict", "load_checkpoint_file", "save_detectron2_checkpoint"]


def extract_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The model's state dict inside a checkpoint file's object: ``model_state`` (PySlowFast,
    pycls, MViTv2), ``state_dict`` (mmpretrain), ``model`` (MAE, DeiT, Detectron2), or the
    object itself when it is one (timm)."""
    for key in ("model_state", "state_dict", "model"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(
            f"no tensors found in the checkpoint (top-level keys {sorted(checkpoint)[:10]}); "
            "expected a state dict, or one under 'model_state', 'state_dict' or 'model'."
        )
    return tensors


def load_checkpoint_file(path: str, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a ``.pth`` / ``.pyth`` / ``.pt`` checkpoint and return its model state dict.

    Args:
        path: a local file, or any URL Detectron2's ``PathManager`` fetches (``https://``,
            ``detectron2://``), as for ``MODEL.WEIGHTS``.
        trust_pickle: load with ``weights_only=False`` (runs arbitrary pickled code: only for
            files from a source you trust), for checkpoints that store other Python objects.
    """
    from detectron2.utils.file_io import PathManager

    from ..checks import checkpoint_file_problem

    path = PathManager.get_local_path(path)
    problem = checkpoint_file_problem(path)
    if problem is not None:
        raise ConversionError(f"--input {path}: the file {problem}.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError depending on content
        lines = str(e).strip().splitlines() or [type(e).__name__]
        # weights_only refuses pickled Python objects other than tensors and containers: only
        # then does trusting the pickle help.
        refused = next((line.strip() for line in lines if "Unsupported global" in line), None)
        if refused and not trust_pickle:
            raise ConversionError(
                f"--input {path} stores Python objects that torch.load(weights_only=True) "
                f"refuses ({refused}); if the file comes from a source you trust, pass "
                "--trust-pickle."
            ) from e
        raise ConversionError(
            f"--input {path} is not a checkpoint torch.load can read ({type(e).__name__}: "
            f"{lines[0]}): it is damaged or in another format; download it again."
        ) from e
    return extract_state_dict(loaded)


def save_detectron2_checkpoint(conversion: Conversion, prefix: str, path: str):
    """Write ``{"model": {prefix + key: tensor}, "__author__": ...}`` for Detectron2's
    ``DetectionCheckpointer`` (``MODEL.WEIGHTS`` / ``train.init_checkpoint``).

    The keys are already the model's, so ``matching_heuristics`` is off: nothing is renamed on
    load. ``.pkl`` and ``.pyth`` names are refused, since Detectron2 reads those as Caffe2 and
    pycls files. The file is written atomically (:func:`rev_det.checkpoint.atomic_open`): a
    failed save leaves no partial file.
    """
    if path.endswith((".pkl", ".pyth")):
        raise ConversionError(
            f"{path}: Detectron2 reads .pkl files as Caffe2/Detectron1 and .pyth files as pycls "
            "checkpoints; name the output .pth."
        )
    from ..checkpoint import atomic_open

    model = {prefix + k: v for k, v in conversion.state_dict.items()}
    data = {
        "model": model,
        "__author__": f"rev_det convert_pretrained (source {conversion.source})",
        "matching_heuristics": False,
        "rev_det_conversion": {
            "missing": sorted(conversion.missing),
            "dropped": sorted(conversion.dropped),
            "partial_groups": conversion.partial_groups,
        },
    }
    try:
        with atomic_open(path, "wb") as f:
            torch.save(data, f)
    except OSError as e:
        raise ConversionError(f"cannot write --output {path}: {e.strerror or e}.") from e
