"""rev_det's yacs config keys: ``add_revdet_config(cfg)`` adds them with their defaults."""

from detectron2.config import CfgNode as CN

from .modeling.rev_vitdet import REVERSIBLE_AT

__all__ = ["add_revdet_config", "check_choice"]


def add_revdet_config(cfg: CN) -> CN:
    """Add rev_det's keys (MODEL.REV, MODEL.REVVIT, SOLVER.*) to a Detectron2 config.

    Call it before ``merge_from_file`` so that rev_det's keys in a yaml are known. Calling it
    twice is harmless.
    """
    _c = cfg
    if "REV" in _c.MODEL:
        return cfg

    # Options shared by every reversible trunk.
    _c.MODEL.REV = CN()
    # "reversible" | "autograd" | "checkpoint": the same model, only memory and time differ.
    _c.MODEL.REV.BACKPROP = "reversible"
    # "reversible": rev_det's pyramid whose activations are rebuilt or recomputed in backward
    # (ReversibleFeaturePyramid for RevViT, RecomputedFPN for RevMViT); "simple": ViTDet's
    # SimpleFeaturePyramid (RevViT); "fpn": Detectron2's FPN, stored activations (RevMViT). The
    # table of these pairs is rev_det.modeling.PYRAMIDS.
    _c.MODEL.REV.PYRAMID = "reversible"
    # Coupling blocks per level of the reversible pyramid (see ReversibleFeaturePyramid): one
    # is the demo's measured-accurate pyramid and, with its backward, costs about what ViTDet's
    # pyramid costs; two have the FLOPs of ViTDet's 3x3 conv in each pass.
    _c.MODEL.REV.PYRAMID_BLOCKS = 1
    # Pad images to a square of this size, rounded up to the size divisibility (RevViT only; the
    # pyramid pads, on every Detectron2 version, and rejects larger images; 0: divisibility only).
    _c.MODEL.REV.SQUARE_PAD = 0
    # On CUDA, rebuild the next block function's input on a second CUDA stream while the current
    # one back-propagates (PaReprop). Same gradients; on CPU the backward runs serially.
    _c.MODEL.REV.PARALLEL_BACKWARD = False
    # rev_det.training.ReconstructionCheck: every PERIOD iterations (0: never) measure how far
    # the block inputs that the reversible backward rebuilds drift from the true ones, log it to
    # the event storage (reversible/max_rel_error, reversible/mean_rel_error) and stop training
    # if the max relative error of a rebuilt input exceeds THRESHOLD or is not finite.
    _c.MODEL.REV.CHECK_RECONSTRUCTION = CN()
    _c.MODEL.REV.CHECK_RECONSTRUCTION.PERIOD = 0
    _c.MODEL.REV.CHECK_RECONSTRUCTION.THRESHOLD = 0.1
    # RevViTDet's scaled couplings, Y = BETA X + ALPHA R + f(R) (docs/vitdet_surrogate.md):
    # rev_det.training.CouplingSchedule moves (alpha, beta) linearly from (ALPHA[0], BETA[0]) to
    # (ALPHA[1], BETA[1]) between the fractions RAMP[0] and RAMP[1] of SOLVER.MAX_ITER. (1, 0)
    # is the pretrained ViT, (0, 1) RevViT's coupling. With BACKPROP "reversible" the trunk runs
    # "checkpoint" until alpha <= REVERSIBLE_AT[0] and beta >= REVERSIBLE_AT[1].
    _c.MODEL.REV.COUPLING = CN()
    _c.MODEL.REV.COUPLING.ALPHA = (1.0, 0.0)
    _c.MODEL.REV.COUPLING.BETA = (0.0, 1.0)
    _c.MODEL.REV.COUPLING.RAMP = (0.0, 0.1)
    _c.MODEL.REV.COUPLING.REVERSIBLE_AT = REVERSIBLE_AT
    # Recompute the RPN, box and mask heads' activations in backward (rev_det.modeling.heads):
    # with a reversible trunk and pyramid they hold most of what the step keeps for backward.
    _c.MODEL.REV.RECOMPUTE_HEADS = False
    # Loading MODEL.WEIGHTS (or resuming) fails if the checkpoint lacks a backbone weight or
    # has one of another shape, instead of leaving it at its initialization.
    _c.MODEL.REV.STRICT_LOAD = False

    # RevViT's and RevViTDet's shape.
    _c.MODEL.REVVIT = CN()
    # The trunk's size: a row of rev_det.modeling.REVVIT_SIZES ("B", "L", "H", ViTDet's), which
    # gives the five size keys below. Those left None take the named size's values; those a
    # config sets win over it (SIZE "L" with DROP_PATH_RATE 0.3 is ViT-L with drop path 0.3).
    # "": no named size, every size key must be set (a custom size, as the demo configs).
    _c.MODEL.REVVIT.SIZE = "B"
    _c.MODEL.REVVIT.EMBED_DIM = None
    _c.MODEL.REVVIT.DEPTH = None
    _c.MODEL.REVVIT.NUM_HEADS = None
    _c.MODEL.REVVIT.DROP_PATH_RATE = None
    _c.MODEL.REVVIT.WINDOW_BLOCK_INDEXES = None
    _c.MODEL.REVVIT.IMG_SIZE = 1024
    _c.MODEL.REVVIT.PATCH_SIZE = 16
    _c.MODEL.REVVIT.MLP_RATIO = 4.0
    _c.MODEL.REVVIT.QKV_BIAS = True
    _c.MODEL.REVVIT.USE_ABS_POS = True
    _c.MODEL.REVVIT.USE_REL_POS = True
    _c.MODEL.REVVIT.WINDOW_SIZE = 14
    _c.MODEL.REVVIT.PRETRAIN_IMG_SIZE = 224
    _c.MODEL.REVVIT.PRETRAIN_USE_CLS_TOKEN = True
    # A convolutional stem before the patch projection (rev_det.modeling.PatchEmbed): channels of
    # each 3x3 stride-2 convolution, [] for ViT's patch embedding; its norm ("FrozenBN", "GN",
    # "BN", ...): "FrozenBN" by default, as fine-tuning uses it (training batch norm suits the
    # large batches of pre-training, and keeps the stem from being recomputed in backward).
    _c.MODEL.REVVIT.STEM_CHANNELS = []
    _c.MODEL.REVVIT.STEM_NORM = "FrozenBN"

    _c.MODEL.REVMVIT = CN()
    # The trunk's size: a row of rev_det.modeling.REVMVIT_SIZES ("T", "S", "B", "L", MViTv2's;
    # "paper_b", the paper's Rev-MViT-B), with the same rule for the size keys below as
    # MODEL.REVVIT.SIZE.
    _c.MODEL.REVMVIT.SIZE = "T"
    _c.MODEL.REVMVIT.EMBED_DIM = None
    _c.MODEL.REVMVIT.DEPTH = None
    _c.MODEL.REVMVIT.NUM_HEADS = None
    _c.MODEL.REVMVIT.LAST_BLOCK_INDEXES = None
    _c.MODEL.REVMVIT.DROP_PATH_RATE = None
    # "mvitv2" (Detectron2's MViTv2 made reversible) or "paper" (the paper's released Rev-MViT);
    # rev_det.modeling.rev_mvit's docstring says what differs.
    _c.MODEL.REVMVIT.LAYOUT = None
    _c.MODEL.REVMVIT.IMG_SIZE = 224  # the relative position tables' size (MViTv2 ImageNet)
    _c.MODEL.REVMVIT.MLP_RATIO = 4.0
    _c.MODEL.REVMVIT.QKV_BIAS = True
    _c.MODEL.REVMVIT.ADAPTIVE_KV_STRIDE = 4
    _c.MODEL.REVMVIT.ADAPTIVE_WINDOW_SIZE = 56
    _c.MODEL.REVMVIT.RESIDUAL_POOLING = True
    _c.MODEL.REVMVIT.USE_ABS_POS = False
    _c.MODEL.REVMVIT.USE_REL_POS = True
    _c.MODEL.REVMVIT.OUT_FEATURES = ["scale2", "scale3", "scale4", "scale5"]

    # Your own COCO-format datasets, registered by name before training or evaluation
    # (rev_det.data.register_coco_datasets): [[name, json_file, image_root], ...]; then name them
    # in DATASETS.TRAIN / TEST and set MODEL.ROI_HEADS.NUM_CLASSES to their category count.
    _c.DATASETS.COCO_INSTANCES = []

    # AdamW with layer-wise lr decay (Detectron2 v0.6's yacs optimizer is SGD only); used by
    # rev_det.solver.build_optimizer when SOLVER.OPTIMIZER is "ADAMW".
    _c.SOLVER.OPTIMIZER = "SGD"
    # Stop at the first step of an optimizer that is not SOLVER.OPTIMIZER (Detectron2's stock
    # DefaultTrainer builds SGD whatever it says; rev_det.optimizer_guard).
    _c.SOLVER.CHECK_OPTIMIZER = True
    _c.SOLVER.BETAS = (0.9, 0.999)
    _c.SOLVER.LR_DECAY_RATE = 1.0
    # Update each parameter inside backward, as soon as its gradient is complete, and free that
    # gradient at once (rev_det.step_in_backward): the step never holds all gradients. AdamW or
    # SGD, fp32 or bfloat16 AMP; the same parameters as stepping after backward.
    _c.SOLVER.STEP_IN_BACKWARD = False
    # Autocast dtype of AMP training (SOLVER.AMP.ENABLED) with rev_det.training.RevAMPTrainer:
    # "float16" (with loss scaling) or "bfloat16". Detectron2 v0.6 has no such key.
    if "PRECISION" not in _c.SOLVER.AMP:
        _c.SOLVER.AMP.PRECISION = "float16"
    return cfg


def check_choice(key: str, value: str, choices) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise naming the valid ones."""
    if value not in choices:
        raise ValueError(f"{key} = {value!r} is not valid; choose one of {tuple(choices)}.")
    return value
