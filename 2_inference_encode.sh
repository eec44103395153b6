#!/usr/bin/env bash
# Encode an image folder or dataset into embedding shards (resumable; several processes or nodes).
# Flags and multi-process/SLURM usage: bash 2_inference_encode.sh --help
#   bash 2_inference_encode.sh --load_model models/latest/best.ckpt --dataset_path dataset/sample
#   bash 2_inference_encode.sh --dataset_path ~/photos --emb_path ~/photos-emb --devices 4 --precision 16-mixed
set -euo pipefail
# Paths you type are taken from the folder you run it in; the defaults live in this repository.
CLIPSEARCH_PROG="bash $0" exec "$(dirname "$0")/clipsearch" encode "$@"  # usage lines name this script
