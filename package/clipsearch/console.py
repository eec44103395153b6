"""Console-script entry points (`pip install ./package`): one per command in clipsearch/cli/.

A console script ends with `sys.exit(entry())`, so each entry runs its command's `main` through
`run_command`: a user error is one line and exit 1, and whatever `main` returns is not printed.
"""
from __future__ import annotations

import importlib

from clipsearch.cli.common import run_command


def _entry(command: str):
    def entry() -> None:
        run_command(importlib.import_module(f"clipsearch.cli.{command}").main)

    entry.__name__ = command
    entry.__doc__ = f"Run `clipsearch.cli.{command}` as a program."
    return entry


encode = _entry("encode")
search = _entry("search")
index = _entry("index")
evaluate = _entry("evaluate")
export = _entry("export")
pretrain_our = _entry("pretrain_our")
pretrain_openai = _entry("pretrain_openai")
finetune_openai = _entry("finetune_openai")
sample_data = _entry("sample_data")
resize_dataset = _entry("resize_dataset")
export_clip_retrieval = _entry("export_clip_retrieval")
querybank = _entry("querybank")
duplicates = _entry("duplicates")
