"""open_clip models with released weights (a pretrained tag, a local folder or a hub repo)."""
from __future__ import annotations

import copy
import logging

import open_clip
import torch

from clipsearch.models.bundle import SPEC_VERSION
from clipsearch.models.pretrained_towers import HFTokenizer, _pack_tokenizer_files, _unpack_tokenizer
from clipsearch.models.registry import register_family
from clipsearch.models.transforms import make_image_transform

logger = logging.getLogger(__name__)

FAMILY = "open_clip"


def open_clip_spec(model: torch.nn.Module, model_config: dict, tokenizer, released: str) -> dict:
    """The self-describing spec of an open_clip model: its config, tokenizer and preprocessing."""

    preprocess = model.visual.preprocess_cfg
    size = preprocess["size"]
    size = size if isinstance(size, int) else size[0]
    if isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        tokenizer_spec = {"kind": "openai-bpe"}
    elif isinstance(tokenizer, open_clip.tokenizer.HFTokenizer):
        tokenizer_spec = {"kind": "hf", "files": _pack_tokenizer_files(tokenizer.tokenizer)}
    else:
        raise ValueError(f"{released}: its tokenizer ({type(tokenizer).__name__}) cannot be stored in a checkpoint yet")
    return {
        "spec_version": SPEC_VERSION,
        "family": FAMILY,
        "released": released,
        "architecture": released,
        "model_config": model_config,
        "embed_dim": int(model_config["embed_dim"]),
        "text": {"context_length": int(tokenizer.context_length), "tokenizer": tokenizer_spec},
        "image": {
            "size": int(size),
            "mean": [float(m) for m in preprocess["mean"]],
            "std": [float(s) for s in preprocess["std"]],
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "resize_mode": preprocess.get("resize_mode", "shortest"),
        },
    }


def image_transforms(spec: dict):
    """open_clip's own eval preprocessing (interpolation and resize mode vary by release)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    image = spec["image"]
    config = PreprocessCfg(
        size=image["size"], mean=tuple(image["mean"]), std=tuple(image["std"]),
        interpolation=image["interpolation"], resize_mode=image["resize_mode"],
    )
    train = make_image_transform(image["size"], image["mean"], image["std"], is_train=True)
    return train, image_transform_v2(config, is_train=False)


@register_family(FAMILY, transforms=image_transforms)
def build_open_clip(spec: dict):
    """Random-init open_clip model and its tokenizer, from a spec made by `open_clip_spec`."""
    config = copy.deepcopy(spec["model_config"])
    custom_text = config.pop("custom_text", False) or "hf_model_name" in config["text_cfg"]
    if "hf_model_name" in config["text_cfg"]:
        config["text_cfg"]["hf_model_pretrained"] = False  # weights come from the checkpoint
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = model_class(**config)
    tokenizer_spec, context_length = spec["text"]["tokenizer"], spec["text"]["context_length"]
    if tokenizer_spec["kind"] == "openai-bpe":
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    else:
        tokenizer = HFTokenizer(_unpack_tokenizer(tokenizer_spec["files"]), context_length)
    return model, tokenizer


def load_open_clip(model_name: str, pretrained: str | None, released: str):
    """(spec, model with weights) through open_clip's factory; downloads only what the cache lacks."""
    model_config = copy.deepcopy(open_clip.get_model_config(model_name))
    # A tag trained with QuickGELU (OpenAI's weights) needs it, whatever the base config says.
    quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu"))
    if quick_gelu:
        model_config["quick_gelu"] = True
    model = open_clip.create_model(
        model_name, pretrained=pretrained, require_pretrained=True, force_quick_gelu=quick_gelu
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    return open_clip_spec(model, model_config, tokenizer, released), model
