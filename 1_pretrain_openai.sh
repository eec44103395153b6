#!/usr/bin/env bash
# Pretrain a CLIP of OpenAI's architecture from scratch. Flags: bash 1_pretrain_openai.sh --help
#   bash 1_pretrain_openai.sh --pretrain_clip=ViT-B/32 --text_length=77 --image_resolution=224
#   bash 1_pretrain_openai.sh --pretrain_clip=ViT-Small-16      # a small config that trains on a CPU
set -euo pipefail
# Paths you type are taken from the folder you run it in; the defaults live in this repository.
CLIPSEARCH_PROG="bash $0" exec "$(dirname "$0")/clipsearch" pretrain_openai "$@"  # usage lines name this script
