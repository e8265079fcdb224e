"""Bad input, for both backbones: each case gives a clear error or a correct result.

Already covered elsewhere and not repeated here: 4-channel tensors, sizes that are no multiple
of the patch size and unknown backprop / pyramid choices on the trunks themselves
(test_rev_vit.py, test_rev_mvit.py, test_configs.py), inputs smaller than a window
(test_rev_vit.py), odd sizes through RevViT's backbone (test_configs.py).
"""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, get_detection_dataset_dicts
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, BoxMode, ImageList, Instances
from detectron2.utils.events import EventStorage, get_event_storage
from helpers import DEMO_MVIT, fake_batch, tiny_cfg, tiny_rev_mvit, tiny_rev_vit, yacs_cfg
from PIL import Image

from rev_det.modeling.rev_mvit import PoolingAttention
from rev_det.modeling.rev_vit import RevViTBlock


def tiny_mvit_cfg(*opts):
    """The RevMViT demo config shrunk for fast CPU steps (windows of 16 at stride 4)."""
    return yacs_cfg(
        DEMO_MVIT,
        "MODEL.REVMVIT.EMBED_DIM", 16,
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
        *opts,
    )  # fmt: skip


CONFIGS = {"rev_vit": tiny_cfg, "rev_mvit": tiny_mvit_cfg}
TRUNKS = {"rev_vit": tiny_rev_vit, "rev_mvit": tiny_rev_mvit}
both = pytest.mark.parametrize("arch", sorted(CONFIGS))


def detector(arch, *opts):
    torch.manual_seed(0)
    return build_model(CONFIGS[arch](*opts))


def image(h, w, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, h, w), generator=g).float()


def infer(model, *images):
    with torch.no_grad():
        return [r["instances"] for r in model.eval()([{"image": im} for im in images])]


def assert_inside(instances, h, w):
    """Detections of an (h, w) image: at least one, boxes inside it, masks of its size."""
    assert instances.image_size == (h, w)
    boxes = instances.pred_boxes.tensor
    assert len(boxes) > 0 and torch.isfinite(boxes).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert instances.pred_masks.shape[1:] == (h, w)


def assert_same_detections(a, b, atol=0.0):
    assert len(a) == len(b)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=atol)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=atol)
    assert torch.equal(a.pred_classes, b.pred_classes)


def instances(h, w, boxes):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.long)
    masks = torch.zeros(len(inst.gt_boxes), h, w, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, inst.gt_boxes.tensor.long().tolist()):
        mask[y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(masks)
    return inst


def train_step(model, batch):
    """One training step; returns the losses (checked finite) after checking the gradients."""
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return losses


# ---------------------------------------------------------------- images with 1 or 4 channels


@both
def test_trunk_names_channels_and_input_format_for_a_grayscale_tensor(arch):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 1, 64, 64\).*INPUT.FORMAT"):
        TRUNKS[arch]().eval()(torch.randn(1, 1, 64, 64))


@both
def test_grayscale_image_in_the_detector_equals_its_rgb_copy(arch):
    # GeneralizedRCNN broadcasts a 1-channel image over the 3 pixel means: exactly what
    # converting it to RGB (gray copied to R, G and B) gives.
    gray = image(100, 130, channels=1)
    model = detector(arch)
    (from_gray,) = infer(model, gray)
    (from_rgb,) = infer(model, gray.expand(3, -1, -1))
    assert_same_detections(from_gray, from_rgb)


@both
def test_input_format_must_match_the_pixel_mean(arch):
    with pytest.raises(ValueError, match=r"INPUT.FORMAT = 'RGBA' gives 4-channel.*PIXEL_MEAN"):
        detector(arch, "INPUT.FORMAT", "RGBA")
    with pytest.raises(ValueError, match="INPUT.FORMAT = 'GRAY' is not an image format"):
        detector(arch, "INPUT.FORMAT", "GRAY")
    detector(arch, "INPUT.FORMAT", "L")  # 1 channel is broadcast (previous test)
    # A consistent 4-channel model is fine: it takes RGBA tensors.
    mean, std = [123.7, 116.3, 103.5, 127.5], [58.4, 57.1, 57.4, 127.5]
    model = detector(arch, "INPUT.FORMAT", "RGBA", "MODEL.PIXEL_MEAN", mean, "MODEL.PIXEL_STD", std)
    (result,) = infer(model, image(64, 96, channels=4))
    assert_inside(result, 64, 96)


def test_rgba_and_grayscale_files_reach_the_detector_as_rgb(tmp_path):
    """DatasetMapper reads files in INPUT.FORMAT: RGBA and grayscale PNGs become RGB."""
    rgba = np.random.default_rng(0).integers(0, 256, (224, 300, 4), dtype=np.uint8)
    files = {"RGBA": rgba, "LA": rgba[..., :2], "L": rgba[..., 0]}
    rgb = {
        "RGBA": rgba[..., :3],  # PIL drops alpha; it does not composite
        "LA": np.repeat(rgba[..., :1], 3, axis=-1),
        "L": np.repeat(rgba[..., :1], 3, axis=-1),
    }
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 224)  # 224 x 300 is not resized
    mapper = DatasetMapper(cfg, is_train=False)
    model = detector("rev_vit")
    batch = []
    for mode, pixels in files.items():
        path = str(tmp_path / f"{mode}.png")
        Image.fromarray(pixels, mode).save(path)
        mapped = mapper({"file_name": path, "height": 224, "width": 300, "image_id": mode})
        expected = torch.from_numpy(rgb[mode].copy()).permute(2, 0, 1)
        assert torch.equal(mapped["image"], expected), mode
        batch.append(mapped)
    with torch.no_grad():
        results = model.eval()(batch)
    for result in results:
        assert_inside(result["instances"], 224, 300)

    # INPUT.FORMAT "L" keeps one channel, which the detector broadcasts as above.
    gray_cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 224, "INPUT.FORMAT", "L")
    gray = DatasetMapper(gray_cfg, is_train=False)(
        {"file_name": str(tmp_path / "L.png"), "height": 224, "width": 300, "image_id": 0}
    )
    assert gray["image"].shape == (1, 224, 300)
    assert_same_detections(infer(model, gray["image"])[0], infer(model, batch[2]["image"])[0])


# ---------------------------------------------------------------- tiny and odd sizes


@both
def test_image_smaller_than_a_patch_and_a_window_is_padded_by_the_detector(arch):
    model = detector(arch)
    for h, w in ((10, 12), (5, 40)):  # under one 16x16 patch; a 2x4 token grid at most
        (result,) = infer(model, image(h, w))
        assert_inside(result, h, w)
    batch = [
        {"image": image(20, 24).to(torch.uint8), "instances": instances(20, 24, [2, 3, 15, 18])}
    ]
    train_step(model, batch)


@both
@pytest.mark.parametrize("size", [(201, 303), (801, 1203)])
def test_odd_size_gives_detections_inside_the_image(arch, size):
    # Padded to the size divisibility (RevViT's pyramid 64, RevMViT 32). Windows that do not
    # divide the token grid are padded inside attention: at 201 x 303 RevMViT's 16 on 56 x 80
    # tokens (stride 4), at 801 x 1203 RevViT's 8 on 52 x 76 tokens.
    model = detector(arch, "TEST.DETECTIONS_PER_IMAGE", 5)
    seen = {}
    model.backbone.register_forward_hook(lambda m, x, out: seen.update(input=x[0], **out))
    (result,) = infer(model, image(*size))
    assert_inside(result, *size)
    d = model.backbone.size_divisibility
    padded = seen.pop("input").shape[-2:]
    assert padded == tuple(-(-s // d) * d for s in size)
    for name, shape in model.backbone.output_shape().items():
        # p6 is a stride-2 max pool of p5, rounding up where the size divisibility is 32.
        assert seen[name].shape[-2:] == tuple(-(-s // shape.stride) for s in padded), name


@pytest.mark.parametrize("pyramid", ["reversible", "simple"])
def test_square_pad_pads_and_rejects_larger_images(pyramid):
    # Rounded up to 256, the p6 stride.
    model = detector("rev_vit", "MODEL.REV.SQUARE_PAD", 250, "MODEL.REV.PYRAMID", pyramid)
    with torch.no_grad():
        features = model.eval().backbone(torch.randn(1, 3, 128, 192))
    assert features["p2"].shape[-2:] == (64, 64)
    (result,) = infer(model, image(120, 190))
    assert_inside(result, 120, 190)
    # Alone or in a batch, on every Detectron2 version: rev_det's error, not a crop (Detectron2
    # main pads to an advertised square_size before the backbone runs).
    for images in [(image(200, 300),), (image(120, 190), image(200, 300))]:
        with pytest.raises(ValueError, match="does not fit square_pad 250.*MODEL.REV.SQUARE_PAD"):
            infer(model, *images)


# ---------------------------------------------------------------- batches mixing sizes


@both
def test_a_batch_result_depends_on_the_image_and_padded_size_only(arch):
    """No image leaks into another, but padding is not masked (as in ViTDet, Detectron2's MViTv2
    and its ResNet-FPN): global attention and windows reaching into the padding see padded
    tokens, the pyramid's 3x3 convolutions see padded features at the image border, and RevViT's
    absolute position embeddings are resized to the padded grid. So an image's features equal
    those of the image alone padded to the batch's size, and differ from those of the image
    alone with less padding (measured on these models, inside the image: mean change 22%
    (RevViT) and 31% (RevMViT) of p5, under 0.2% of p2). RevViT's MODEL.REV.SQUARE_PAD removes
    the difference (next test). Detectron2 evaluates one image per batch."""
    model = detector(arch).eval()
    small, large = image(120, 100, seed=1), image(200, 249, seed=2)
    d = model.backbone.size_divisibility
    batch = ImageList.from_tensors([small, large], d).tensor
    with torch.no_grad():
        together = model.backbone(batch)
        small_padded_alike = model.backbone(batch[:1])
        other = model.backbone(ImageList.from_tensors([small, image(200, 249, seed=3)], d).tensor)
    for name, feature in together.items():
        torch.testing.assert_close(feature[:1], small_padded_alike[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feature[:1], other[name][:1], rtol=1e-5, atol=1e-5)

    # Detections stay inside their own image, not the batch's padded size.
    results = infer(model, small, large)
    assert_inside(results[0], 120, 100)
    assert_inside(results[1], 200, 249)


def test_square_pad_makes_batch_results_equal_to_single_images():
    model = detector("rev_vit", "MODEL.REV.SQUARE_PAD", 256).eval()
    small, large = image(120, 100, seed=1), image(200, 249, seed=2)
    d = model.backbone.size_divisibility
    with torch.no_grad():
        together = model.backbone(ImageList.from_tensors([small, large], d).tensor)
        alone = model.backbone(ImageList.from_tensors([small], d).tensor)
    for name, feature in together.items():
        torch.testing.assert_close(feature[:1], alone[name], rtol=1e-5, atol=1e-5)
    assert_same_detections(infer(model, small, large)[0], infer(model, small)[0], atol=1e-4)


# ---------------------------------------------------------------- images without annotations


@pytest.fixture
def dataset_with_an_empty_image(tmp_path):
    """Two real image files in a registered dataset: one annotated, one with no annotations."""
    dicts = []
    for i, annotated in enumerate((True, False)):
        path = str(tmp_path / f"{i}.jpg")
        Image.fromarray(image(200, 260, seed=i).permute(1, 2, 0).byte().numpy()).save(path)
        annotations = []
        if annotated:
            polygon = [30.0, 40.0, 150.0, 40.0, 150.0, 160.0, 30.0, 160.0]
            annotations.append(
                dict(
                    bbox=[30.0, 40.0, 120.0, 120.0],
                    bbox_mode=BoxMode.XYWH_ABS,
                    segmentation=[polygon],
                    category_id=2,
                    iscrowd=0,
                )
            )
        dicts.append(
            dict(file_name=path, height=200, width=260, image_id=i, annotations=annotations)
        )
    name = "revdet_test_empty_image"
    DatasetCatalog.register(name, lambda: dicts)
    yield name, dicts
    DatasetCatalog.remove(name)


@both
def test_images_without_annotations_are_filtered_and_otherwise_train(
    arch, dataset_with_an_empty_image
):
    name, dicts = dataset_with_an_empty_image
    cfg = CONFIGS[arch]("INPUT.MIN_SIZE_TRAIN", (160,))
    kept = get_detection_dataset_dicts([name], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    assert [d["image_id"] for d in kept] == [0]  # the configs keep Detectron2's filter on

    # With DATALOADER.FILTER_EMPTY_ANNOTATIONS False an empty image reaches the model.
    mapper = DatasetMapper(cfg, is_train=True)
    np.random.seed(0)  # Detectron2's random flip
    annotated, empty = (mapper(dict(d)) for d in dicts)
    assert len(annotated["instances"]) == 1 and len(empty["instances"]) == 0
    model = detector(arch)
    losses = train_step(model, [annotated, empty])
    assert losses["loss_mask"] > 0
    losses = train_step(model, [empty, empty])  # no foreground at all
    assert losses["loss_mask"] == 0 and losses["loss_box_reg"] == 0 and losses["loss_cls"] > 0


# ---------------------------------------------------------------- configs


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"MODEL.REV.BACKPROP = 'fast'.*'reversible'"):
        detector("rev_mvit", "MODEL.REV.BACKPROP", "fast")
    with pytest.raises(ValueError, match=r"MODEL.REV.PYRAMID = 'simple'.*'reversible' or 'fpn'"):
        detector("rev_mvit", "MODEL.REV.PYRAMID", "simple")
    with pytest.raises(ValueError, match="SQUARE_PAD applies to RevViT.*set MODEL.REV.SQUARE_PAD"):
        detector("rev_mvit", "MODEL.REV.SQUARE_PAD", 256)
    with pytest.raises(ValueError, match=r"window_block_indexes \[-1, 4\].*below depth"):
        detector("rev_vit", "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", [-1, 0, 4])
    with pytest.raises(ValueError, match="ending at depth - 1 = 5"):
        detector("rev_mvit", "MODEL.REVMVIT.LAST_BLOCK_INDEXES", [0, 1, 4, 9])
    with pytest.raises(ValueError, match="window size 3 .* adaptive_window_size a multiple of 8"):
        tiny_rev_mvit(adaptive_window_size=12)  # stage 4 windows of 3, pooled by 2
    # yacs names unknown keys, from the command line and from a file (RevMViT's window key is
    # ADAPTIVE_WINDOW_SIZE).
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.REVMVIT.WINDOW_SIZE"):
        tiny_mvit_cfg("MODEL.REVMVIT.WINDOW_SIZE", 16)
    path = tmp_path / "typo.yaml"
    path.write_text(f'_BASE_: "{DEMO_MVIT}"\nMODEL:\n  REV:\n    BACKPROB: "autograd"\n')
    with pytest.raises(KeyError, match="MODEL.REV.BACKPROB"):
        yacs_cfg(str(path))


def window_outputs_changed(attention, grid, token):
    """Which output positions of a (1, h, w, C) attention change when one input token does."""
    torch.manual_seed(0)
    x = torch.randn(1, *grid, 16)
    y = x.clone()
    y[0, token[0], token[1]] += 1.0
    with torch.no_grad():
        changed = (attention(x) - attention(y)).abs().amax(-1)[0] > 0
    return changed.nonzero().tolist()


def test_windows_that_do_not_divide_the_grid_pad_and_stay_separate():
    # 7 x 10 tokens, windows of 3: padded to 9 x 12. A token influences exactly its own window,
    # also in the partial last row and column of windows.
    block = RevViTBlock(16, 2, window_size=3, use_rel_pos=True).eval()
    changed = window_outputs_changed(block.F, (7, 10), (6, 9))
    assert changed == [[6, 9]]  # the window rows 6-8, columns 9-11 keeps one real token
    changed = window_outputs_changed(block.F, (7, 10), (4, 4))
    assert changed == [[r, c] for r in range(3, 6) for c in range(3, 6)]
    # Pooled keys (stride 2) on 7 x 10 tokens with windows of 4: query windows of 4 and key
    # windows of 2 still cover the same region (kernel 1: the pooling itself mixes nothing).
    attention = PoolingAttention(
        16, 16, 2, pool_kernel=(1, 1), stride_kv=2, window_size=4, use_rel_pos=True
    ).eval()
    changed = window_outputs_changed(attention, (7, 10), (4, 8))  # a key: even row and column
    assert changed == [[r, c] for r in range(4, 7) for c in range(8, 10)]


# ---------------------------------------------------------------- non-finite loss


@both
def test_non_finite_loss_raises_floating_point_error_with_the_iteration(arch):
    model = detector(arch)

    def loss_becomes_infinite(module, inputs, losses):
        # Added, not multiplied: the gradients stay finite, only the loss value is not.
        if get_event_storage().iter == 2:
            losses["loss_cls"] = losses["loss_cls"] + float("inf")
        return losses

    model.register_forward_hook(loss_becomes_infinite)
    batches = iter(lambda: fake_batch(((96, 128),)), None)
    # AdamW, as the configs' SOLVER.OPTIMIZER says (rev_det rejects another optimizer).
    trainer = SimpleTrainer(model, batches, torch.optim.AdamW(model.parameters(), lr=1e-3))
    with pytest.raises(FloatingPointError, match="iteration=2"):
        trainer.train(0, 5)
    total = trainer.storage.history("total_loss").values()
    assert [it for _, it in total] == [0, 1] and all(np.isfinite(v) for v, _ in total)
