#!/usr/bin/env bash
# Retrieval recall (R@1/5/10, median and mean rank, both directions) of a trained checkpoint on a
# dataset split; prints a table and writes JSON. Flags: bash 4_evaluate.sh --help
#   bash 4_evaluate.sh --load_model models/X.ckpt --dataset_path dataset/flickr8k/data --split dev
#   bash 4_evaluate.sh --load_model models/X.ckpt --accelerator gpu --devices 1
set -euo pipefail
# Paths you type are taken from the folder you run it in; the defaults live in this repository.
CLIPSEARCH_PROG="bash $0" exec "$(dirname "$0")/clipsearch" evaluate "$@"  # usage lines name this script
