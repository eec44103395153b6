#!/usr/bin/env bash
# Search encoded images by text or image; prints ranked paths and saves a thumbnail grid per query.
# Without --query/--image it prompts "Search: "; --serve starts the web page. Flags: --help
#   bash 3_inference_search.sh --load_model models/latest/best.ckpt --emb_path dataset/sample/emb --query "Hello World"
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
export CLIPSEARCH_PROG="bash $0"  # usage lines name this script
exec "$PY" -m clipsearch.cli.search "$@"
