"""What every command shares: its parser, argument types, defaults and the one-line error exit.

Imports nothing heavy (no torch, no Lightning): a command parses and checks its flags with this
module alone, so `--help`, a typo or a missing path answers at once; it imports the heavy
libraries only after that.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

from clipsearch.defaults import (  # noqa: F401  re-exported: every command imports them from here
    DEFAULT_DATASET,
    DEFAULT_DATASETS_DIR,
    DEFAULT_EMB_PATH,
    DEFAULT_LOGS_DIR,
    DEFAULT_MODEL,
    DEFAULT_MODELS_DIR,
    DEFAULT_OUTPUTS_DIR,
    DEFAULT_TOP_K,
    PRECISIONS,
    default_num_workers,
)
from clipsearch.errors import UserError  # noqa: F401  re-exported

# The numbered scripts set this to themselves, so usage lines name what the user typed.
PROG_ENV = "CLIPSEARCH_PROG"


def _number(kind: type, minimum: float, description: str) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text}")
        return value

    parse.__name__ = description  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, "an integer >= 1")
non_negative_int = _number(int, 0, "an integer >= 0")


def _float_in(accepts: Callable[[float], bool], description: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # accepted by no range
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value

    parse.__name__ = description
    return parse


positive_float = _float_in(lambda value: value > 0, "a positive number")
drop_rate = _float_in(lambda value: 0 <= value < 1, "a rate in [0, 1)")  # a probability of dropping in training
unit_fraction = _float_in(lambda value: 0 < value <= 1, "a number in (0, 1]")


def add_column_args(group: argparse._ArgumentGroup, caption: bool = True) -> None:
    """--image_column / --caption_column: the columns of a dataset's tables, for tables named otherwise."""
    group.add_argument("--image_column", default="image",
                       help="the tables' column of image paths (relative to the dataset folder, or absolute)")
    if caption:
        group.add_argument("--caption_column", default="caption", help="the tables' column of captions")


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default once, after its help, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS or default == []
        if hidden or "default" in text.lower() or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


class CommandParser(argparse.ArgumentParser):
    """argparse with the conventions of every clipsearch command.

    - `--top-k` and `--top_k` are the same flag (dashes in a flag name read as underscores);
    - no prefix abbreviations (a typo must not silently pick another flag), and an unknown flag
      gets a did-you-mean;
    - the usage line names the script the user ran.
    """

    def __init__(self, prog: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog=os.environ.get(PROG_ENV) or prog, **kwargs)

    def _known_flags(self) -> list[str]:
        return [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]

    def _normalise(self, argv: Sequence[str]) -> list[str]:
        known = set(self._known_flags())
        normalised = []
        for token in argv:
            if token == "--":  # everything after is positional
                normalised.extend(argv[len(normalised):])
                break
            if token.startswith("--"):
                name, equals, value = token.partition("=")
                underscored = "--" + name[2:].replace("-", "_")
                if name not in known and underscored in known:
                    token = underscored + equals + value
            normalised.append(token)
        return normalised

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._normalise(argv), namespace)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flag = unknown[0].partition("=")[0]
            close = difflib.get_close_matches(flag.replace("-", "_").replace("__", "--", 1), self._known_flags(), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; see {self.prog} --help"
            self.error(f"unrecognised argument{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)}{hint}")
        return parsed


# Records an encoding run writes beside its shards; either may name the image folder it read.
RECORD_FILES = ("model.json", "manifest.json")


def _recorded(emb_path: str | os.PathLike, field: str, files: Sequence[str] = RECORD_FILES) -> str | None:
    for name in files:
        try:
            with open(os.path.join(emb_path, name), encoding="utf-8") as file:
                recorded = json.load(file).get(field)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, str) and recorded:
            return recorded
    return None


def recorded_dataset(emb_path: str | os.PathLike) -> str | None:
    """The image or dataset folder an embedding folder's records say it was encoded from, if any."""
    return _recorded(emb_path, "dataset_path")


def model_for(emb_path: str | os.PathLike, load_model: str | None) -> str:
    """--load_model as given, else the model the embedding folder was encoded with, else the default.

    Queries must be embedded by the model that encoded the collection, so a folder's model.json
    is a better default than models/latest. Which one was taken is said in one line.
    """
    if load_model is not None:
        return load_model
    recorded = _recorded(emb_path, "load_model", files=("model.json",))
    if recorded is None:
        return DEFAULT_MODEL
    print(f"model: {recorded}, which encoded {emb_path} (--load_model chooses another)", file=sys.stderr)
    return recorded


def run_command(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run a command's `main` as a program: a UserError becomes one line on stderr and exit 1."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
