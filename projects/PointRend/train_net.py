#!/usr/bin/env python
"""Train and evaluate Detectron2's PointRend with rev_det's backbones (yacs configs).

Detectron2's own ``projects/PointRend/train_net.py`` plus what rev_det needs, which is what any
existing Detectron2 project adds to use these backbones:

1. ``import rev_det`` (registers the backbones and the shapes datasets);
2. ``rev_det.add_revdet_config(cfg)`` before ``merge_from_file``;
3. ``MODEL.BACKBONE.NAME: "build_rev_vit_backbone"`` (or ``build_rev_mvit_backbone``) in the yaml.

The trainer is ``projects/train_net.py``'s ``Trainer`` (rev_det's AdamW with layer-wise lr decay,
a COCO evaluator), and the flags are the same: ``--config-file``, ``--eval-only``, ``--resume``,
``--num-gpus``, ... and ``KEY VALUE`` overrides. For example::

    python projects/PointRend/train_net.py \
        --config-file projects/PointRend/configs/pointrend_rcnn_rev_vit_shapes.yaml
"""

import importlib.util
import os

from detectron2.projects.point_rend import add_pointrend_config

# Workers started by `launch` import this file anew, so rev_det is registered in each of them.
import rev_det  # noqa: F401


def _load_rev_det_train_net():
    """projects/train_net.py, loaded by path: it is a script beside this folder, not a package."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_net.py")
    spec = importlib.util.spec_from_file_location("rev_det_train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_train_net = _load_rev_det_train_net()


# Defined here, not taken from the loaded module, so that `launch` can pickle it for workers.
def main(args):
    return _train_net.main(args, extra_config=(add_pointrend_config,))


if __name__ == "__main__":
    _train_net.invoke_main(main)
