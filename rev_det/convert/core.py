"""Convert published ImageNet checkpoints into rev_det trunk weights.

One function per source layout. Each takes the source state dict and the target trunk (a
:class:`~rev_det.modeling.RevViT` or :class:`~rev_det.modeling.RevMViT`; it may live on the
"meta" device, only its parameter names and shapes are read) and returns a :class:`Conversion`:
the trunk's state dict as far as the source fills it, and an account of every key: matched,
missing (target parameters the source has no weights for; they keep rev_det's initialisation),
dropped (source weights that carry function but have no place in the target) and ignored
(source weights outside a detection trunk: classifier heads, class tokens, decoders). Missing
and dropped keys come in named *groups* (:data:`PARTIAL_GROUPS`); a conversion with any of them
is an initialisation of the rev_det model, not the source model. Shape mismatches raise
:class:`ConversionError`.

Source layouts (key names and shapes from each project's published model definition; ``i`` is
the block index, C the block width, d the head width, 2C the two streams concatenated):

``pyslowfast-revvit`` / ``pyslowfast-revmvit``: the paper's official Rev-ViT and Rev-MViT
(PySlowFast ``slowfast/models/reversible_mvit.py``, built by the ``MViT`` class of
``video_model_builder.py`` with ``MVIT.REV.ENABLE``; ``.pyth`` files with ``model_state``):
    ``patch_embed.proj`` (Conv2d, or Conv3d (C, 3, t, k, k) in video models), ``pos_embed``
    (1, HW, C) without a class entry (Rev models forbid the class token), or in video models
    ``pos_embed_spatial`` (1, HW, C) and ``pos_embed_temporal`` (1, T, C);
    ``rev_backbone.layers.{i}.F.norm`` (F = LayerNorm + attention), ``.F.attn.q/k/v`` (separate
    with SEPARATE_QKV, the released configs) or ``.F.attn.qkv``, ``.F.attn.proj``,
    ``.F.attn.pool_{q,k,v}`` (Conv3d (d, 1, t, k, k), depthwise, shared by the heads) and
    ``.F.attn.norm_{q,k,v}`` (only where pooled: Rev-MViT pools q in transitions only),
    ``.G.norm``, ``.G.mlp.fc1/fc2`` (G = LayerNorm + MLP); forward ``Y1 = X1 + F(X2)``,
    ``Y2 = X2 + G(Y1)`` as in rev_det. Stage-transition layers (``MVIT.REV.BUFFER_LAYERS``)
    take the 2C concatenated streams (``PRE_Q_FUSION`` "concat*") and, for "concat_linear*",
    first apply ``pre_q_fuse.fuse_fn`` (an MLP with a residual); their attention maps 2C to the
    new width (no skip projection) and pools the skip path with its own ``pool_q``.
    ``norm`` is a LayerNorm over the 2C concatenation of the final streams; ``head.projection``
    the classifier.
``mmpretrain-revvit``: mmpretrain's ``RevVisionTransformer`` (``backbone.`` prefix in its
``state_dict``): ``patch_embed.projection``, ``cls_token`` (unused), ``pos_embed``
    (1, 1 + HW, C; the class entry is dropped in its forward), ``layers.{i}.ln1``,
    ``.attn.qkv``, ``.attn.proj``, ``.ln2``, ``.ffn.layers.0.0`` (fc1), ``.ffn.layers.1`` (fc2),
    the same coupling as PySlowFast, and ``ln1`` over the 2C concatenation.
``vit``: plain ViT in timm's layout (MAE, DeiT, timm; ``model`` or raw state dict):
    ``cls_token``, ``pos_embed`` (1, prefix tokens + HW, C), ``patch_embed.proj``,
    ``blocks.{i}.norm1``, ``.attn.qkv`` (fused), ``.attn.proj``, ``.norm2``, ``.mlp.fc1/fc2``,
    optional layer scale ``.ls1.gamma`` / ``.ls2.gamma`` (folded into ``attn.proj`` and
    ``mlp.fc2``), ``norm`` / ``fc_norm`` and ``head``. A ViT block ``x + A(x)``,
    ``x + M(x)`` gives its attention branch A to F and its MLP branch M to G: the reversible
    model is a different function (an initialisation, as in Re2TAL / Dr2Net).
``mvitv2``: MViTv2 in facebookresearch/mvit's layout, which Detectron2's ``MViT`` shares
    (``.pyth`` ImageNet files with ``model_state``): ``patch_embed.proj`` (Conv2d),
    ``cls_token`` and ``pos_embed`` if enabled (off in the released models),
    ``blocks.{i}.norm1``, ``.attn.qkv``, ``.attn.proj``, ``.attn.pool_{q,k,v}`` (Conv2d
    (d, 1, 3, 3)), ``.attn.norm_{q,k,v}``, ``.attn.rel_pos_h/w``, ``.norm2``, ``.mlp.fc1/fc2``,
    and in the first block of each stage (channel doubling in attention) ``.proj`` (the skip
    projection, C to 2C); ``norm`` and ``head.projection``. Stage-preserving blocks have rev_det's
    names and shapes; rev_det's transitions take the 2C concatenated streams, so their ``norm1``
    and ``attn.qkv`` cannot come from MViTv2 (group "transition").
"""

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.attention import resize_abs_pos
from ..modeling.rev_mvit import RevMViT, StageTransitionBlock
from ..modeling.rev_vit import RevViT

__all__ = [
    "SOURCES",
    "PARTIAL_GROUPS",
    "Conversion",
    "ConversionError",
    "convert_pyslowfast_revvit",
    "convert_pyslowfast_revmvit",
    "convert_mmpretrain_revvit",
    "convert_vit",
    "convert_mvitv2",
    "convert_checkpoint",
    "extract_state_dict",
    "load_checkpoint_file",
    "build_target_trunk",
    "save_detectron2_checkpoint",
]

logger = logging.getLogger(__name__)

# Why a conversion is partial. Each missing target key and each dropped source key has one.
PARTIAL_GROUPS = {
    "rel_pos": "relative position tables on one side only (rev_det starts missing ones at zero, "
    "which adds no bias; ViTDet does the same with MAE weights)",
    "abs_pos": "absolute position embedding on one side only",
    "fusion_norm": "RevViT's LayerNorm over the two concatenated streams (a plain ViT has none)",
    "stage_norms": "RevMViT's output LayerNorms over the concatenated streams (scale2_norm .. "
    "scale5_norm) the source has no counterpart for",
    "transition": "stage-transition inputs: rev_det's transition blocks take the 2C concatenated "
    "streams (norm1, attn.qkv), the source's take C channels",
    "q_pool": "query pooling (attn.pool_q, attn.norm_q) of stage-preserving blocks, which the "
    "source's blocks do not have",
    "fusion_mlp": "PySlowFast's MLP fusing the streams before each stage transition "
    "(MVIT.REV.PRE_Q_FUSION concat_linear*); rev_det fuses them by plain concatenation",
    "skip_proj": "the skip-path projection of transition blocks (MViTv2 blocks.N.proj, "
    "PySlowFast res_proj); rev_det's transition skip needs none",
    "stem_norm": "a LayerNorm after the patch embedding, which rev_det does not have",
    "temporal": "video-only temporal position tables",
    "other": "parameters on one side only: check that the config matches the checkpoint "
    "(e.g. QKV_BIAS, OUT_FEATURES)",
    "unrecognised": "source keys this converter does not know: is --source right?",
}

# A ViT block's parameters besides its input norm and qkv projection (which stage transitions
# may not share with rev_det), and all of them.
_BRANCH_KEYS = tuple(
    f"{m}.{p}" for m in ("attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")
)
_VIT_BLOCK_KEYS = tuple(f"{m}.{p}" for m in ("norm1", "attn.qkv") for p in ("weight", "bias"))
_VIT_BLOCK_KEYS += _BRANCH_KEYS
_POOL_KEYS = tuple(
    key
    for x in "qkv"
    for key in (f"attn.pool_{x}.weight", f"attn.norm_{x}.weight", f"attn.norm_{x}.bias")
)


class ConversionError(ValueError):
    """The checkpoint does not fit the target (wrong layout, size or shapes)."""


@dataclass
class Conversion:
    """The result of converting one checkpoint for one target trunk.

    Attributes:
        source: the source layout name (one of :data:`SOURCES`).
        target: the target trunk's class name.
        state_dict: trunk-relative keys (as in the trunk's own ``state_dict``) to tensors; only
            the keys the source fills.
        matched: target key -> the source key(s) it came from.
        missing: target key -> partial group, for trunk parameters the source does not fill.
        dropped: source key -> partial group, for source weights the target has no place for.
        ignored: source key -> reason, for source weights outside a detection trunk.
        notes: what was transformed on the way (resizing, folding, squeezing).
    """

    source: str
    target: str
    state_dict: Dict[str, torch.Tensor]
    matched: Dict[str, str]
    missing: Dict[str, str]
    dropped: Dict[str, str]
    ignored: Dict[str, str]
    notes: List[str] = field(default_factory=list)

    @property
    def partial_groups(self) -> List[str]:
        """The groups that make this conversion partial (empty: the trunk is fully covered)."""
        return sorted(set(self.missing.values()) | set(self.dropped.values()))

    def blocking_groups(self, allow: Iterable[str] = ()) -> List[str]:
        """The partial groups not in ``allow`` ("all" allows every group)."""
        allow = set(allow)
        return [] if "all" in allow else [g for g in self.partial_groups if g not in allow]

    def format_report(self, verbose: bool = False) -> str:
        """A human-readable account of every key (compressed over block indexes unless
        ``verbose``)."""
        total = len(self.matched) + len(self.missing)
        lines = [
            f"source {self.source} -> {self.target}",
            f"  matched: {len(self.matched)} of {total} trunk tensors",
        ]
        if verbose:
            lines += [f"      {t} <- {s}" for t, s in self.matched.items()]
        for title, keys in (
            ("missing (left at rev_det's initialisation)", self.missing),
            ("dropped (source weights the target has no place for)", self.dropped),
        ):
            lines.append(f"  {title}: {len(keys)}")
            for group in sorted(set(keys.values())):
                members = [k for k, g in keys.items() if g == group]
                lines.append(f"    [{group}] {PARTIAL_GROUPS[group]}")
                lines += [f"        {k}" for k in _summarise(members, verbose)]
        lines.append(f"  ignored (outside the detection trunk): {len(self.ignored)}")
        for reason in sorted(set(self.ignored.values())):
            members = [k for k, r in self.ignored.items() if r == reason]
            lines.append(f"    {reason}: {', '.join(_summarise(members, verbose))}")
        if self.notes:
            lines.append("  notes:")
            lines += [f"    - {note}" for note in self.notes]
        return "\n".join(lines)


def _summarise(keys: Sequence[str], verbose: bool = False) -> List[str]:
    """Keys with their first index collapsed: ``blocks.{0-11}.attn.rel_pos_h``."""
    if verbose:
        return list(keys)
    patterns: Dict[str, List[int]] = {}
    for key in keys:
        match = re.search(r"(?:^|\.)(\d+)\.", key)
        if match is None:
            patterns.setdefault(key, [])
            continue
        start, end = match.span(1)
        patterns.setdefault(key[:start] + "{}" + key[end:], []).append(int(match[1]))
    out = []
    for pattern, indexes in patterns.items():
        if not indexes:
            out.append(pattern)
            continue
        runs = []
        for i in sorted(set(indexes)):
            if runs and i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
        out.append(pattern.replace("{}", "{" + text + "}"))
    return out


class _Mapping:
    """What a converter proposes: target key -> (tensor, source keys), and the source keys it
    drops or ignores, then :meth:`finish` checks it all against the target."""

    def __init__(self, source: str, state_dict: Mapping[str, torch.Tensor]):
        self.source = source
        self.sd = state_dict
        self.proposed: Dict[str, Tuple[torch.Tensor, Tuple[str, ...]]] = {}
        self.dropped: Dict[str, str] = {}
        self.ignored: Dict[str, str] = {}
        self.notes: List[str] = []
        self.summed: List[str] = []  # source kernels whose temporal taps were summed

    def conv2d(self, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """A transform of ``key``'s weight from a video-capable (O, I, t, kh, kw) kernel (a
        PySlowFast Conv3d) to a 2D one; 2D kernels pass through."""

        def fn(weight: torch.Tensor) -> torch.Tensor:
            if weight.dim() != 5:
                return weight
            if weight.shape[2] == 1:
                return weight[:, :, 0]
            # On a static clip (an image repeated in time) the temporal taps add up.
            self.summed.append(key)
            return weight.sum(2)

        return fn

    def copy(self, target_key: str, source_key: str, fn: Optional[Callable] = None):
        """Propose ``sd[source_key]`` (through ``fn``) for ``target_key`` if the source has it."""
        if source_key in self.sd:
            value = self.sd[source_key]
            self.proposed[target_key] = (fn(value) if fn else value, (source_key,))

    def put(self, target_key: str, value: torch.Tensor, source_keys: Sequence[str]):
        self.proposed[target_key] = (value, tuple(source_keys))

    def drop(self, pattern: str, group: str):
        """Mark the source keys matching the regular expression as dropped in ``group``."""
        for key in self.sd:
            if re.fullmatch(pattern, key):
                self.dropped[key] = group

    def ignore(self, pattern: str, reason: str):
        """Mark the source keys matching the regular expression as outside the trunk."""
        for key in self.sd:
            if re.fullmatch(pattern, key):
                self.ignored[key] = reason

    def finish(self, target: nn.Module) -> Conversion:
        shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        transitions = _transition_indexes(target)
        state, matched, missing, errors = {}, {}, {}, []
        proposed = dict(self.proposed)
        resized_rel_pos = []
        for key, shape in shapes.items():
            if key not in proposed:
                missing[key] = _missing_group(key, transitions)
                continue
            value, origin = proposed.pop(key)
            if key == "pos_embed":
                value = self._fit_pos_embed(value, shape, target.pretrain_use_cls_token)
            elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.shape[1:] == shape[1:]:
                if value.shape[0] != shape[0]:
                    resized_rel_pos.append(f"{value.shape[0]} -> {shape[0]}")
                    value = _resize_rel_pos(value, shape[0])
            if tuple(value.shape) != shape:
                errors.append(
                    f"  {key}: target shape {shape}, from source {' + '.join(origin)}: "
                    f"{tuple(value.shape)}"
                )
                continue
            state[key] = value.detach().clone().contiguous()
            matched[key] = " + ".join(origin)
        if errors:
            raise ConversionError(
                f"{len(errors)} tensors of the {self.source} checkpoint do not fit the "
                f"{type(target).__name__} of this config:\n"
                + "\n".join(errors[:20])
                + ("\n  ..." if len(errors) > 20 else "")
                + "\nCheck that the config's size (EMBED_DIM, NUM_HEADS, MLP_RATIO, patch size) "
                "is the checkpoint's."
            )
        if self.summed:
            self.notes.append(
                "temporal taps of video kernels summed (the response to a static clip): "
                + ", ".join(_summarise(self.summed))
            )
        if resized_rel_pos:
            self.notes.append(
                f"{len(resized_rel_pos)} relative position tables resized linearly to the "
                f"target's lengths ({', '.join(sorted(set(resized_rel_pos)))})"
            )
        for key, (_, origin) in proposed.items():  # the target has no such parameter
            for source_key in origin:
                self.dropped[source_key] = _extra_group(key)
        used = {k for _, origin in self.proposed.values() for k in origin}
        for key in self.sd:
            if key not in used and key not in self.dropped and key not in self.ignored:
                self.dropped[key] = "unrecognised"
        logger.info(
            "%s -> %s: %d tensors matched, %d missing, %d dropped, %d ignored.",
            self.source,
            type(target).__name__,
            len(matched),
            len(missing),
            len(self.dropped),
            len(self.ignored),
        )
        return Conversion(
            source=self.source,
            target=type(target).__name__,
            state_dict=state,
            matched=matched,
            missing=missing,
            dropped=self.dropped,
            ignored=self.ignored,
            notes=self.notes,
        )

    def _fit_pos_embed(self, grid: torch.Tensor, shape: Tuple[int, ...], has_cls: bool):
        """A (1, S*S, C) grid as the target's (1, [1 +] T*T, C) parameter."""
        side = math.isqrt(shape[1] - int(has_cls))
        source_side = math.isqrt(grid.shape[1])
        if grid.shape[-1] != shape[-1]:
            return grid  # the shape check reports it
        if source_side != side:
            self.notes.append(
                f"pos_embed resized (bicubic) from the source's {source_side}x{source_side} "
                f"grid to the target's {side}x{side} pre-training grid"
            )
        # Interpolate in float32: half-precision bicubic is not implemented on every device.
        grid = resize_abs_pos(grid.float(), False, (side, side)).to(grid.dtype)
        grid = grid.reshape(1, side * side, -1)
        if has_cls:
            self.notes.append(
                "pos_embed: a zero entry stands in for the class-token position the target's "
                "parameter reserves (PRETRAIN_USE_CLS_TOKEN); the trunk never uses it"
            )
            grid = torch.cat([grid.new_zeros(1, 1, grid.shape[-1]), grid], dim=1)
        return grid


def _transition_indexes(target: nn.Module) -> List[int]:
    return [i for i, b in enumerate(target.blocks) if isinstance(b, StageTransitionBlock)]


def _missing_group(key: str, transitions: Sequence[int]) -> str:
    if key == "pos_embed":
        return "abs_pos"
    if key.endswith(("rel_pos_h", "rel_pos_w")):
        return "rel_pos"
    if key.startswith("norm."):
        return "fusion_norm"
    if re.match(r"scale\d_norm\.", key):
        return "stage_norms"
    match = re.match(r"blocks\.(\d+)\.(.*)", key)
    if match:
        index, rest = int(match[1]), match[2]
        if index in transitions and rest.startswith(("norm1.", "attn.qkv.")):
            return "transition"
        if index not in transitions and rest.startswith(("attn.pool_q.", "attn.norm_q.")):
            return "q_pool"
    return "other"


def _extra_group(target_key: str) -> str:
    """The group of a proposal for a parameter the target does not have."""
    if target_key == "pos_embed":
        return "abs_pos"
    if target_key.endswith(("rel_pos_h", "rel_pos_w")):
        return "rel_pos"
    if re.match(r"scale\d_norm\.", target_key):
        return "stage_norms"
    return "other"


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation along the table, as MViTv2 and ViTDet do at run time."""
    resized = F.interpolate(table.t()[None].float(), size=length, mode="linear")
    return resized[0].t().to(table.dtype)


def _pos_grid(pos_embed: torch.Tensor) -> torch.Tensor:
    """(1, prefix + S*S, C) -> (1, S*S, C): drop leading class/distillation/register entries."""
    side = math.isqrt(pos_embed.shape[1])
    extra = pos_embed.shape[1] - side * side
    if extra > 8:
        raise ConversionError(
            f"pos_embed of {pos_embed.shape[1]} positions is not a square grid plus a few "
            "prefix tokens; rev_det needs a square pre-training grid."
        )
    return pos_embed[:, extra:]


def _block_indexes(sd: Mapping[str, torch.Tensor], prefix: str) -> List[int]:
    """Sorted block indexes ``i`` of the keys ``{prefix}{i}.*``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m[1]) for m in map(pattern.match, sd) if m})


def _width(sd: Mapping[str, torch.Tensor], key: str, source: str) -> int:
    if key not in sd:
        raise ConversionError(f"the checkpoint has no {key}, which the {source} layout has.")
    return sd[key].shape[0]


def _check_target(target: nn.Module, kind: type, source: str):
    if not isinstance(target, kind):
        raise ConversionError(
            f"--source {source} converts into a {kind.__name__}, but the config builds a "
            f"{type(target).__name__}; use a {kind.__name__} config (MODEL.BACKBONE.NAME "
            f"build_{'rev_vit' if kind is RevViT else 'rev_mvit'}_backbone)."
        )


def _check_depth(source: str, indexes: List[int], prefix: str, target: nn.Module):
    depth = len(target.blocks)
    if not indexes:
        raise ConversionError(
            f"the checkpoint has no {prefix}N.* keys, which the {source} layout names its "
            "blocks; is --source right?"
        )
    if indexes != list(range(depth)):
        raise ConversionError(
            f"the {source} checkpoint has {len(indexes)} blocks ({prefix}0..), the config's "
            f"{type(target).__name__} has {depth}; set the config's DEPTH to "
            f"{len(indexes)} (and the size options to the checkpoint's)."
        )


def _check_transitions(source: str, found: List[int], target: nn.Module):
    expected = _transition_indexes(target)
    if found != expected:
        depth = len(target.blocks)
        last = [t - 1 for t in found] + [depth - 1]
        raise ConversionError(
            f"the {source} checkpoint changes width (stage transitions) at blocks {found}, the "
            f"config's RevMViT at {expected}; set MODEL.REVMVIT.LAST_BLOCK_INDEXES to {last}."
        )


def _qkv(m: _Mapping, target_prefix: str, source_prefix: str):
    """Fused ``qkv`` from a fused ``qkv`` or from separate ``q``, ``k``, ``v`` projections
    (their rows are the q, k and v blocks of a fused projection, in that order)."""
    for p in ("weight", "bias"):
        parts = [f"{source_prefix}{x}.{p}" for x in "qkv"]
        if all(k in m.sd for k in parts):
            m.put(f"{target_prefix}qkv.{p}", torch.cat([m.sd[k] for k in parts], 0), parts)
        else:
            m.copy(f"{target_prefix}qkv.{p}", f"{source_prefix}qkv.{p}")


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def _pyslowfast(sd: Mapping[str, torch.Tensor], target: nn.Module, source: str) -> Conversion:
    """PySlowFast's reversible MViT layout (Rev-ViT is the case without pooling) into a RevViT
    or RevMViT."""
    sd = _strip(sd, "module.")
    m = _Mapping(source, sd)
    layer = "rev_backbone.layers."
    indexes = _block_indexes(sd, layer)
    _check_depth(source, indexes, layer, target)
    width_f = [_width(sd, f"{layer}{i}.F.norm.weight", source) for i in indexes]
    width_g = [_width(sd, f"{layer}{i}.G.norm.weight", source) for i in indexes]
    found = [i for i in indexes[1:] if width_f[i] != width_g[i - 1] or width_g[i] != width_f[i]]
    if isinstance(target, RevMViT):
        _check_transitions(source, found, target)
    elif found:
        raise ConversionError(
            f"the checkpoint changes width at blocks {found}: it is a Rev-MViT; use --source "
            "pyslowfast-revmvit with a RevMViT config."
        )
    transitions = _transition_indexes(target)
    m.copy("patch_embed.proj.weight", "patch_embed.proj.weight", m.conv2d("patch_embed.proj"))
    m.copy("patch_embed.proj.bias", "patch_embed.proj.bias")
    if "pos_embed" in sd:
        m.put("pos_embed", _pos_grid(sd["pos_embed"]), ["pos_embed"])
    elif "pos_embed_spatial" in sd:
        spatial, temporal = sd["pos_embed_spatial"], sd.get("pos_embed_temporal")
        keys = ["pos_embed_spatial"]
        if temporal is not None:
            # An image is one time step; the mean over the clip's steps is the closest fit.
            spatial = spatial + temporal.mean(1, keepdim=True)
            keys.append("pos_embed_temporal")
            m.notes.append(
                f"pos_embed = pos_embed_spatial + the mean of pos_embed_temporal's "
                f"{temporal.shape[1]} steps (a video model used on images)"
            )
        m.put("pos_embed", spatial, keys)
    m.ignore(r"pos_embed_class|cls_token", "class token (rev_det has none)")
    for i in indexes:
        s, t = f"{layer}{i}.", f"blocks.{i}."
        if i in transitions and width_f[i] == width_g[i - 1]:
            # Non-concatenating fusion (PRE_Q_FUSION avg/add/...): C-wide transition inputs.
            m.drop(re.escape(s) + r"F\.(norm|attn\.(q|k|v|qkv))\..*", "transition")
        else:
            for p in ("weight", "bias"):
                m.copy(f"{t}norm1.{p}", f"{s}F.norm.{p}")
            _qkv(m, f"{t}attn.", f"{s}F.attn.")
        for p in ("weight", "bias"):
            m.copy(f"{t}attn.proj.{p}", f"{s}F.attn.proj.{p}")
            m.copy(f"{t}norm2.{p}", f"{s}G.norm.{p}")
            m.copy(f"{t}mlp.fc1.{p}", f"{s}G.mlp.fc1.{p}")
            m.copy(f"{t}mlp.fc2.{p}", f"{s}G.mlp.fc2.{p}")
        for key in _POOL_KEYS:
            m.copy(t + key, s + "F." + key, m.conv2d(s + "F." + key))
        for axis in "hw":
            m.copy(f"{t}attn.rel_pos_{axis}", f"{s}F.attn.rel_pos_{axis}")
        table = sd.get(f"{s}F.attn.rel_pos_t")
        if table is not None and table.shape[0] == 1:
            # One time step: a constant per query, which softmax cancels.
            m.ignore(re.escape(f"{s}F.attn.rel_pos_t"), "temporal position table of length 1")
        elif table is not None:
            m.drop(re.escape(f"{s}F.attn.rel_pos_t"), "temporal")
        m.drop(re.escape(s) + r"pre_q_fuse\..*", "fusion_mlp")
        m.drop(re.escape(s) + r"res_proj\..*", "skip_proj")
    final = "norm" if isinstance(target, RevViT) else "scale5_norm"
    for p in ("weight", "bias"):
        m.copy(f"{final}.{p}", f"norm.{p}")
    m.drop(r"fuse\..*", "fusion_mlp")
    m.drop(r"norm_stem\..*", "stem_norm")
    m.ignore(r"head\..*", "classifier head")
    if isinstance(target, RevMViT):
        m.notes.append(
            "PySlowFast pools a transition's skip path with its attention's query pooling "
            "(RES_PATH conv); rev_det uses a 3x3 stride-2 max pooling (no weights)"
        )
    return m.finish(target)


def convert_pyslowfast_revvit(sd: Mapping[str, torch.Tensor], target: RevViT) -> Conversion:
    """PySlowFast's official Rev-ViT (``REV_VIT_S/B.pyth``) into a :class:`RevViT`.

    Every trunk parameter has a counterpart, and F, G and the final 2C LayerNorm have the same
    semantics: with global attention and no relative position tables, the converted RevViT's
    ``last_feat`` is the official model's final normalised token map.
    """
    _check_target(target, RevViT, "pyslowfast-revvit")
    return _pyslowfast(sd, target, "pyslowfast-revvit")


def convert_pyslowfast_revmvit(sd: Mapping[str, torch.Tensor], target: RevMViT) -> Conversion:
    """PySlowFast's official Rev-MViT (``REV_MVIT_B.pyth``, 16 blocks: a RevMViT with
    ``DEPTH 16``, ``LAST_BLOCK_INDEXES [0, 2, 13, 15]``, absolute position embedding, no
    relative position tables, no residual pooling) into a :class:`RevMViT`.

    Exact: patch embedding, position embedding, every G, every transition's attention (its
    input is the 2C concatenation in both), the final LayerNorm (``scale5_norm``). Partial:
    the official transitions' fusion MLP ("fusion_mlp": rev_det concatenates), query pooling
    of stage-preserving blocks ("q_pool": rev_det pools queries in every block, the official
    model only in transitions) and the ``scale2``-``scale4`` output norms ("stage_norms").
    """
    _check_target(target, RevMViT, "pyslowfast-revmvit")
    return _pyslowfast(sd, target, "pyslowfast-revmvit")


def convert_mmpretrain_revvit(sd: Mapping[str, torch.Tensor], target: RevViT) -> Conversion:
    """mmpretrain's ``RevVisionTransformer`` into a :class:`RevViT` (every trunk parameter has a
    counterpart with the same semantics)."""
    source = "mmpretrain-revvit"
    _check_target(target, RevViT, source)
    sd = _strip(sd, "module.")
    m = _Mapping(source, sd)
    # A classifier's checkpoint nests the backbone under "backbone."; keys keep their file names.
    prefix = "backbone." if any(k.startswith("backbone.") for k in sd) else ""
    if prefix:
        m.ignore(r"(head|neck|data_preprocessor)\..*", "classifier head")
    inner = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    indexes = _block_indexes(inner, "layers.")
    _check_depth(source, indexes, prefix + "layers.", target)

    def copy(target_key: str, key: str, fn=None):
        m.copy(target_key, prefix + key, fn)

    copy("patch_embed.proj.weight", "patch_embed.projection.weight")
    copy("patch_embed.proj.bias", "patch_embed.projection.bias")
    if "pos_embed" in inner:
        m.put("pos_embed", _pos_grid(inner["pos_embed"]), [prefix + "pos_embed"])
    m.ignore(re.escape(prefix) + "cls_token", "class token (unused by RevVisionTransformer)")
    names = {"ln1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "ln2": "norm2"}
    names.update({"ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"})
    for i in indexes:
        for src, dst in names.items():
            for p in ("weight", "bias"):
                copy(f"blocks.{i}.{dst}.{p}", f"layers.{i}.{src}.{p}")
    for p in ("weight", "bias"):
        copy(f"norm.{p}", f"ln1.{p}")
    m.drop(re.escape(prefix) + r"patch_embed\.norm\..*", "stem_norm")
    return m.finish(target)


def convert_vit(sd: Mapping[str, torch.Tensor], target: RevViT) -> Conversion:
    """A plain ViT in timm's layout (MAE, DeiT, timm) into a :class:`RevViT`, as an
    initialisation: block ``i``'s attention branch becomes ``F`` and its MLP branch ``G``
    (layer scale folded into their output projections); the 2C fusion LayerNorm has no
    counterpart ("fusion_norm")."""
    source = "vit"
    _check_target(target, RevViT, source)
    sd = _strip(sd, "module.")
    m = _Mapping(source, sd)
    indexes = _block_indexes(sd, "blocks.")
    _check_depth(source, indexes, "blocks.", target)
    m.copy("patch_embed.proj.weight", "patch_embed.proj.weight")
    m.copy("patch_embed.proj.bias", "patch_embed.proj.bias")
    if "pos_embed" in sd:
        m.put("pos_embed", _pos_grid(sd["pos_embed"]), ["pos_embed"])
    folded = 0
    for i in indexes:
        t = f"blocks.{i}."
        for key in _VIT_BLOCK_KEYS:
            m.copy(t + key, t + key)
        for scale, out in (("ls1.gamma", "attn.proj"), ("ls2.gamma", "mlp.fc2")):
            if t + scale not in sd:
                continue
            # x + gamma * (W h + b) == x + (gamma W) h + gamma b: exact.
            gamma = sd[t + scale]
            for p in ("weight", "bias"):
                key = f"{t}{out}.{p}"
                if key in sd:
                    value = sd[key] * (gamma[:, None] if p == "weight" else gamma)
                    m.put(key, value, [key, t + scale])
            folded += 1
    if folded:
        m.notes.append(f"layer scale folded into attn.proj / mlp.fc2 ({folded} branches)")
    m.ignore(r"(cls_token|dist_token|reg_token)", "class / distillation / register token")
    m.ignore(r"(norm|fc_norm|head|head_dist|pre_logits|attn_pool)\..*", "classifier and its norm")
    m.ignore(r"mask_token|decoder_.*", "MAE decoder")
    m.drop(r"norm_pre\..*", "stem_norm")
    m.notes.append(
        "a ViT block is not a reversible block: F and G receive its attention and MLP "
        "branches, so the converted trunk is an initialisation, not the ViT"
    )
    return m.finish(target)


def convert_mvitv2(sd: Mapping[str, torch.Tensor], target: RevMViT) -> Conversion:
    """MViTv2 (facebookresearch/mvit, Detectron2's ImageNet ``.pyth`` files) into a
    :class:`RevMViT`, as an initialisation: stage-preserving blocks copy over with the same
    semantics (``F`` = norm1 + attention, ``G`` = norm2 + MLP); transitions keep everything but
    their inputs ("transition") and skip projection ("skip_proj")."""
    source = "mvitv2"
    _check_target(target, RevMViT, source)
    sd = _strip(sd, "module.")
    m = _Mapping(source, sd)
    indexes = _block_indexes(sd, "blocks.")
    _check_depth(source, indexes, "blocks.", target)
    found = [i for i in indexes if f"blocks.{i}.proj.weight" in sd]
    for i in found:
        if sd[f"blocks.{i}.norm1.weight"].shape == sd[f"blocks.{i}.norm2.weight"].shape:
            raise ConversionError(
                f"block {i} changes width in its MLP (MViTv1 layout, DIM_MUL_IN_ATT False); "
                "rev_det's RevMViT follows MViTv2, where the attention changes it."
            )
    _check_transitions(source, found, target)
    m.copy("patch_embed.proj.weight", "patch_embed.proj.weight", m.conv2d("patch_embed.proj"))
    m.copy("patch_embed.proj.bias", "patch_embed.proj.bias")
    if "pos_embed" in sd:
        m.put("pos_embed", _pos_grid(sd["pos_embed"]), ["pos_embed"])
    m.ignore("cls_token", "class token (rev_det has none)")
    for i in indexes:
        t = f"blocks.{i}."
        if i in found:
            m.drop(re.escape(t) + r"(norm1|attn\.qkv|attn\.[qkv])\..*", "transition")
            m.drop(re.escape(t) + r"proj\..*", "skip_proj")
        else:
            for p in ("weight", "bias"):
                m.copy(f"{t}norm1.{p}", f"{t}norm1.{p}")
            _qkv(m, f"{t}attn.", f"{t}attn.")
        for key in _BRANCH_KEYS:
            m.copy(t + key, t + key)
        for key in _POOL_KEYS:
            m.copy(t + key, t + key, m.conv2d(t + key))
        for axis in "hw":
            m.copy(f"{t}attn.rel_pos_{axis}", f"{t}attn.rel_pos_{axis}")
    m.ignore(r"(norm|head)\..*", "classifier and its norm")
    m.drop(r"scale\d_norm\..*", "stage_norms")
    m.notes.append(
        "MViTv2 blocks are not reversible blocks: F and G receive their attention and MLP "
        "branches, so the converted trunk is an initialisation, not MViTv2"
    )
    return m.finish(target)


SOURCES = {
    "pyslowfast-revvit": convert_pyslowfast_revvit,
    "pyslowfast-revmvit": convert_pyslowfast_revmvit,
    "mmpretrain-revvit": convert_mmpretrain_revvit,
    "vit": convert_vit,
    "mvitv2": convert_mvitv2,
}


def convert_checkpoint(source: str, sd: Mapping[str, torch.Tensor], target: nn.Module):
    """Dispatch to the converter of ``source`` (one of :data:`SOURCES`)."""
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}.")
    return SOURCES[source](sd, target)


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


def build_target_trunk(config_file: str, opts: Sequence[str] = ()) -> Tuple[nn.Module, str]:
    """Build the backbone of a rev_det config on the "meta" device (no memory, no
    initialisation cost) and find its RevViT / RevMViT trunk.

    Args:
        config_file: a yacs ``.yaml`` or a LazyConfig ``.py``.
        opts: overrides, ``KEY VALUE`` pairs (yacs) or ``key=value`` strings (LazyConfig).

    Returns:
        The trunk and its key prefix in the built Detectron2 model (e.g. ``backbone.net.``),
        so that ``{prefix}{key}`` loads with ``MODEL.WEIGHTS`` / ``train.init_checkpoint``.
    """
    from detectron2.config import LazyConfig, get_cfg, instantiate
    from detectron2.modeling import build_backbone

    from ..checks import check_lazy_overrides
    from ..config import add_revdet_config

    with torch.device("meta"):
        if config_file.endswith(".py"):
            cfg = LazyConfig.load(config_file)
            try:
                check_lazy_overrides(cfg, list(opts))
            except KeyError as e:
                raise ConversionError(e.args[0]) from e
            cfg = LazyConfig.apply_overrides(cfg, list(opts))
            if "backbone" not in cfg.model:
                raise ConversionError(f"{config_file}: cfg.model has no backbone.")
            backbone = instantiate(cfg.model.backbone)
        else:
            cfg = get_cfg()
            add_revdet_config(cfg)
            cfg.merge_from_file(config_file)
            cfg.merge_from_list(list(opts))
            backbone = build_backbone(cfg)
    trunks = [(n, mod) for n, mod in backbone.named_modules() if isinstance(mod, (RevViT, RevMViT))]
    if len(trunks) != 1:
        raise ConversionError(
            f"{config_file} builds a backbone with {len(trunks)} RevViT/RevMViT trunks; "
            "expected one (a rev_det config)."
        )
    name, trunk = trunks[0]
    # Detectron2's meta-architectures keep the backbone as `backbone`.
    return trunk, "backbone." + (name + "." if name else "")


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
