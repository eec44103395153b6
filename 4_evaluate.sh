#!/usr/bin/env bash
# Retrieval recall (R@1/5/10, median and mean rank, both directions) of a trained checkpoint on a
# dataset split; prints a table and writes JSON. Flags: bash 4_evaluate.sh --help
#   bash 4_evaluate.sh --load_model models/X.ckpt --dataset_path dataset/flickr8k/data --split dev
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
exec "$PY" -m clipsearch.cli.evaluate "$@"
