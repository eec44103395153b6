"""Door to clipsearch/cli/pretrain_our.py: pretrain "our" CLIP (pretrained HF text + timm image towers)."""
from clipsearch.cli.common import run_command
from clipsearch.cli.pretrain_our import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    run_command(main)
