#!/usr/bin/env bash
# Finetune OpenAI's released CLIP weights. Put OpenAI's archive at models/openai/<name>.pt (e.g.
# models/openai/ViT-B-32.pt) or pass --clip_checkpoint. Flags: bash 1_finetune_openai.sh --help
#   bash 1_finetune_openai.sh --finetune_clip=RN50 --clip_checkpoint=/path/RN50.pt --lock_image
set -euo pipefail
# Paths you type are taken from the folder you run it in; the defaults live in this repository.
CLIPSEARCH_PROG="bash $0" exec "$(dirname "$0")/clipsearch" finetune_openai "$@"  # usage lines name this script
