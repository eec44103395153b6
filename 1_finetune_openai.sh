#!/usr/bin/env bash
# Finetune OpenAI's released CLIP weights. Put OpenAI's archive at models/openai/<name>.pt (e.g.
# models/openai/ViT-B-32.pt) or pass --clip_checkpoint. Flags: bash 1_finetune_openai.sh --help
#   bash 1_finetune_openai.sh --finetune_clip=RN50 --clip_checkpoint=/path/RN50.pt --lock_image
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
export CLIPSEARCH_PROG="bash $0"  # usage lines name this script
exec "$PY" -m clipsearch.cli.finetune_openai "$@"
