#!/usr/bin/env bash
# Encode an image folder or dataset into embedding shards (resumable; several processes or nodes).
# Flags and multi-process/SLURM usage: bash 2_inference_encode.sh --help
#   bash 2_inference_encode.sh --load_model models/latest/best.ckpt --dataset_path dataset/sample
#   bash 2_inference_encode.sh --dataset_path ~/photos --emb_path ~/photos-emb --devices 4 --precision 16-mixed
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
export CLIPSEARCH_PROG="bash $0"  # usage lines name this script
exec "$PY" -m clipsearch.cli.encode "$@"
