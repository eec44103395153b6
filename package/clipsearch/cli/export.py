"""Write any model --load_model accepts as a self-describing clipsearch checkpoint (weights, spec, tokenizer files)."""
from __future__ import annotations

import argparse
from pathlib import Path

from clipsearch.cli.common import CommandParser, UserError, positive_int, run_command
from clipsearch.model_reference import HELP, check_model_reference

EPILOG = """\
Examples (where the hub is reachable), then carry model.ckpt to any machine:
  python -m clipsearch.export --load_model open_clip:ViT-B-32/laion2b_s34b_b79k --out models/vit-b-32-laion.ckpt
  python -m clipsearch.export --load_model openai/clip-vit-base-patch32 --out models/hf-clip-b32.ckpt
  python -m clipsearch.export --load_model models/latest/best.ckpt --out models/mirror.ckpt --mirror_average on
  python -m clipsearch.export --load_model models/latest/best.ckpt --out models/at256.ckpt --image_resolution 256
  python -m clipsearch.export --load_model models/latest/best.ckpt --out models/multiscale.ckpt \
      --image_resolution 320 --scale_average 256
The checkpoint loads like a trained one: 2_inference_encode.sh, 3_inference_search.sh and 4_evaluate.sh take
it as --load_model, and 1_finetune_openai.sh --clip_checkpoint=<it> finetunes it.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="python -m clipsearch.export", description=__doc__, epilog=EPILOG)
    parser.add_argument("--load_model", required=True, help=HELP)
    parser.add_argument("--out", required=True, help="checkpoint file to write (e.g. models/<name>.ckpt)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--mirror_average", choices=("on", "off"), default=None,
                        help="on: the checkpoint embeds each image as the mean of its own and its mirror image's "
                             "embedding (test-time augmentation, twice the image encoding work); off: the image "
                             "alone (default: as --load_model does)")
    parser.add_argument("--image_resolution", type=positive_int, default=None,
                        help="encode images at this size ('our' CLIP's convolutional towers): a tower trained on "
                             "random crops scores better encoded somewhat larger than it trained (FixRes); "
                             "on Flickr8k, EfficientNet-Lite2 trained at 224 px did best at 256 (default: as "
                             "--load_model does)")
    parser.add_argument("--scale_average", type=image_sizes, default=None, metavar="SIZES|off",
                        help="also embed each image at these sizes (comma-separated px, resized from the encoding "
                             "size) and average the unit embeddings of all sizes: test-time augmentation, a pass "
                             "per size. On Flickr8k, two EfficientNet-Lite2 models trained at 256 px scored 0.7 and "
                             "0.2 points of mean recall higher encoded at 320 with --scale_average 256 than at "
                             "288 alone; off: one size (default: as --load_model does)")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:
        raise UserError(f"--out {args.out} exists; pass --overwrite to replace it")
    check_model_reference(args.load_model)
    return args


def image_sizes(text: str) -> list[int]:
    """'off' -> [] (no extra sizes), '256,288' -> [256, 288]."""
    if text.strip().lower() == "off":
        return []
    try:
        return [positive_int(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"expected 'off' or sizes in px like 256,288: {error}") from error


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from clipsearch.checkpoint import load_bundle, model_fingerprint, save_bundle
    from clipsearch.models.registry import with_image_size, with_scale_average
    from clipsearch.models.released import load_model

    bundle = load_model(args.load_model)
    if args.mirror_average is not None:
        bundle.set_mirror_average(args.mirror_average == "on")
    if args.image_resolution is not None:
        try:
            bundle = with_image_size(bundle, args.image_resolution)
        except ValueError as error:
            raise UserError(f"--image_resolution: {error}") from error
    if args.scale_average is not None:
        try:
            bundle = with_scale_average(bundle, args.scale_average)
        except ValueError as error:
            raise UserError(f"--scale_average: {error}") from error
    path = save_bundle(bundle, args.out)
    # Reload as every command will, so a checkpoint that would not rebuild is never left behind.
    if model_fingerprint(load_bundle(path)) != model_fingerprint(bundle):
        path.unlink()
        raise UserError(f"{args.load_model} did not survive export: the reloaded model differs; nothing written")
    views = bundle.image_views
    mirror = ", mirror-averaged images" if views.mirror else ""
    scales = f", averaged with {', '.join(map(str, views.extra_sizes))} px" if views.extra_sizes else ""
    print(f"wrote {path} ({bundle.spec.get('released', bundle.spec['family'])}, {bundle.embed_dim}-d embeddings, "
          f"{bundle.spec['image']['size']} px images{scales}{mirror})")


if __name__ == "__main__":
    run_command(main)
