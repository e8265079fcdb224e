"""What every trunk's ``from_config`` reads alike: its named size and the backprop options.

These read a yacs config by attribute only, so the model files still import no
``rev_det.config``: the keys and their defaults are defined there, read here.
"""

from typing import Any, Dict, Mapping

from ..reversible import check_backprop

__all__ = ["size_args", "backprop_args"]


def size_args(node, prefix: str, sizes: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """A trunk's size arguments from its config node: the row of ``sizes`` that ``node.SIZE``
    names, with every size key the config sets taking precedence.

    A size key is an argument of the table's rows in upper case (``drop_path_rate`` ->
    ``DROP_PATH_RATE``); it is set when it is not None, its default. A set key wins over the named
    size, as a later setting wins over an earlier one in a Detectron2 config: ``SIZE: "L"`` with
    ``DROP_PATH_RATE: 0.3`` is ViT-L with drop path 0.3. ``SIZE: ""`` names no size; then every
    size key must be set.

    Args:
        node: the trunk's config node (e.g. ``cfg.MODEL.REVVIT``).
        prefix: its full key, for error messages (e.g. "MODEL.REVVIT").
        sizes: the size table (name -> constructor arguments), every row with the same keys.

    Returns:
        dict: constructor argument -> value, lists (as yaml gives them) as tuples.
    """
    name = node.SIZE
    if name and name not in sizes:
        raise ValueError(
            f"{prefix}.SIZE = {name!r} is not valid; choose one of {tuple(sizes)}, or '' to give "
            "every size key explicitly."
        )
    keys = list(next(iter(sizes.values())))
    args = dict(sizes[name]) if name else {}
    args.update({k: node[k.upper()] for k in keys if node[k.upper()] is not None})
    missing = [f"{prefix}.{k.upper()}" for k in keys if k not in args]
    if missing:
        raise ValueError(
            f"{prefix}.SIZE is '' (no named size) and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: name a size, one of "
            f"{tuple(sizes)}, or set every size key ({', '.join(k.upper() for k in keys)})."
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def backprop_args(cfg) -> Dict[str, Any]:
    """``backprop`` and ``parallel_backward`` from ``cfg.MODEL.REV`` (the same for every trunk)."""
    return dict(
        backprop=check_backprop(cfg.MODEL.REV.BACKPROP, "MODEL.REV.BACKPROP"),
        parallel_backward=cfg.MODEL.REV.PARALLEL_BACKWARD,
    )
