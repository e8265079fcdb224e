"""The builder table: each trunk's ``from_config``, the size tables named by MODEL.*.SIZE, and
the one pyramid choice keyed by trunk kind and MODEL.REV.PYRAMID."""

import inspect
import os

import pytest
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import FPN
from helpers import DEMO_MVIT, DEMO_YAML, ROOT, tiny_cfg, yacs_cfg

import rev_det
from rev_det.checks import check_yacs_config
from rev_det.modeling import (
    PYRAMIDS,
    REVMVIT_SIZES,
    REVVIT_SIZES,
    RecomputedFPN,
    ReversibleFeaturePyramid,
    RevMViT,
    RevViT,
    SimpleFeaturePyramid,
    build_pyramid,
    build_rev_mvit_backbone,
    build_rev_vit_backbone,
    vit_trunk_args,
)

RGB = ShapeSpec(channels=3)
TRUNKS = {"REVVIT": (RevViT, REVVIT_SIZES), "REVMVIT": (RevMViT, REVMVIT_SIZES)}
COCO = os.path.join(ROOT, "configs", "COCO")


def shapes(module):
    return {name: tuple(p.shape) for name, p in module.state_dict().items()}


def default_cfg(*opts):
    cfg = get_cfg()
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


# The mapping the builders wrote out by hand before ``from_config``: the reference it must keep.
def handwritten_rev_vit(cfg):
    c = cfg.MODEL.REVVIT
    return RevViT(
        img_size=c.IMG_SIZE,
        patch_size=c.PATCH_SIZE,
        in_chans=3,
        embed_dim=c.EMBED_DIM,
        depth=c.DEPTH,
        num_heads=c.NUM_HEADS,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        drop_path_rate=c.DROP_PATH_RATE,
        use_abs_pos=c.USE_ABS_POS,
        use_rel_pos=c.USE_REL_POS,
        window_size=c.WINDOW_SIZE,
        window_block_indexes=tuple(c.WINDOW_BLOCK_INDEXES),
        pretrain_img_size=c.PRETRAIN_IMG_SIZE,
        pretrain_use_cls_token=c.PRETRAIN_USE_CLS_TOKEN,
        stem_channels=tuple(c.STEM_CHANNELS),
        stem_norm=c.STEM_NORM,
        backprop=cfg.MODEL.REV.BACKPROP,
        parallel_backward=cfg.MODEL.REV.PARALLEL_BACKWARD,
    )


def handwritten_rev_mvit(cfg):
    c = cfg.MODEL.REVMVIT
    return RevMViT(
        img_size=c.IMG_SIZE,
        in_chans=3,
        embed_dim=c.EMBED_DIM,
        depth=c.DEPTH,
        num_heads=c.NUM_HEADS,
        last_block_indexes=tuple(c.LAST_BLOCK_INDEXES),
        adaptive_kv_stride=c.ADAPTIVE_KV_STRIDE,
        adaptive_window_size=c.ADAPTIVE_WINDOW_SIZE,
        residual_pooling=c.RESIDUAL_POOLING,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        drop_path_rate=c.DROP_PATH_RATE,
        use_abs_pos=c.USE_ABS_POS,
        use_rel_pos=c.USE_REL_POS,
        backprop=cfg.MODEL.REV.BACKPROP,
        parallel_backward=cfg.MODEL.REV.PARALLEL_BACKWARD,
        out_features=tuple(c.OUT_FEATURES),
    )


@pytest.mark.parametrize(
    "trunk, build, handwritten, path",
    [
        (RevViT, build_rev_vit_backbone, handwritten_rev_vit, DEMO_YAML),
        (RevMViT, build_rev_mvit_backbone, handwritten_rev_mvit, DEMO_MVIT),
    ],
    ids=["RevViT", "RevMViT"],
)
def test_from_config_round_trip_equals_the_handwritten_mapping(trunk, build, handwritten, path):
    """cfg -> from_config -> module: the same parameter names and shapes, drop path rates and
    windows as the explicit keyword mapping, and the registered builder's trunk is that module."""
    cfg = yacs_cfg(path, "MODEL.DEVICE", "meta")  # the demo configs give every size key
    with torch.device("meta"):
        ours = trunk(**trunk.from_config(cfg, RGB))
        reference = handwritten(cfg)
        built = build(cfg, RGB).net  # the default pyramids keep their trunk as ``net``
    assert shapes(ours) == shapes(reference) == shapes(built)
    assert repr(ours) == repr(reference) == repr(built)  # drop path rates, windows, norms
    assert set(trunk.from_config(cfg, RGB)) <= set(inspect.signature(trunk).parameters)


@pytest.mark.parametrize(
    "key, size",
    [(k, s) for k, (_, sizes) in TRUNKS.items() for s in sizes],
    ids=lambda v: str(v),
)
def test_every_named_size_gives_its_table_row(key, size):
    trunk, sizes = TRUNKS[key]
    args = trunk.from_config(default_cfg(f"MODEL.{key}.SIZE", size), RGB)
    assert {k: args[k] for k in sizes[size]} == dict(sizes[size])
    with torch.device("meta"):
        model = trunk(**args)
    assert len(model.blocks) == sizes[size]["depth"]


def test_the_shipped_coco_configs_name_their_size_and_match_their_lazy_twins():
    """Each size's numbers are written once (the tables); the yacs config and its LazyConfig
    twin build the same backbone from them."""
    twins = [
        ("rev_vit_b", "rev_vit_b_100ep", "REVVIT", "B"),
        ("rev_vit_l", "rev_vit_l_100ep", "REVVIT", "L"),
        ("rev_mvit_t", "rev_mvit_t_36ep", "REVMVIT", "T"),
        ("rev_mvit_s", "rev_mvit_s_36ep", "REVMVIT", "S"),
    ]
    for yacs_name, lazy_name, key, size in twins:
        cfg = yacs_cfg(os.path.join(COCO, f"mask_rcnn_{yacs_name}.yaml"), "MODEL.DEVICE", "meta")
        assert cfg.MODEL[key].SIZE == size
        assert all(cfg.MODEL[key][k.upper()] is None for k in TRUNKS[key][1][size])
        lazy = LazyConfig.load(os.path.join(COCO, f"mask_rcnn_{lazy_name}.py"))
        with torch.device("meta"):
            from_yacs, from_lazy = build_model(cfg).backbone, instantiate(lazy.model.backbone)
        assert shapes(from_yacs) == shapes(from_lazy), yacs_name
        assert len(from_lazy.net.blocks) == TRUNKS[key][1][size]["depth"]
        check_yacs_config(cfg)  # the checks read the named size too


def test_size_keys_a_config_sets_win_over_the_named_size():
    args = RevViT.from_config(
        default_cfg("MODEL.REVVIT.SIZE", "L", "MODEL.REVVIT.DROP_PATH_RATE", 0.3), RGB
    )
    assert args["drop_path_rate"] == 0.3
    assert {k: v for k, v in args.items() if k in REVVIT_SIZES["L"] and k != "drop_path_rate"} == {
        k: v for k, v in REVVIT_SIZES["L"].items() if k != "drop_path_rate"
    }
    # Set in a base config, a size key still wins over the size a derived config names.
    cfg = default_cfg("MODEL.REVMVIT.DEPTH", 12, "MODEL.REVMVIT.LAST_BLOCK_INDEXES", [0, 2, 9, 11])
    cfg.merge_from_list(["MODEL.REVMVIT.SIZE", "B"])
    args = RevMViT.from_config(cfg, RGB)
    assert (args["depth"], args["last_block_indexes"]) == (12, (0, 2, 9, 11))
    assert args["drop_path_rate"] == REVMVIT_SIZES["B"]["drop_path_rate"]


def test_no_named_size_needs_every_size_key_and_a_wrong_size_names_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"MODEL.REVVIT.SIZE is '' .* MODEL.REVVIT.EMBED_DIM, MODEL.REVVIT.NUM_HEADS, "
        r"MODEL.REVVIT.DROP_PATH_RATE, MODEL.REVVIT.WINDOW_BLOCK_INDEXES are not set: name a "
        r"size, one of \('B', 'L', 'H'\)",
    ):
        RevViT.from_config(default_cfg("MODEL.REVVIT.SIZE", "", "MODEL.REVVIT.DEPTH", 2), RGB)
    with pytest.raises(
        ValueError, match=r"MODEL.REVMVIT.SIZE = 'XL' is not valid; choose one of \('T', 'S'"
    ):
        RevMViT.from_config(default_cfg("MODEL.REVMVIT.SIZE", "XL"), RGB)
    # A custom size: SIZE "" and every size key, as the demo configs (which leave SIZE alone).
    cfg = yacs_cfg(DEMO_YAML, "MODEL.REVVIT.SIZE", "")
    assert RevViT.from_config(cfg, RGB) == RevViT.from_config(yacs_cfg(DEMO_YAML), RGB)


def test_a_dumped_config_reloads_to_the_same_arguments(tmp_path):
    """Unset size keys are None in config.yaml (what train_net writes) and stay unset."""
    cfg = yacs_cfg(os.path.join(COCO, "mask_rcnn_rev_vit_l.yaml"))
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    reloaded = yacs_cfg(str(path))
    assert RevViT.from_config(reloaded, RGB) == RevViT.from_config(cfg, RGB)


def test_vit_trunk_args_are_the_vit_shaped_part_of_rev_vits():
    """Detectron2's ViT (the benchmarks' ViTDet) takes these by name: no RevViT-only ones."""
    args = vit_trunk_args(default_cfg())
    rev_vit = RevViT.from_config(default_cfg(), RGB)
    assert {k: rev_vit[k] for k in args} == args
    assert set(rev_vit) - set(args) == {
        "in_chans",
        "stem_channels",
        "stem_norm",
        "backprop",
        "parallel_backward",
    }
    try:
        from detectron2.modeling import ViT
    except ImportError:  # Detectron2 v0.6 has no ViTDet
        return
    assert set(args) <= set(inspect.signature(ViT).parameters)


def test_the_pyramid_table_builds_each_pair_and_names_the_valid_choices():
    vit = tiny_cfg("MODEL.DEVICE", "meta")
    vitdet = tiny_cfg("MODEL.DEVICE", "meta", "MODEL.BACKBONE.NAME", "build_rev_vitdet_backbone")
    mvit = yacs_cfg(DEMO_MVIT, "MODEL.DEVICE", "meta")
    expected = {
        ("single-scale", "reversible"): (vit, ReversibleFeaturePyramid),
        ("single-scale", "simple"): (vit, SimpleFeaturePyramid),
        ("single-scale, one-stream", "simple"): (vitdet, SimpleFeaturePyramid),
        ("single-scale, one-stream", "reversible"): (vitdet, ReversibleFeaturePyramid),
        ("multi-scale", "reversible"): (mvit, RecomputedFPN),
        ("multi-scale", "fpn"): (mvit, FPN),
    }
    assert set(PYRAMIDS) == set(expected)
    for (_, name), (cfg, cls) in expected.items():
        cfg.MODEL.REV.PYRAMID = name
        with torch.device("meta"):
            backbone = build_model(cfg).backbone
        assert type(backbone) is cls, name
    with torch.device("meta"):
        trunk = RevViT(embed_dim=48, depth=1, num_heads=1)
    errors = {
        "fpn": r"MODEL.REV.PYRAMID = 'fpn' is for multi-scale trunks; RevViT is single-scale: "
        r"choose 'reversible' or 'simple'\.",
        "fast": r"MODEL.REV.PYRAMID = 'fast' is not valid; RevViT is single-scale: choose "
        r"'reversible' or 'simple'\.",
    }
    for name, message in errors.items():
        with pytest.raises(ValueError, match=message):
            build_pyramid(default_cfg("MODEL.REV.PYRAMID", name), trunk)
    with pytest.raises(
        ValueError,
        match=r"MODEL.REV.PYRAMID = 'simple' is for single-scale trunks; RevMViT is multi-scale: "
        r"choose 'reversible' or 'fpn'\.",
    ):
        build_model(yacs_cfg(DEMO_MVIT, "MODEL.DEVICE", "meta", "MODEL.REV.PYRAMID", "simple"))
