"""Pretrain a CLIP of OpenAI's architecture from scratch (random init)."""
from __future__ import annotations

from clipsearch.cli.common import run_command
from clipsearch.cli.train_args import TrainingDoor, VariantDefaults


def add_model_args(model) -> None:
    model.add_argument("--pretrain_clip", default="ViT-B/32",
                       help="architecture: ViT-B/32, RN50, RN101, any open_clip config, or a small local one "
                            "(ViT-Small-16, ViT-Tiny-16, RN-Tiny) for CPU runs")
    model.add_argument("--text_length", type=int, default=None, help="context length in tokens (default: the architecture's, 77)")
    model.add_argument("--image_resolution", type=int, default=None, help="input image size (default: the architecture's, 224)")
    model.add_argument("--no_quick_gelu", action="store_true", help="use nn.GELU instead of OpenAI's QuickGELU")


# From-scratch CLIP wants a high peak lr (OpenAI used 5e-4 at batch 32k; small batches like less).
DOOR = TrainingDoor(__doc__, VariantDefaults(lr=5e-4, max_steps=1000), add_model_args, build="build_openai_scratch",
                    variant=lambda args: f"openai-scratch-{args.pretrain_clip.replace('/', '-')}")
parse_args, main = DOOR.parse_args, DOOR.main

if __name__ == "__main__":
    run_command(main)
