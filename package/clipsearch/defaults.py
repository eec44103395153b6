"""Defaults shared by the commands and the library (the CLI, the HTTP API and training agree on them)."""
from __future__ import annotations

import os

DEFAULT_DATASET = "dataset/sample"
DEFAULT_MODEL = "models/latest/best.ckpt"
DEFAULT_EMB_PATH = "dataset/sample/emb"
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
# One default for the CLI, the HTTP API and the page, so they show the same number of results.
DEFAULT_TOP_K = 24


def default_num_workers(processes_per_node: int = 1) -> int:
    # One core per process stays with the model (its BLAS threads); the rest decode. Measured on
    # 2 cores: one decoder keeps up with EfficientNet-Lite0 (0.96 of model-only), two starve it.
    return min(8, max(1, (os.cpu_count() or 1) // max(1, processes_per_node) - 1))
