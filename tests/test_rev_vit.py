"""RevViT: gradients across backprop modes, flat memory in depth, attention, checkpoints, errors."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from helpers import block_norm_inputs_dense, rel_err, tiny_rev_vit
from torch import nn

from rev_det.benchmark import HAS_VITDET
from rev_det.modeling import rev_vit
from rev_det.modeling.attention import (
    attention_with_rel_pos,
    rel_pos_table,
    window_partition,
    window_unpartition,
)
from rev_det.modeling.rev_vit import Attention, RevViT
from rev_det.utils.memory import MemoryTracker


# With a convolutional stem (batch-normalised, in training mode) before the reversible blocks.
@pytest.mark.parametrize("stem", [{}, {"stem_channels": (4, 8), "stem_norm": "BN"}], ids=str)
def test_gradients_equal_across_backprop_modes_float64(stem):
    model = tiny_rev_vit(**stem).double().train()
    for p in model.parameters():  # zero-initialised tables would make their test vacuous
        nn.init.normal_(p, std=0.05) if p.dim() == 2 and p.shape[0] != 1 else None
    x = torch.randn(2, 3, 80, 112, dtype=torch.float64, requires_grad=True)
    grads = {}
    for mode in ("autograd", "reversible", "checkpoint"):
        model.backprop = mode
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)
        feat = model(x)["last_feat"]
        (
            feat * torch.linspace(-1, 1, feat.shape[1], dtype=feat.dtype)[:, None, None]
        ).sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads[mode]["input"] = x.grad.clone()
    assert grads["autograd"]["blocks.1.attn.rel_pos_h"].abs().max() > 0
    for mode in ("reversible", "checkpoint"):
        assert set(grads[mode]) == set(grads["autograd"])
        for name, ref in grads["autograd"].items():
            assert rel_err(grads[mode][name], ref) <= 1e-10, (mode, name)


def trunk_activation_peak(depth, backprop):
    """Peak bytes of a training step with frozen weights (parameter gradients excluded)."""
    model = RevViT(
        img_size=256,
        embed_dim=64,
        depth=depth,
        num_heads=4,
        use_rel_pos=True,
        window_size=8,
        window_block_indexes=tuple(i for i in range(depth) if i % 4 != 3),
        pretrain_img_size=256,
        backprop=backprop,
    ).train()
    model.requires_grad_(False)
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    with MemoryTracker() as mem:
        model(x)["last_feat"].sum().backward()
    return mem.peak


def test_trunk_activation_memory_is_flat_in_depth():
    rev = trunk_activation_peak(24, "reversible") / trunk_activation_peak(12, "reversible")
    plain = trunk_activation_peak(24, "autograd") / trunk_activation_peak(12, "autograd")
    assert rev <= 1.05, rev
    assert plain >= 1.8, plain


def test_folded_relative_position_bias_equals_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6 * 7, 8, dtype=torch.float64) for _ in range(3))
    rh, rw = torch.randn(11, 8, dtype=torch.float64), torch.randn(13, 8, dtype=torch.float64)
    # Reference: the ViTDet formulation, written out.
    scores = (q * 8**-0.5) @ k.transpose(-1, -2)
    grid = q.reshape(2, 3, 6, 7, 8)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rel_pos_table(6, 6, rh))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid, rel_pos_table(7, 7, rw))
    scores = scores + (bias_h[..., :, None] + bias_w[..., None, :]).reshape(2, 3, 42, 42)
    reference = scores.softmax(-1) @ v
    for fold in (False, True):
        out = attention_with_rel_pos(q, k, v, (6, 7), (6, 7), rh, rw, fold=fold)
        assert rel_err(out, reference) < 1e-12


def test_rel_pos_table_indexes_relative_offsets():
    table = torch.arange(7.0)[:, None]  # entry i encodes offset i - 3
    rel = rel_pos_table(4, 4, table)[..., 0]
    assert torch.equal(rel, torch.arange(4.0)[:, None] - torch.arange(4.0)[None, :] + 3)


def mae_vit_state_dict(model: RevViT):
    """A state dict with MAE ViT key names and shapes (timm's VisionTransformer layout)."""
    sd = {
        "cls_token": torch.randn(1, 1, 32),
        "pos_embed": torch.randn(model.pos_embed.shape),
        "patch_embed.proj.weight": torch.randn(model.patch_embed.proj.weight.shape),
        "patch_embed.proj.bias": torch.randn(32),
        "norm.weight": torch.randn(32),  # MAE's final norm acts on C; RevViT fuses 2C
        "norm.bias": torch.randn(32),
    }
    for name, p in model.blocks.named_parameters():
        if "rel_pos" not in name:  # MAE has no relative position tables
            sd[f"blocks.{name}"] = torch.randn(p.shape)
    return sd


def test_mae_checkpoint_loads_by_detectron2_name_matching(tmp_path):
    model = nn.Module()  # a detector whose backbone.net is the trunk, as in the configs
    model.backbone = nn.Module()
    model.backbone.net = tiny_rev_vit(depth=2)
    net = model.backbone.net
    sd = mae_vit_state_dict(net)
    path = tmp_path / "mae.pth"
    torch.save({"model": sd, "matching_heuristics": True}, path)
    DetectionCheckpointer(model).load(str(path))
    for name, p in net.blocks.named_parameters():
        if "rel_pos" not in name:
            assert torch.equal(p, sd[f"blocks.{name}"]), name
    assert torch.equal(net.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(net.pos_embed, sd["pos_embed"])


def test_conv_stem_keeps_the_token_grid_and_plain_checkpoints():
    plain, stem = tiny_rev_vit(), tiny_rev_vit(stem_channels=(4, 8, 16))
    # The plain embedding has the parameters ViT checkpoints carry, and no others.
    assert [n for n in plain.state_dict() if n.startswith("patch_embed.")] == [
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]
    # Three stride-2 convolutions leave stride 2 to the projection.
    assert stem.patch_embed.proj.kernel_size == (2, 2)
    assert type(stem.patch_embed.stem[1]).__name__ == "FrozenBatchNorm2d"  # the default
    x = torch.randn(2, 3, 64, 96)
    assert stem(x)["last_feat"].shape == plain(x)["last_feat"].shape == (2, 64, 4, 6)
    with pytest.raises(ValueError, match=r"does not divide the patch size 16; use at most 4"):
        tiny_rev_vit(stem_channels=(4, 4, 4, 4, 4))


def test_a_stem_without_training_batch_norm_is_recomputed_with_the_trunk():
    """Its maps are not kept for backward (the gradients stay autograd's); a training batch norm
    keeps it stored (recomputing would update the statistics twice)."""
    from rev_det.utils.memory import MemoryTracker

    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)

    def step(net, mode):
        net.blocks.backprop = mode
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same drop-path masks in both modes
        with MemoryTracker() as mem:
            y = net(x)["last_feat"]
            stored = mem.current
            (y * y).sum().backward()
        return stored, [p.grad.clone() for p in net.parameters() if p.requires_grad]

    stored = {}
    for norm, recomputed in (("FrozenBN", True), ("GN", True), ("BN", False)):
        torch.manual_seed(0)
        net = tiny_rev_vit(stem_channels=(32, 32, 32), stem_norm=norm).double().train()
        assert net.patch_embed.recomputable() == recomputed, norm
        stored[norm], grads = step(net, "reversible")
        _, grads_autograd = step(net, "autograd")
        for a, b in zip(grads, grads_autograd):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), norm
    # The stem's first map alone (32 x 32 x 48 doubles) is 0.56 MiB; the stored stem keeps it.
    assert stored["FrozenBN"] < stored["BN"] - 2**19
    assert stored["GN"] < stored["BN"] - 2**19


@pytest.mark.parametrize("backprop", ["autograd", "reversible"])
def test_tokens_are_dense_channels_last_in_every_block(backprop):
    """The streams inherit the patch embedding's strides through every coupling: channels-first
    strides there would make each block's norms and linear layers copy their inputs."""
    net = tiny_rev_vit(backprop=backprop)
    dense = block_norm_inputs_dense(net, torch.randn(1, 3, 64, 64))
    assert len(dense) >= 2 * len(net.blocks) and all(dense)


def test_bad_inputs_and_arguments_are_named():
    model = tiny_rev_vit().eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*channels"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match=r"window_block_indexes \[4\] are outside the 4 blocks"):
        tiny_rev_vit(window_block_indexes=(0, 4))


def windowed_attention(bias: bool) -> Attention:
    """A float64 window attention whose bias, relative tables and qkv bias are all non-zero
    (a zero qkv bias would make the padding's keys and values zero)."""
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, qkv_bias=bias, use_rel_pos=True, input_size=(4, 4))
    for p in attn.parameters():
        nn.init.normal_(p, std=0.3)
    return attn.double()


def attention_results(attn, x, run):
    """The output of ``run()`` and the gradients of a weighted sum of it."""
    attn.zero_grad(set_to_none=True)
    x.grad = None
    out = run()
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in attn.parameters()]


@pytest.mark.parametrize("bias", [True, False])
def test_window_attention_equals_attention_on_the_zero_padded_windows(bias):
    """ViTDet's window attention: the grid padded with zero tokens to whole windows, attention
    with both projections on each window (the padding as keys and values), merged and cropped.
    RevViT's projects the unpadded grid only; the output and every gradient are the same."""
    attn = windowed_attention(bias)
    x = torch.randn(2, 6, 7, 16, dtype=torch.float64, requires_grad=True)  # 2x2 windows of 4

    def zero_padded_windows():
        windows, padded_hw = window_partition(x, 4)
        assert padded_hw == (8, 8)
        return window_unpartition(attn(windows), 4, padded_hw, (6, 7))

    got = attention_results(attn, x, lambda: attn(x, 4))
    want = attention_results(attn, x, zero_padded_windows)
    assert len(got) == len(want) == 2 + 5 + bias  # out, input grad, parameter grads
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_window_attention_keeps_autocasts_dtype(monkeypatch):
    """Under bf16 autocast the projections of the padded windows compute q, k and v in bf16
    (nn.Linear casts its bias); adding the bias after the padding must not promote them."""
    attn = windowed_attention(True).float()
    dtypes = []

    def recording(q, k, v, *args, **kwargs):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return attention_with_rel_pos(q, k, v, *args, **kwargs)

    monkeypatch.setattr(rev_vit, "attention_with_rel_pos", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(1, 6, 7, 16), 4)
    assert dtypes == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_VITDET, reason="needs Detectron2 main's ViTDet; v0.6 has none")
def test_window_attention_equals_detectron2_vitdet_block_attention():
    """With the same weights, Detectron2 main's ViTDet window attention (``window_partition``,
    its ``Attention``, ``window_unpartition``, as in its ``Block``) gives the same output."""
    from detectron2.modeling.backbone import vit

    attn = windowed_attention(True)
    theirs = vit.Attention(16, num_heads=2, use_rel_pos=True, input_size=(4, 4)).double()
    theirs.load_state_dict(attn.state_dict())
    x = torch.randn(2, 6, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        windows, padded_hw = vit.window_partition(x, 4)
        want = vit.window_unpartition(theirs(windows), 4, padded_hw, (6, 7))
        torch.testing.assert_close(attn(x, 4), want, rtol=1e-10, atol=1e-12)


def test_input_smaller_than_a_window_is_padded_inside_attention():
    model = tiny_rev_vit(window_size=5).eval()  # 2x2 tokens, 5x5 windows
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))["last_feat"]
    assert out.shape == (1, 64, 2, 2) and torch.isfinite(out).all()
