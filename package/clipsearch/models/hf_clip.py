"""HuggingFace CLIP (and SigLIP) models: transformers' own towers, tokenizer and image preprocessing."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from clipsearch.models.bundle import SPEC_VERSION
from clipsearch.models.pretrained_towers import HFTokenizer, _pack_tokenizer_files, _unpack_tokenizer
from clipsearch.models.registry import register_family
from clipsearch.models.transforms import PixelNormalize, make_image_transform

FAMILY = "hf_clip"
# Model types whose `get_image_features` / `get_text_features` give the embeddings we compare.
SUPPORTED_MODEL_TYPES = ("clip", "siglip")
# PIL's resample codes, as image processor configs store them.
# Config entries that describe the file rather than the model: kept out of the spec (and so out of
# the fingerprint), or a transformers upgrade would make the same weights look like another model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")
PIL_RESAMPLE = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}


class HFImageTransform:
    """PIL image -> the pixel values transformers' (torchvision-backed) image processor makes, exactly.

    The processor resizes a uint8 tensor with torchvision v2's antialiased kernel (v1's functional
    resize, and PIL's, differ from it by up to 7 and 1 grey levels) and crops at
    floor((size - crop) / 2), where torchvision's CenterCrop rounds: a pixel's shift on odd sizes.
    """

    def __init__(self, image: dict):
        self.resize = image["resize"]  # {"shortest_edge": n} or {"height": h, "width": w}, or None
        self.crop = image["crop"]  # [height, width] or None
        self.interpolation = PIL_RESAMPLE.get(int(image["resample"]), InterpolationMode.BICUBIC)
        # Rescale (1/255) and normalise fused, as the processor does.
        self.mean = [m * 255.0 for m in image["mean"]]
        self.std = [s * 255.0 for s in image["std"]]

    def _resized_size(self, height: int, width: int) -> list[int]:
        if "shortest_edge" in self.resize:
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = self.resize["shortest_edge"], int(self.resize["shortest_edge"] * long / short)
            return [new_short, new_long] if height <= width else [new_long, new_short]
        return [self.resize["height"], self.resize["width"]]

    def __call__(self, image) -> torch.Tensor:
        return TF.normalize(self.pixels(image).float(), self.mean, self.std)

    def split_normalize(self) -> tuple:
        """The uint8 pixels and their batch normalisation (`transforms.split_normalize`)."""
        return self.pixels, PixelNormalize(self.mean, self.std, scale=1.0)

    def pixels(self, image) -> torch.Tensor:
        """The resized and cropped uint8 pixels, before normalisation."""
        pixels = TF.pil_to_tensor(image.convert("RGB"))
        if self.resize:
            size = self._resized_size(*pixels.shape[-2:])
            pixels = TF.resize(pixels, size, interpolation=self.interpolation, antialias=True)
        if self.crop:
            crop_height, crop_width = self.crop
            height, width = pixels.shape[-2:]
            if crop_height > height or crop_width > width:
                pixels = TF.center_crop(pixels, [crop_height, crop_width])  # pads; only for tiny images
            else:
                top, left = int((height - crop_height) / 2.0), int((width - crop_width) / 2.0)
                pixels = TF.crop(pixels, top, left, crop_height, crop_width)
        return pixels


class HFCLIP(nn.Module):
    """A transformers CLIPModel/SiglipModel behind the project's model contract."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        """Freeze the vision tower and its projection except its last `unlocked_groups` layers (LiT when 0)."""
        self._lock(self.model.vision_model, getattr(self.model, "visual_projection", None), unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower and its projection except its last `unlocked_layers` layers."""
        self._lock(self.model.text_model, getattr(self.model, "text_projection", None), unlocked_layers)

    @staticmethod
    def _lock(tower: nn.Module, projection: nn.Module | None, unlocked_layers: int) -> None:
        # SigLIP keeps its projection ("head") inside the tower; CLIP beside it.
        tower.requires_grad_(False)
        if projection is not None:
            projection.requires_grad_(unlocked_layers > 0)
        if unlocked_layers > 0:
            for layer in list(tower.encoder.layers)[-unlocked_layers:]:
                layer.requires_grad_(True)
            for name, module in tower.named_children():
                if name.startswith(("post_", "final_", "head")):  # what follows the last layer
                    module.requires_grad_(True)

    def new_parameter_names(self) -> set[str]:
        """What `--lr` trains when finetuning: the projections into the shared space and the
        temperature (and SigLIP's bias), as in the OpenAI family; the towers train at `--tower_lr`."""
        heads = ("model.visual_projection.", "model.text_projection.", "model.logit_scale", "model.logit_bias")
        return {name for name, _ in self.named_parameters() if name.startswith(heads)}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=images).pooler_output

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        # No attention mask: CLIP's text tower is causal, so padding after the end token never
        # reaches the pooled end token; SigLIP was trained on max-length padding without a mask.
        return self.model.get_text_features(input_ids=tokens).pooler_output


def _image_spec(processor_config: dict) -> dict:
    size = processor_config.get("size") if processor_config.get("do_resize", True) else None
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = processor_config.get("crop_size") if processor_config.get("do_center_crop", False) else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    crop_hw = [int(crop["height"]), int(crop["width"])] if crop else None
    final = crop_hw or ([size["height"], size["width"]] if size and "height" in size else None)
    if final is None or final[0] != final[1]:
        raise ValueError(f"image processor settings {processor_config} do not give square images")
    return {
        "size": int(final[0]),
        "resize": {k: int(v) for k, v in size.items() if v is not None} if size else None,
        "crop": crop_hw,
        "resample": int(processor_config.get("resample", 3)),
        "mean": [float(m) for m in processor_config.get("image_mean", [0.5, 0.5, 0.5])],
        "std": [float(s) for s in processor_config.get("image_std", [0.5, 0.5, 0.5])],
    }


def _stable_config(config: dict) -> dict:
    return {
        key: _stable_config(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in VOLATILE_CONFIG_KEYS
    }


def hf_clip_spec(config, tokenizer, processor_config: dict, released: str) -> dict:
    """The self-describing spec of a transformers CLIP: its config, tokenizer files and preprocessing."""

    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{released} is a {config.model_type!r} model; supported HuggingFace types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    text_config = config.text_config
    embed_dim = getattr(config, "projection_dim", None) or text_config.hidden_size
    return {
        "spec_version": SPEC_VERSION,
        "family": FAMILY,
        "released": released,
        "architecture": released,
        "config": _stable_config(json.loads(config.to_json_string(use_diff=False))),
        "embed_dim": int(embed_dim),
        "text": {
            "context_length": int(text_config.max_position_embeddings),
            "tokenizer_files": _pack_tokenizer_files(tokenizer),
        },
        "image": _image_spec(processor_config),
    }


def image_transforms(spec: dict):
    # Training keeps the project's mild random crop; evaluation reproduces the processor exactly.
    image = spec["image"]
    train = make_image_transform(image["size"], image["mean"], image["std"], is_train=True)
    return train, HFImageTransform(image)


@register_family(FAMILY, transforms=image_transforms)
def build_hf_clip(spec: dict):
    """Random-init HFCLIP and its tokenizer, from a spec made by `hf_clip_spec`."""
    from transformers import AutoConfig, AutoModel

    config = dict(spec["config"])
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModel.from_config(config, dtype=torch.float32)
    tokenizer = _unpack_tokenizer(spec["text"]["tokenizer_files"])
    return HFCLIP(model), HFTokenizer(tokenizer, spec["text"]["context_length"])


def load_hf_clip(source: str, released: str):
    """(spec, HFCLIP with weights) from a save_pretrained folder or a hub id."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import cached_file

    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    processor_file = cached_file(source, "preprocessor_config.json")
    processor_config = json.loads(Path(processor_file).read_text(encoding="utf-8"))
    spec = hf_clip_spec(config, tokenizer, processor_config, released)
    model = AutoModel.from_pretrained(source, dtype=torch.float32)
    return spec, HFCLIP(model)
