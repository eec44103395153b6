#!/usr/bin/env bash
# Pretrain a CLIP of OpenAI's architecture from scratch. Flags: bash 1_pretrain_openai.sh --help
#   bash 1_pretrain_openai.sh --pretrain_clip=ViT-B/32 --text_length=77 --image_resolution=224
#   bash 1_pretrain_openai.sh --pretrain_clip=ViT-Small-16      # a small config that trains on a CPU
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
export CLIPSEARCH_PROG="bash $0"  # usage lines name this script
exec "$PY" -m clipsearch.cli.pretrain_openai "$@"
