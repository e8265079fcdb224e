"""Shared by the test modules: paths, tiny models, configs and batches, entry point runners."""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances
from torch import nn
from torchvision.ops import StochasticDepth

import rev_det
from rev_det.modeling.rev_mvit import RevMViT
from rev_det.modeling.rev_vit import RevViT
from rev_det.reversible import ReversibleBlock, ReversibleSequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YACS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "mask_rcnn_*.yaml"), recursive=True))
LAZY = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "mask_rcnn_*.py"), recursive=True))
DEMO_YAML = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo.yaml")
DEMO_LAZY = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo.py")
DEMO_MVIT = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_mvit_demo.yaml")

# The demo, shrunk to seconds per run: a 2-block trunk (so without the demo's pretrained one),
# small images, few iterations, ViT's patch embedding (the demo's stem adds nothing they test).
# No score threshold at test time: however little such a run has learnt, every image gets
# detections, so COCO evaluation reports box and mask AP (with none, it reports a NaN box AP
# and no mask AP, which a rounding-level change in training can bring about).
TINY_YACS = [
    "MODEL.WEIGHTS", "", "MODEL.REV.STRICT_LOAD", "False",
    "MODEL.REVVIT.EMBED_DIM", "96", "MODEL.REVVIT.DEPTH", "2",
    "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", "[0]", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.REVVIT.STEM_CHANNELS", "[]",
    "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "5",
    "SOLVER.STEPS", "(1000,)", "SOLVER.CHECKPOINT_PERIOD", "20",
    "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "20",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]  # fmt: skip
TINY_LAZY = [
    "train.init_checkpoint=''", "train.strict_load=False",
    "model.backbone.net.embed_dim=96", "model.backbone.net.depth=2",
    "model.backbone.net.window_block_indexes=[0]", "model.backbone.out_channels=32",
    "model.backbone.net.stem_channels=[]",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[160]",
    "dataloader.test.mapper.augmentations.0.short_edge_length=160",
    "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0", "optimizer.lr=0.001",
    "lr_multiplier.scheduler.milestones=[30]", "lr_multiplier.scheduler.values=[1.0,0.1]",
    "lr_multiplier.warmup_length=0.1", "train.checkpointer.period=20", "train.eval_period=0",
    "model.roi_heads.box_predictor.test_score_thresh=0.0",
]  # fmt: skip


def yacs_cfg(path, *opts):
    """A yacs config with rev_det's keys, read from path, then opts (key, value, ...) merged."""
    cfg = get_cfg()
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def tiny_cfg(*opts):
    """The demo config shrunk further, for fast CPU steps."""
    return yacs_cfg(
        DEMO_YAML,
        "MODEL.REVVIT.EMBED_DIM", 48,
        "MODEL.REVVIT.DEPTH", 4,
        "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", [0, 2],
        "MODEL.REVVIT.DROP_PATH_RATE", 0.1,
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.ROI_BOX_HEAD.CONV_DIM", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
        *opts,
    )  # fmt: skip


def fake_batch(sizes=((192, 256), (200, 249))):
    """A training batch of random images of the given (h, w) sizes, each with two boxes + masks."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in sizes:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 90.0, 120.0], [50.0, 30.0, 150.0, 100.0]]))
        inst.gt_classes = torch.tensor([1, 4])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        masks[0, 20:120, 10:90] = True
        masks[1, 30:100, 50:150] = True
        inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


class Block(ReversibleBlock):
    """A small transformer block: F = norm + attention, G = norm + MLP, all with randomness."""

    def __init__(self, dim=16, heads=2, dropout=0.1, drop_path=0.2):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop_path = StochasticDepth(drop_path, "row")

    def F(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        p = self.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.drop_path(self.proj(x.transpose(1, 2).reshape(b, n, c)))

    def G(self, x):
        x = F.dropout(F.gelu(self.fc1(self.norm2(x))), self.p, self.training)
        return self.drop_path(self.fc2(x))


def make_stack(depth, dtype=torch.float64, seed=0, **kw):
    """A ReversibleSequence of depth Blocks (kw passed to each), seeded, in dtype."""
    torch.manual_seed(seed)
    return ReversibleSequence([Block(**kw) for _ in range(depth)]).to(dtype)


def rel_err(a, b):
    """Largest absolute difference of a and b, relative to the largest magnitude in b."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def tiny_rev_vit(depth=4, dim=32, heads=2, **kw):
    """A small seeded RevViT on 64-pixel images, windowed blocks at even indexes; kw override."""
    args = dict(
        img_size=64,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        drop_path_rate=0.2,
        use_rel_pos=True,
        window_size=3,
        window_block_indexes=tuple(i for i in range(depth) if i % 2 == 0),
        pretrain_img_size=64,
    )
    args.update(kw)
    torch.manual_seed(0)
    return RevViT(**args)


def tiny_rev_mvit(**kw):
    """Two blocks in stage 2, then a transition and one reversible block per stage.

    At 64x96 input this has windowed blocks with an explicit relative position bias and a
    global block (block 3) that folds it into q and k, pooled keys everywhere.
    """
    args = dict(
        img_size=64,
        embed_dim=16,
        depth=8,
        num_heads=1,
        last_block_indexes=(1, 3, 5, 7),
        adaptive_window_size=8,
        drop_path_rate=0.3,
        use_abs_pos=True,
        pretrain_img_size=64,
        pretrain_use_cls_token=False,
    )
    args.update(kw)
    torch.manual_seed(0)
    return RevMViT(**args)


def block_norm_inputs_dense(net, x):
    """Whether each input of every block's norm1 and norm2 was a dense tensor, over one training
    step of the trunk ``net`` on ``x`` (forward and, in a recomputing mode, backward)."""
    dense = []
    for block in net.blocks:
        for norm in (block.norm1, block.norm2):
            norm.register_forward_pre_hook(
                lambda module, args: dense.append(args[0].is_contiguous())
            )
    sum(f.sum() for f in net.train()(x).values()).backward()
    return dense


def run_entry(script, args, datasets_root):
    """Run an entry point; returns (exit status, stdout + stderr)."""
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "projects", script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc.returncode, proc.stdout + proc.stderr


def run(script, args, datasets_root):
    """Run an entry point that must succeed; returns its output."""
    code, log = run_entry(script, args, datasets_root)
    assert code == 0, log[-8000:]
    return log


def copypaste_ap(log):
    """{"bbox": AP, "segm": AP} from Detectron2's 'copypaste' result lines (the last ones)."""
    found = {}
    for task, values in re.findall(
        r"copypaste: Task: (\w+)\n.*copypaste: AP,.*\n.*copypaste: ([\d.,na]+)", log
    ):
        found[task] = float(values.split(",")[0])
    return found


def load_script(folder, name):
    """<folder>/<name>.py of the repository (projects/, tools/: not packages) as a module, its
    main() not run."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_entry_point(name):
    """projects/<name>.py imported as a module (its main() not run)."""
    return load_script("projects", name)
