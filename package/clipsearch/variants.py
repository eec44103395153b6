"""How each training door builds its (model, transforms, tokenizer) from its model flags.

Moved unchanged from `src_our/main.py`, `src_openai_pretrain/main.py` and
`src_openai_finetune/main.py` (`build_bundle` there), so the doors parse their flags before
anything here imports torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from clipsearch.model_reference import OPENAI_WEIGHTS_DIR as LOCAL_WEIGHTS_DIR
from clipsearch.models import build_from_spec
from clipsearch.models.image_tower import load_image_weights
from clipsearch.models.openai_clip import canonical_name, load_openai_weights, openai_clip_spec
from clipsearch.models.pretrained_towers import load_text_weights, pretrained_towers_spec
from clipsearch.models.transforms import make_image_transform

logger = logging.getLogger(__name__)


def build_pretrained_towers(args):
    try:
        spec, _ = pretrained_towers_spec(
            text_model=args.pretrain_text,
            image_model=args.pretrain_image,
            embed_dim=args.embed_dim,
            pooling=args.text_pooling,
            context_length=args.text_length,
            image_size=args.image_resolution,
            image_drop_path=args.image_drop_path,
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


def build_openai_scratch(args):
    try:
        spec = openai_clip_spec(args.pretrain_clip, args.text_length, args.image_resolution, quick_gelu=not args.no_quick_gelu)
    except ValueError as error:
        raise SystemExit(f"--pretrain_clip: {error}") from None
    return build_from_spec(spec)


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


def build_openai_finetune(args):
    from clipsearch.models.released import is_clipsearch_checkpoint, load_model

    if args.clip_checkpoint and is_clipsearch_checkpoint(args.clip_checkpoint):
        # An export (python -m clipsearch.export) or an earlier run carries its own architecture.
        bundle = load_model(args.clip_checkpoint)
        bundle.model.train()
        apply_locks(bundle.model, args)
        return bundle
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


def apply_locks(model, args: argparse.Namespace) -> None:
    if args.lock_image:
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups)
    if args.lock_text:
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %.1fM of %.1fM", trainable / 1e6, total / 1e6)
