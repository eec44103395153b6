"""Door to clipsearch/cli/finetune_openai.py: finetune OpenAI's released CLIP weights."""
from clipsearch.cli.common import run_command
from clipsearch.cli.finetune_openai import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    run_command(main)
