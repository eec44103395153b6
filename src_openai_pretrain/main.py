"""Pretrain a CLIP of OpenAI's architecture from scratch (random init)."""
from __future__ import annotations

import sys

from clipsearch.models import build_from_spec
from clipsearch.models.openai_clip import openai_clip_spec
from clipsearch.train import VariantDefaults, add_common_args, finish_args, make_parser, run_training

# From-scratch CLIP wants a high peak lr (OpenAI used 5e-4 at batch 32k; small batches like less).
DEFAULTS = VariantDefaults(lr=5e-4, max_steps=1000)


def parse_args(argv: list[str] | None = None):
    parser = make_parser(__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrain_clip", default="ViT-B/32",
                       help="architecture: ViT-B/32, RN50, RN101, any open_clip config, or a small local one "
                            "(ViT-Small-16, ViT-Tiny-16, RN-Tiny) for CPU runs")
    model.add_argument("--text_length", type=int, default=None, help="context length in tokens (default: the architecture's, 77)")
    model.add_argument("--image_resolution", type=int, default=None, help="input image size (default: the architecture's, 224)")
    model.add_argument("--no_quick_gelu", action="store_true", help="use nn.GELU instead of OpenAI's QuickGELU")
    add_common_args(parser)
    return finish_args(parser.parse_args(argv), DEFAULTS)


def build_bundle(args):
    try:
        spec = openai_clip_spec(args.pretrain_clip, args.text_length, args.image_resolution, quick_gelu=not args.no_quick_gelu)
    except ValueError as error:
        raise SystemExit(f"--pretrain_clip: {error}") from None
    return build_from_spec(spec)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    tag = f"openai-scratch-{args.pretrain_clip.replace('/', '-')}"
    return run_training(args, build_bundle, variant_tag=tag)


if __name__ == "__main__":
    main(sys.argv[1:])
