"""Pretrain "our" CLIP: a pretrained HuggingFace text model and a pretrained timm image model."""
from __future__ import annotations

import sys

from clipsearch.models import build_from_spec
from clipsearch.models.image_tower import DEFAULT_IMAGE_MODEL, load_image_weights
from clipsearch.models.pretrained_towers import DEFAULT_TEXT_MODEL, load_text_weights, pretrained_towers_spec
from clipsearch.models.transforms import make_image_transform
from clipsearch.sample_data import generated_image_size
from clipsearch.train import (
    VariantDefaults,
    add_common_args,
    add_lock_args,
    apply_locks,
    finish_args,
    make_parser,
    run_training,
)

# Fresh projections learn fast; the pretrained towers move ten times slower so they keep what they know.
DEFAULTS = VariantDefaults(lr=5e-4, max_steps=150)
TOWER_LR_RATIO = 0.1


def parse_args(argv: list[str] | None = None):
    parser = make_parser(__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrain_text", default=DEFAULT_TEXT_MODEL,
                       help="HuggingFace text model: hub id (e.g. bert-base-uncased) or local folder")
    model.add_argument("--pretrain_image", default=DEFAULT_IMAGE_MODEL,
                       help="timm image model name (e.g. resnet50); weights from --image_weights, the packaged file, or timm's hub")
    model.add_argument("--image_weights", default=None, help="local .pth/.safetensors file or folder with the image tower's weights")
    model.add_argument("--text_pooling", default="mean", choices=("mean", "cls"), help="how token states become one caption vector")
    model.add_argument("--embed_dim", type=int, default=256, help="size of the shared embedding space")
    model.add_argument("--text_length", type=int, default=64, help="caption tokens kept (context length)")
    model.add_argument("--image_resolution", type=int, default=None,
                       help="input image size (default: the timm model's; on the generated sample data, its 96 px)")
    model.add_argument("--train_resolution", type=int, default=None,
                       help="train on crops of this size, encode at --image_resolution (default: the same). A CNN "
                            "tower trained below its test size is cheaper per step and scores better at the larger "
                            "test size (FixRes, Touvron et al. 2019)")
    add_lock_args(model)
    add_common_args(parser)
    args = finish_args(parser.parse_args(argv), DEFAULTS)
    if args.image_resolution is None:
        args.image_resolution = generated_image_size(args.dataset_path)
    if args.tower_lr is None:
        args.tower_lr = args.lr * TOWER_LR_RATIO
    return args


def build_bundle(args):
    try:
        spec, _ = pretrained_towers_spec(
            text_model=args.pretrain_text,
            image_model=args.pretrain_image,
            embed_dim=args.embed_dim,
            pooling=args.text_pooling,
            context_length=args.text_length,
            image_size=args.image_resolution,
        )
        bundle = build_from_spec(spec)
        load_text_weights(bundle.model, spec["text"]["source"])
        load_image_weights(bundle.model.visual, args.pretrain_image, args.image_weights)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if args.train_resolution:
        image = spec["image"]
        bundle.train_transform = make_image_transform(args.train_resolution, image["mean"], image["std"], is_train=True)
    apply_locks(bundle.model, args)
    return bundle


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    tag = f"our-{args.pretrain_image}-{args.image_resolution or 'default'}px"
    if args.train_resolution:
        tag += f"-train{args.train_resolution}px"
    return run_training(args, build_bundle(args), variant_tag=tag)


if __name__ == "__main__":
    main(sys.argv[1:])
