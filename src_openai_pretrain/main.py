"""Door to clipsearch/cli/pretrain_openai.py: pretrain a CLIP of OpenAI's architecture from scratch."""
from clipsearch.cli.common import run_command
from clipsearch.cli.pretrain_openai import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    run_command(main)
