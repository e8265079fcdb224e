"""The key mapping every converter shares, its check against the target, and the report.

A converter proposes, through a :class:`KeyMapping`, a tensor for each target key it can fill
(copied, renamed, reshaped or combined from source keys), and marks the source keys it drops or
ignores. :meth:`KeyMapping.finish` checks the proposal against the target trunk's parameter
names and shapes and returns a :class:`Conversion`: the trunk's state dict as far as the source
fills it, and an account of every key: matched, missing (target parameters the source has no
weights for; they keep rev_det's initialisation), dropped (source weights that carry function
but have no place in the target) and ignored (source weights outside a detection trunk:
classifier heads, class tokens, decoders). Missing and dropped keys come in named *groups*
(:data:`PARTIAL_GROUPS`), and so do differences of function without weights (e.g. pooling
strides, :meth:`KeyMapping.differ`); a conversion with any of them is an initialisation of the
rev_det model, not the source model. Missing keys in :data:`ADDED_GROUPS` (outputs the source
model does not have) are reported but do not make it partial. Shape mismatches raise
:class:`ConversionError`.
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
from ..modeling.rev_mvit import StageTransitionBlock
from ..modeling.rev_vit import RevViT

__all__ = [
    "PARTIAL_GROUPS",
    "ADDED_GROUPS",
    "BRANCH_KEYS",
    "POOL_KEYS",
    "Conversion",
    "ConversionError",
    "KeyMapping",
    "transition_indexes",
    "pos_grid",
    "block_indexes",
    "check_target",
    "check_depth",
    "check_transitions",
    "copy_qkv",
    "strip_prefix",
]

logger = logging.getLogger(__name__)

# Why a conversion is partial. Each missing target key and each dropped source key has one.
PARTIAL_GROUPS = {
    "rel_pos": "relative position tables on one side only (rev_det starts missing ones at zero, "
    "which adds no bias; ViTDet does the same with MAE weights)",
    "abs_pos": "absolute position embedding on one side only",
    "fusion_norm": "RevViT's LayerNorm over the two concatenated streams (a plain ViT has none)",
    "stage_norms": "RevMViT's final output LayerNorm over the concatenated streams (scale5_norm), "
    "which the source's final norm does not fit",
    "kv_stride": "key/value pooling strides that differ from the source model's (rev_det's "
    "MViTv2 layout doubles them in the global last blocks of stages 3 and 4, as Detectron2's "
    "MViTv2 does; the paper layout, MODEL.REVMVIT.SIZE paper_b, keeps the source's)",
    "transition": "stage-transition inputs: rev_det's transition blocks take the 2C concatenated "
    "streams (norm1, attn.qkv), the source's take C channels",
    "q_pool": "query pooling (attn.pool_q, attn.norm_q) of stage-preserving blocks, which the "
    "source's blocks do not have",
    "fusion_mlp": "PySlowFast's MLP fusing the streams before each stage transition "
    "(MVIT.REV.PRE_Q_FUSION concat_linear*); rev_det fuses them by plain concatenation",
    "skip_proj": "the skip-path projection of transition blocks (MViTv2 blocks.N.proj, "
    "PySlowFast res_proj); rev_det's transition skip needs none",
    "stem_norm": "a LayerNorm after the patch embedding, which rev_det does not have",
    "conv_stem": "rev_det's convolutional stem (MODEL.REVVIT.STEM_CHANNELS), which replaces the "
    "source's patch projection; it starts from its initialisation",
    "temporal": "video-only temporal position tables",
    "other": "parameters on one side only: check that the config matches the checkpoint "
    "(e.g. QKV_BIAS, OUT_FEATURES)",
    "unrecognised": "source keys this converter does not know: is --source right?",
}

# Target parameters a source cannot have and the source's function does not need: the output
# norms of the intermediate stages (scale2_norm .. scale4_norm), which a classification model
# has no output for. Reported, left at rev_det's initialisation, not partial.
ADDED_GROUPS = {
    "output_norms": "RevMViT's LayerNorms of the intermediate outputs (scale2_norm .. "
    "scale4_norm), outputs a classification source does not have",
}

# A ViT block's parameters besides its input norm and qkv projection (which stage transitions
# may not share with rev_det).
BRANCH_KEYS = tuple(
    f"{m}.{p}" for m in ("attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")
)
POOL_KEYS = tuple(
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
        differences: what the target computes differently from the source without a weight
            to show it (e.g. "blocks.2 key/value stride: 4, source 2") -> partial group.
    """

    source: str
    target: str
    state_dict: Dict[str, torch.Tensor]
    matched: Dict[str, str]
    missing: Dict[str, str]
    dropped: Dict[str, str]
    ignored: Dict[str, str]
    notes: List[str] = field(default_factory=list)
    differences: Dict[str, str] = field(default_factory=dict)

    @property
    def partial_groups(self) -> List[str]:
        """The groups that make this conversion partial (empty: the trunk computes the source
        model's function, on the outputs the source has)."""
        groups = set(self.missing.values()) | set(self.dropped.values())
        return sorted((groups | set(self.differences.values())) - set(ADDED_GROUPS))

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
                lines.append(f"    [{group}] {_GROUPS[group]}")
                lines += [f"        {k}" for k in _summarise(members, verbose)]
        if self.differences:
            lines.append(f"  computed differently (no weight shows it): {len(self.differences)}")
            for what, group in self.differences.items():
                lines.append(f"    [{group}] {what}")
        lines.append(f"  ignored (outside the detection trunk): {len(self.ignored)}")
        for reason in sorted(set(self.ignored.values())):
            members = [k for k, r in self.ignored.items() if r == reason]
            lines.append(f"    {reason}: {', '.join(_summarise(members, verbose))}")
        if self.notes:
            lines.append("  notes:")
            lines += [f"    - {note}" for note in self.notes]
        return "\n".join(lines)


_GROUPS = {**PARTIAL_GROUPS, **ADDED_GROUPS}


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


class KeyMapping:
    """What a converter proposes: target key -> (tensor, source keys), and the source keys it
    drops or ignores, then :meth:`finish` checks it all against the target."""

    def __init__(self, source: str, state_dict: Mapping[str, torch.Tensor]):
        self.source = source
        self.sd = state_dict
        self.proposed: Dict[str, Tuple[torch.Tensor, Tuple[str, ...]]] = {}
        self.dropped: Dict[str, str] = {}
        self.ignored: Dict[str, str] = {}
        self.notes: List[str] = []
        self.differences: Dict[str, str] = {}
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
        """Propose ``value``, computed from ``source_keys``, for ``target_key``."""
        self.proposed[target_key] = (value, tuple(source_keys))

    def drop(self, pattern: str, group: str):
        """Mark the source keys matching the regular expression as dropped in ``group``."""
        for key in self.sd:
            if re.fullmatch(pattern, key):
                self.dropped[key] = group

    def differ(self, what: str, group: str):
        """Record that the target computes ``what`` differently from the source, though no
        weight shows it (a partial ``group``)."""
        self.differences[what] = group

    def ignore(self, pattern: str, reason: str):
        """Mark the source keys matching the regular expression as outside the trunk."""
        for key in self.sd:
            if re.fullmatch(pattern, key):
                self.ignored[key] = reason

    def finish(self, target: nn.Module) -> Conversion:
        """Check the proposal against ``target``'s names and shapes and account for every key.

        Raises:
            ConversionError: a proposed tensor does not have its target's shape.
        """
        shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        transitions = transition_indexes(target)
        state, matched, missing, errors = {}, {}, {}, []
        proposed = dict(self.proposed)
        stem = [k for k in shapes if k.startswith("patch_embed.stem.")]
        if stem and not any(k in proposed for k in stem):
            # A convolutional stem replaces the patch projection: the source's patch_embed.proj
            # is a different layer (p x p from the image), not a mis-sized one. (A source with a
            # stem of its own, rev_det's layout, fills both.)
            for key in [k for k in proposed if k.startswith("patch_embed.")]:
                for source_key in proposed.pop(key)[1]:
                    self.dropped[source_key] = "conv_stem"
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
            differences=self.differences,
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


def transition_indexes(target: nn.Module) -> List[int]:
    """The indexes of the target's stage-transition blocks (none in a RevViT)."""
    return [i for i, b in enumerate(target.blocks) if isinstance(b, StageTransitionBlock)]


def _missing_group(key: str, transitions: Sequence[int]) -> str:
    """The group of a target parameter the source does not fill."""
    if re.match(r"scale[2-4]_norm\.", key):
        return "output_norms"
    group = _extra_group(key)
    if group != "other":
        return group
    if key.startswith("patch_embed."):  # only a convolutional stem leaves these unfilled
        return "conv_stem"
    if key.startswith("norm."):
        return "fusion_norm"
    match = re.match(r"blocks\.(\d+)\.(.*)", key)
    if match:
        index, rest = int(match[1]), match[2]
        if index in transitions and rest.startswith(("norm1.", "attn.qkv.")):
            return "transition"
        if index not in transitions and rest.startswith(("attn.pool_q.", "attn.norm_q.")):
            return "q_pool"
    return "other"


def _extra_group(target_key: str) -> str:
    """The group of a proposal for a parameter the target does not have (also the first rule for
    a target parameter the source does not fill)."""
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


def pos_grid(pos_embed: torch.Tensor) -> torch.Tensor:
    """(1, prefix + S*S, C) -> (1, S*S, C): drop leading class/distillation/register entries."""
    side = math.isqrt(pos_embed.shape[1])
    extra = pos_embed.shape[1] - side * side
    if extra > 8:
        raise ConversionError(
            f"pos_embed of {pos_embed.shape[1]} positions is not a square grid plus a few "
            "prefix tokens; rev_det needs a square pre-training grid."
        )
    return pos_embed[:, extra:]


def block_indexes(sd: Mapping[str, torch.Tensor], prefix: str) -> List[int]:
    """Sorted block indexes ``i`` of the keys ``{prefix}{i}.*``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m[1]) for m in map(pattern.match, sd) if m})


def check_target(target: nn.Module, kind: type, source: str):
    """Refuse a target that is not the ``kind`` of trunk ``source`` converts into."""
    if not isinstance(target, kind):
        raise ConversionError(
            f"--source {source} converts into a {kind.__name__}, but the config builds a "
            f"{type(target).__name__}; use a {kind.__name__} config (MODEL.BACKBONE.NAME "
            f"build_{'rev_vit' if kind is RevViT else 'rev_mvit'}_backbone)."
        )


def check_depth(source: str, indexes: List[int], prefix: str, target: nn.Module):
    """Refuse a checkpoint whose block ``indexes`` are not the target's ``0 .. depth - 1``."""
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


def check_transitions(source: str, found: List[int], target: nn.Module):
    """Refuse a checkpoint whose stage transitions (``found``) are not the target's."""
    expected = transition_indexes(target)
    if found != expected:
        depth = len(target.blocks)
        last = [t - 1 for t in found] + [depth - 1]
        raise ConversionError(
            f"the {source} checkpoint changes width (stage transitions) at blocks {found}, the "
            f"config's RevMViT at {expected}; set MODEL.REVMVIT.LAST_BLOCK_INDEXES to {last}."
        )


def copy_qkv(m: KeyMapping, target_prefix: str, source_prefix: str):
    """Fused ``qkv`` from a fused ``qkv`` or from separate ``q``, ``k``, ``v`` projections
    (their rows are the q, k and v blocks of a fused projection, in that order)."""
    for p in ("weight", "bias"):
        parts = [f"{source_prefix}{x}.{p}" for x in "qkv"]
        if all(k in m.sd for k in parts):
            m.put(f"{target_prefix}qkv.{p}", torch.cat([m.sd[k] for k in parts], 0), parts)
        else:
            m.copy(f"{target_prefix}qkv.{p}", f"{source_prefix}qkv.{p}")


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """``sd`` without ``prefix`` if every key has it (a DistributedDataParallel ``module.``)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)
