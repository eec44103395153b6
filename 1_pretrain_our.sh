#!/usr/bin/env bash
# Pretrain "our" CLIP: a pretrained HuggingFace text tower (default: the packaged MiniLM-L6) and a
# pretrained timm image tower (default: the packaged ImageNet EfficientNet-Lite0), on the generated
# sample data unless --dataset_path says otherwise. Flags: bash 1_pretrain_our.sh --help
#   bash 1_pretrain_our.sh --pretrain_text=bert-base-uncased --pretrain_image=resnet50 --dataset_path dataset/flickr8k/data
set -euo pipefail
# Paths you type are taken from the folder you run it in; the defaults live in this repository.
CLIPSEARCH_PROG="bash $0" exec "$(dirname "$0")/clipsearch" pretrain_our "$@"  # usage lines name this script
