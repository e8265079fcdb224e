"""Facts about the installed Detectron2."""

__all__ = ["detectron2_has_compiled_ops"]


def detectron2_has_compiled_ops() -> bool:
    """True if Detectron2 was built with its C++ ops (e.g. the fast COCO evaluator).

    rev_det's set-up builds a pure-Python Detectron2 whose ``_C`` placeholder raises
    ImportError on op lookup; a Detectron2 built from source has the real ops.
    """
    try:
        from detectron2 import _C

        _C.COCOevalAccumulate
    except (ImportError, AttributeError):
        return False
    return True
