"""Shared test setup: offline hubs, single-threaded determinism, small shared fixtures."""
import os

# A failed hub lookup hangs for ~45 s; every weight the tests use is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
