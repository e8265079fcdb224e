#!/usr/bin/env python
"""Convert a published ImageNet checkpoint into Detectron2 weights for a rev_det config.

Reads the checkpoint, builds the config's backbone (on the "meta" device: no memory) to learn
the trunk's parameter names, shapes and key prefix in the Detectron2 model, converts
(:mod:`rev_det.convert`), prints a report of matched / missing / dropped / ignored keys and
writes ``{"model": ..., "__author__": ...}`` for ``MODEL.WEIGHTS`` (yacs) or
``train.init_checkpoint`` (LazyConfig).

Usage::

    python tools/convert_pretrained.py --source pyslowfast-revvit --input REV_VIT_B.pyth \\
        --config-file configs/COCO/mask_rcnn_rev_vit_b.yaml --output rev_vit_b_in1k.pth \\
        --allow-partial rel_pos
    python projects/train_net.py --config-file configs/COCO/mask_rcnn_rev_vit_b.yaml \\
        MODEL.WEIGHTS rev_vit_b_in1k.pth

Sources: pyslowfast-revvit, pyslowfast-revmvit (the paper's official ``.pyth`` files),
mmpretrain-revvit, vit (MAE / DeiT / timm ViT) and mvitv2 (facebookresearch/mvit, Detectron2's
ImageNet MViTv2 ``.pyth``).

A conversion that leaves trunk parameters at their initialisation, or drops source weights
that carry function, is partial: it is an initialisation of the rev_det model, not the source
model. The report names the groups of such keys; nothing is written unless each is allowed
with ``--allow-partial GROUP[,GROUP...]`` (or ``all``).

Exit status: 0 written; 1 partial in groups not allowed (nothing written); 2 the checkpoint
does not fit the config or cannot be read.
"""

import argparse
import os
import sys

from rev_det.convert import (
    PARTIAL_GROUPS,
    SOURCES,
    ConversionError,
    build_target_trunk,
    convert_checkpoint,
    load_checkpoint_file,
    save_detectron2_checkpoint,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="partial groups:\n"
        + "\n".join(f"  {name}: {text}" for name, text in PARTIAL_GROUPS.items()),
    )
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--input", required=True, help="the downloaded checkpoint")
    parser.add_argument("--output", required=True, help="the converted .pth to write")
    parser.add_argument(
        "--config-file",
        required=True,
        help="the rev_det config (yacs .yaml or LazyConfig .py) the weights are for",
    )
    parser.add_argument(
        "--allow-partial",
        default="",
        metavar="GROUPS",
        help="comma-separated partial groups to accept (or 'all'); see below",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load the input with torch.load(weights_only=False): only for trusted files",
    )
    parser.add_argument("--verbose", action="store_true", help="list every key")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides: KEY VALUE pairs (yacs) or key=value (LazyConfig)",
    )
    return parser.parse_args(argv)


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (also through symlinks, relative paths or
    hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    allow = {g for g in args.allow_partial.split(",") if g}
    unknown = allow - set(PARTIAL_GROUPS) - {"all"}
    if unknown:
        print(f"error: unknown --allow-partial groups {sorted(unknown)}", file=sys.stderr)
        return 2
    if same_file(args.input, args.output):
        print(
            f"error: --output {args.output} is the --input file {args.input}: writing it would "
            "destroy the checkpoint being converted. Name another output file.",
            file=sys.stderr,
        )
        return 2
    try:
        trunk, prefix = build_target_trunk(args.config_file, args.opts)
        state_dict = load_checkpoint_file(args.input, trust_pickle=args.trust_pickle)
        conversion = convert_checkpoint(args.source, state_dict, trunk)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rev_det convert_pretrained: {args.input} for {args.config_file} (keys {prefix}*)")
    print(conversion.format_report(verbose=args.verbose))
    blocking = conversion.blocking_groups(allow)
    if blocking:
        print(
            f"PARTIAL: groups {', '.join(blocking)} are not covered, so the converted trunk "
            "would be an initialisation, not the source model. Nothing written; pass "
            f"--allow-partial {','.join(conversion.partial_groups)} to write it."
        )
        return 1
    try:
        save_detectron2_checkpoint(conversion, prefix, args.output)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "an initialisation (partial: " + ", ".join(conversion.partial_groups) + ")"
    print(
        f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB), "
        + ("complete" if not conversion.partial_groups else kind)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
