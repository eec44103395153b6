#!/usr/bin/env bash
# Retrieval recall of a trained checkpoint on a dataset split, e.g.
#   ./4_evaluate.sh --load_model models/X.ckpt --dataset_path dataset/flickr8k/data --split dev
# All flags: ./4_evaluate.sh --help
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=python
if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi
exec "$PYTHON" -m clipsearch.evaluate "$@"
