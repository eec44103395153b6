"""Defaults shared by the commands and the library (the CLI, the HTTP API and training agree on them).

The default folders (sample data, models, logs, outputs) live in the project folder, whatever
folder a command is run from; paths a user types are taken from the folder the command runs in.
"""
from __future__ import annotations

import os
from pathlib import Path

# The numbered scripts and ./clipsearch set this to the repository they sit in.
HOME_ENV = "CLIPSEARCH_HOME"


def project_root() -> Path:
    """$CLIPSEARCH_HOME, else the repository this package is checked out in, else the current folder.

    A `pip install ./package` outside a checkout has no repository: its defaults are relative to
    the folder a command runs in, as any command-line tool's are.
    """
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "0_install.sh").is_file() and (checkout / "package").is_dir():
        return checkout
    return Path.cwd()


def in_project(relative: str) -> str:
    """A default path under the project root: as written when the command runs there (messages stay
    short), else absolute, so that it means the same folder from anywhere."""
    root = project_root()
    try:
        if Path.cwd().resolve() == root.resolve():
            return relative
    except OSError:  # the current folder was deleted under us
        pass
    return str(root.resolve() / relative)


def same_path(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name the same place, however each was written (relative, trailing slash)."""
    return os.path.abspath(first) == os.path.abspath(second)


def project_relative(path: str) -> str:
    """How a run records a data path: relative to the project root when inside it, else absolute, so
    the same folder is one run identity from whatever folder the command was typed in. URLs pass."""
    if "://" in path:
        return path
    absolute = os.path.abspath(path)
    root = os.path.abspath(project_root())
    if absolute == root or absolute.startswith(root + os.sep):
        return os.path.relpath(absolute, root)
    return absolute


DEFAULT_DATASET = in_project("dataset/sample")
DEFAULT_MODEL = in_project("models/latest/best.ckpt")
DEFAULT_EMB_PATH = in_project("dataset/sample/emb")
DEFAULT_MODELS_DIR = in_project("models")
DEFAULT_LOGS_DIR = in_project("logs")
DEFAULT_OUTPUTS_DIR = in_project("outputs")
# Where encoding puts the embeddings of a folder outside the project: dataset/<its name>/emb.
DEFAULT_DATASETS_DIR = in_project("dataset")
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
# One default for the CLI, the HTTP API and the page, so they show the same number of results.
DEFAULT_TOP_K = 24


def is_default_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is the generated sample data's folder, which commands generate on first use."""
    return same_path(path, DEFAULT_DATASET)


def default_num_workers(processes_per_node: int = 1) -> int:
    # One core per process stays with the model (its BLAS threads); the rest decode. On 2 cores,
    # Flickr8k photos, "our" model, one decoder against two gave 0.96 / 0.73 and 0.82 / 0.99 of the
    # model-only rate from a folder in two runs minutes apart, 0.73 / 0.92 and 0.73 / 0.77 from tars
    # (BENCHMARKS.md, "Encoding"): no setting wins on this machine's noise, so the rule stays.
    return min(8, max(1, (os.cpu_count() or 1) // max(1, processes_per_node) - 1))
