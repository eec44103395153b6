"""The data API in one import: tables (`tables.py`), the skip report (`data_report.py`) and image decoding (`images.py`).

Datasets and collate functions live in `datasets.py`.
"""
from __future__ import annotations

from clipsearch.data_report import CONVERSION_PREFIX, DataReport  # noqa: F401
from clipsearch.images import decode_image, load_image  # noqa: F401
from clipsearch.tables import TABLE_EXTENSIONS, find_table, read_table  # noqa: F401

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
