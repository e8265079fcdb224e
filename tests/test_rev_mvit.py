"""RevMViT: output shapes, gradients across backprop modes, memory, checkpoints, errors."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from helpers import block_norm_inputs_dense, rel_err, tiny_rev_mvit
from torch import nn

from rev_det.modeling.attention import attention_with_rel_pos, rel_pos_table
from rev_det.modeling.rev_mvit import (
    REVMVIT_PAPER_OPTIONS,
    REVMVIT_SIZES,
    RevMViT,
    StageTransitionBlock,
)
from rev_det.utils.memory import MemoryTracker

LEVELS = ("scale2", "scale3", "scale4", "scale5")


def test_output_shape_matches_outputs_on_padded_sizes():
    model = tiny_rev_mvit().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 160, 224))
    shapes = model.output_shape()
    assert tuple(out) == tuple(shapes) == LEVELS
    for name, feat in out.items():
        h, w = feat.shape[-2:]
        assert feat.shape[1] == shapes[name].channels, name
        assert 160 / h == 224 / w == shapes[name].stride, name
    assert [shapes[n].channels for n in LEVELS] == [32, 64, 128, 256]  # 2C: both streams
    assert model.size_divisibility == 32


# The paper layout as the official Rev-MViT has it: absolute positions only, global attention.
PAPER = dict(layout="paper", **REVMVIT_PAPER_OPTIONS)


# Seeds for which drop path leaves every parameter a gradient (no branch, and in the paper
# layout no transition output, dropped for both samples) but drops some for one sample.
@pytest.mark.parametrize("layout, seed", [("mvitv2", 2), ("paper", 0)])
def test_gradients_equal_across_backprop_modes_float64(layout, seed):
    model = tiny_rev_mvit(**(PAPER if layout == "paper" else {})).double().train()
    for name, p in model.named_parameters():  # zero-initialised tables would test nothing
        if "rel_pos" in name:
            nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64, requires_grad=True)
    outs, grads = {}, {}
    for mode in ("autograd", "reversible", "checkpoint"):
        model.backprop = mode
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(seed)
        feats = model(x)
        # Channel weights: a plain sum of a LayerNorm output has no gradient.
        loss = sum(
            (f * torch.linspace(-1, 1, f.shape[1], dtype=f.dtype)[:, None, None]).sum()
            for f in feats.values()
        )
        loss.backward()
        outs[mode] = torch.cat([f.flatten() for f in feats.values()]).detach()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads[mode]["input"] = x.grad.clone()
    checked = ["pos_embed"]
    checked += ["blocks.2.fuse.fc1.weight"] if layout == "paper" else ["blocks.3.attn.rel_pos_h"]
    for name in checked:
        assert grads["autograd"][name].abs().max() > 0, name
    # The keys' norm bias shifts all scores of a query equally and softmax cancels it: its
    # gradient is rounding noise, compared against the largest gradient instead.
    scale = max(g.abs().max() for g in grads["autograd"].values())
    zero = {n for n, g in grads["autograd"].items() if g.abs().max() <= 1e-12 * scale}
    assert zero and all(n.endswith("attn.norm_k.bias") for n in zero), sorted(zero)
    for mode in ("reversible", "checkpoint"):
        assert rel_err(outs[mode], outs["autograd"]) <= 1e-12, mode
        assert set(grads[mode]) == set(grads["autograd"])
        for name, ref in grads["autograd"].items():
            if name in zero:
                assert grads[mode][name].abs().max() <= 1e-12 * scale, (mode, name)
            else:
                assert rel_err(grads[mode][name], ref) <= 1e-10, (mode, name)


@pytest.mark.parametrize("backprop", ["autograd", "reversible"])
def test_tokens_are_dense_channels_last_in_every_block(backprop):
    """As in RevViT: the streams inherit the patch embedding's and the transitions' pooling
    strides, and channels-first strides would make each block's norms and linear layers copy
    their inputs."""
    net = tiny_rev_mvit(backprop=backprop)
    dense = block_norm_inputs_dense(net, torch.randn(1, 3, 64, 96))
    assert len(dense) >= 2 * len(net.blocks) and all(dense)


def test_transition_drop_path_drops_branches_not_the_feature_map():
    block = StageTransitionBlock(8, 2, drop_path=1.0, window_size=0).train()
    x = torch.randn(2, 8, 8, 8)
    out = block(x)  # both branches dropped: only the max-pooled skip is left
    assert torch.equal(
        out, nn.functional.max_pool2d(x.permute(0, 3, 1, 2), 3, 2, 1).permute(0, 2, 3, 1)
    )


def test_paper_transition_drops_its_whole_output_as_the_official_block():
    block = StageTransitionBlock(8, 2, drop_path=1.0, layout="paper").train()
    assert not block(torch.randn(2, 8, 8, 8)).any()
    assert block.eval()(torch.randn(2, 8, 8, 8)).abs().sum() > 0


def test_paper_layout_pools_queries_in_transitions_only_and_doubles_no_stride():
    def layout_of(model):
        return [
            (type(b).__name__, b.attn.pool_q is not None, b.attn.pool_k.stride[0])
            for b in model.blocks
        ]

    size = REVMVIT_SIZES["paper_b"]
    paper = layout_of(RevMViT(**{**size, **PAPER}))
    transitions = [i for i, (kind, _, _) in enumerate(paper) if kind == "StageTransitionBlock"]
    assert transitions == [1, 3, 14]  # PySlowFast REV_MVIT_B_16_CONV's BUFFER_LAYERS
    assert [q for _, q, _ in paper] == [i in transitions for i in range(16)]
    assert [s for _, _, s in paper] == [4] + [2] * 2 + [1] * 13
    # The MViTv2 layout of the same blocks pools every query and doubles the key/value
    # stride of the global last blocks of stages 3 and 4 (blocks 2 and 13), as MViTv2 does.
    mvitv2 = layout_of(RevMViT(**{**size, "layout": "mvitv2"}))
    assert all(q for _, q, _ in mvitv2)
    assert [s for _, _, s in mvitv2] == [4, 2, 4] + [1] * 10 + [2, 1, 1]


def test_pooled_key_relative_position_bias_fold_equals_explicit_softmax():
    torch.manual_seed(0)
    (qh, qw), (kh, kw), d = (8, 6), (2, 3), 8  # keys pooled by 4 and 2
    q = torch.randn(2, 3, qh * qw, d, dtype=torch.float64)
    k, v = (torch.randn(2, 3, kh * kw, d, dtype=torch.float64) for _ in range(2))
    rh, rw = torch.randn(31, d, dtype=torch.float64), torch.randn(11, d, dtype=torch.float64)
    scores = (q * d**-0.5) @ k.transpose(-1, -2)
    grid = q.reshape(2, 3, qh, qw, d)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rel_pos_table(qh, kh, rh))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid, rel_pos_table(qw, kw, rw))
    scores = scores + (bias_h[..., :, None] + bias_w[..., None, :]).reshape(scores.shape)
    reference = scores.softmax(-1) @ v
    for fold in (False, True):
        out = attention_with_rel_pos(q, k, v, (qh, qw), (kh, kw), rh, rw, fold=fold)
        assert rel_err(out, reference) < 1e-12


def activation_memory(stage4_blocks, backprop):
    """Bytes kept for backward after forward, and the step's peak (parameter grads excluded)."""
    last = (1, 4, 4 + stage4_blocks, 7 + stage4_blocks)
    torch.manual_seed(0)
    model = RevMViT(
        img_size=128,
        embed_dim=32,
        depth=last[-1] + 1,
        last_block_indexes=last,
        adaptive_window_size=16,
        backprop=backprop,
    ).train()
    model.requires_grad_(False)
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    with MemoryTracker() as mem:
        loss = sum(f.sum() for f in model(x).values())
        stored = mem.current
        loss.backward()
    return stored, mem.peak


def test_reversible_stage_memory_is_flat_in_depth():
    (rev_stored4, rev_peak4), (rev_stored16, rev_peak16) = (
        activation_memory(n, "reversible") for n in (4, 16)
    )
    plain_stored4, _ = activation_memory(4, "autograd")
    plain_stored16, _ = activation_memory(16, "autograd")
    assert rev_stored16 <= 1.05 * rev_stored4, rev_stored16 / rev_stored4
    assert rev_peak16 <= 1.05 * rev_peak4, rev_peak16 / rev_peak4
    assert plain_stored16 >= 1.3 * plain_stored4, plain_stored16 / plain_stored4


def training_peak(backprop):
    torch.manual_seed(0)
    model = RevMViT(**REVMVIT_SIZES["B"], backprop=backprop).train()
    model.requires_grad_(False)
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    with MemoryTracker() as mem:
        sum(f.sum() for f in model(x).values()).backward()
    return mem.peak


def test_rev_mvit_b_uses_a_third_of_the_activation_memory():
    # Measured: 0.30 (98 MiB vs 330 MiB); the stored stage transitions hold most of the rest.
    ratio = training_peak("reversible") / training_peak("autograd")
    assert ratio <= 1 / 3, ratio


def test_mvitv2_checkpoint_loads_by_detectron2_name_matching(tmp_path):
    model = nn.Module()  # a detector whose FPN bottom-up is the trunk, as Detectron2's MViTv2
    model.backbone = nn.Module()
    model.backbone.bottom_up = tiny_rev_mvit(use_abs_pos=False)
    net = model.backbone.bottom_up
    sd = {f"blocks.{n}": torch.randn(p.shape) for n, p in net.blocks.named_parameters()}
    for name in ("weight", "bias"):
        sd[f"patch_embed.proj.{name}"] = torch.randn(getattr(net.patch_embed.proj, name).shape)
    path = tmp_path / "mvitv2.pth"
    torch.save({"model": sd, "matching_heuristics": True}, path)
    DetectionCheckpointer(model).load(str(path))
    for name, p in net.blocks.named_parameters():
        assert torch.equal(p, sd[f"blocks.{name}"]), name
    assert torch.equal(net.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


def test_bad_inputs_and_arguments_are_named():
    model = tiny_rev_mvit().eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*channels"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="multiples of 32.*size_divisibility"):
        model(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="four increasing block indexes ending at depth - 1 = 7"):
        tiny_rev_mvit(last_block_indexes=(1, 3, 5, 6))
    with pytest.raises(ValueError, match="window size 6 is not divisible"):
        tiny_rev_mvit(adaptive_window_size=6)
    with pytest.raises(ValueError, match="backprop = 'fast' is not valid"):
        model.backprop = "fast"
    with pytest.raises(ValueError, match="unknown out_features"):
        tiny_rev_mvit(out_features=("scale6",))
    with pytest.raises(ValueError, match=r"layout 'v1' is not valid.*'mvitv2', 'paper'"):
        tiny_rev_mvit(layout="v1")
