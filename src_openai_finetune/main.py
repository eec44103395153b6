"""Finetune OpenAI's released CLIP weights (ViT-B/32, RN50, RN101, RN50x4) on your image-caption pairs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from clipsearch.models import build_from_spec
from clipsearch.models.openai_clip import (
    OPENAI_RELEASES,
    canonical_name,
    load_openai_weights,
    openai_clip_spec,
)
from clipsearch.train import (
    VariantDefaults,
    add_common_args,
    add_lock_args,
    apply_locks,
    finish_args,
    make_parser,
    run_training,
)

# Pretrained CLIP forgets quickly: a low peak lr (open_clip's finetuning recipes use ~1e-5).
DEFAULTS = VariantDefaults(lr=1e-5, max_steps=1000)
# Where a downloaded OpenAI archive is looked for when --clip_checkpoint is not given.
LOCAL_WEIGHTS_DIR = Path("models/openai")


def parse_args(argv: list[str] | None = None):
    parser = make_parser(__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--finetune_clip", default="ViT-B/32",
                       help=f"architecture of the weights: {', '.join(OPENAI_RELEASES)} (or a small local config for tests)")
    model.add_argument("--clip_checkpoint", default=None,
                       help=f"OpenAI's .pt archive or a state dict (default: {LOCAL_WEIGHTS_DIR}/<name>.pt, then open_clip's download when online)")
    model.add_argument("--text_length", type=int, default=None, help="context length (default 77; other values resize position embeddings)")
    model.add_argument("--image_resolution", type=int, default=None, help="input size (default: the release's; others interpolate)")
    add_lock_args(model)
    add_common_args(parser)
    return finish_args(parser.parse_args(argv), DEFAULTS)


def find_weights(name: str, given: str | None) -> str:
    """The weight file to start from, or a SystemExit that says which file to get and where to put it."""
    if given:
        if not Path(given).is_file():
            raise SystemExit(f"--clip_checkpoint: no file at {given}")
        return given
    local = LOCAL_WEIGHTS_DIR / f"{canonical_name(name)}.pt"
    if local.is_file():
        return str(local)
    import open_clip

    url = open_clip.get_pretrained_url(canonical_name(name), "openai")
    if url and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            from open_clip.pretrained import download_pretrained_from_url

            return download_pretrained_from_url(url)
        except Exception as error:  # noqa: BLE001 - any network failure leads to the same advice
            print(f"download of {url} failed: {error}", file=sys.stderr)
    where = f"download {url}" if url else "get OpenAI-format weights for this architecture"
    raise SystemExit(
        f"no weights for {name}: {where} and put it at {local}, or pass --clip_checkpoint=<file> "
        "(OpenAI's .pt archive or a state dict)"
    )


def build_bundle(args):
    try:
        spec = openai_clip_spec(args.finetune_clip, args.text_length, args.image_resolution, quick_gelu=True)
    except ValueError as error:
        raise SystemExit(f"--finetune_clip: {error}") from None
    weights = find_weights(args.finetune_clip, args.clip_checkpoint)
    bundle = build_from_spec(spec)
    try:
        load_openai_weights(bundle.model, weights, spec["architecture"])
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"--clip_checkpoint: {error}") from None
    apply_locks(bundle.model, args)
    return bundle


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    tag = f"openai-finetune-{args.finetune_clip.replace('/', '-')}"
    return run_training(args, build_bundle, variant_tag=tag)


if __name__ == "__main__":
    main(sys.argv[1:])
