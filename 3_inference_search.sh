#!/usr/bin/env bash
# Search encoded images by text or image; prints ranked paths and saves a thumbnail grid per query.
# Without --query/--image it prompts "Search: "; --serve starts the web page. Flags: --help
#   bash 3_inference_search.sh --load_model models/latest/best.ckpt --emb_path dataset/sample/emb --query "Hello World"
set -euo pipefail
# Paths you type are taken from the folder you run it in; the defaults live in this repository.
CLIPSEARCH_PROG="bash $0" exec "$(dirname "$0")/clipsearch" search "$@"  # usage lines name this script
