"""Finetune OpenAI's released CLIP weights (ViT-B/32, RN50, RN101, RN50x4) on your image-caption pairs."""
from __future__ import annotations

from clipsearch.cli.common import run_command
from clipsearch.cli.train_args import LOCAL_WEIGHTS_DIR, TrainingDoor, VariantDefaults


def add_model_args(model) -> None:
    model.add_argument("--finetune_clip", default="ViT-B/32",
                       help="architecture of the weights: ViT-B/32, RN50, RN101, RN50x4 (or a small local config for tests)")
    model.add_argument("--clip_checkpoint", default=None,
                       help=f"OpenAI's .pt archive, a state dict, or a clipsearch checkpoint such as an export, whose own "
                            f"architecture is used (default: {LOCAL_WEIGHTS_DIR}/<name>.pt, then open_clip's download "
                            "when online). A TorchScript archive runs code when loaded: use files from OpenAI or that "
                            "you made")
    model.add_argument("--text_length", type=int, default=None, help="context length (default 77; other values resize position embeddings)")
    model.add_argument("--image_resolution", type=int, default=None, help="input size (default: the release's; others interpolate)")


# Pretrained CLIP forgets quickly: a low peak lr (open_clip's finetuning recipes use ~1e-5).
DOOR = TrainingDoor(__doc__, VariantDefaults(lr=1e-5, max_steps=1000), add_model_args, build="build_openai_finetune", pretrained_towers=True,
                    variant=lambda args: f"openai-finetune-{args.finetune_clip.replace('/', '-')}")
parse_args, main = DOOR.parse_args, DOOR.main

if __name__ == "__main__":
    run_command(main)
