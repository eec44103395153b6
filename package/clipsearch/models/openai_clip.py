"""CLIP of OpenAI's architecture (via open_clip): specs from JSON configs, and loading OpenAI weight files."""
from __future__ import annotations

import copy
import json
import logging
import re
import zipfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from open_clip.transformer import VisionTransformer
from torch import nn

from clipsearch.models.bundle import SPEC_VERSION
from clipsearch.models.pooled_towers import encode_pooled_image, encode_pooled_text, image_fits, text_fits
from clipsearch.models.registry import register_family
from clipsearch.models.transforms import OPENAI_MEAN, OPENAI_STD

logger = logging.getLogger(__name__)

# A transformer block (`resblocks.<i>.`, from 0) or a ModifiedResNet stage (`visual.layer<k>.`, from 1).
BLOCK_INDEX = re.compile(r"(?:\.resblocks\.|^visual\.layer)(\d+)\.")
# What sits above the last block of each tower: final norms, a ResNet's attention pool, projections.
TOWER_TOPS = ("ln_final.", "visual.ln_post.", "visual.attnpool.", "text_projection", "visual.proj", "logit_scale")

# Small architectures of ours (CPU runs, tests) live beside open_clip's own configs, as data.
LOCAL_CONFIG_DIR = Path(__file__).parent / "configs"
# The four OpenAI releases users finetune; any other open_clip or local config name also works.
OPENAI_RELEASES = ("ViT-B/32", "RN50", "RN101", "RN50x4")


def canonical_name(name: str) -> str:
    """OpenAI writes 'ViT-B/32', open_clip 'ViT-B-32'; accept both."""
    return name.replace("/", "-")


def available_architectures() -> list[str]:
    local = sorted(p.stem for p in LOCAL_CONFIG_DIR.glob("*.json"))
    return local + open_clip.list_models()


def load_architecture_config(name: str) -> dict:
    local = LOCAL_CONFIG_DIR / f"{canonical_name(name)}.json"
    if local.is_file():
        return json.loads(local.read_text())
    config = open_clip.get_model_config(canonical_name(name))
    if config is None:
        raise ValueError(
            f"unknown CLIP architecture {name!r}; choose one of {', '.join(OPENAI_RELEASES)} "
            f"or a config name from: {', '.join(available_architectures())}"
        )
    return copy.deepcopy(config)


def openai_clip_spec(
    name: str,
    context_length: int | None = None,
    image_size: int | None = None,
    quick_gelu: bool = True,
) -> dict:
    """The self-describing spec of an open_clip CLIP; `None` sizes keep the architecture's defaults.

    quick_gelu defaults to True because OpenAI's released weights were trained with it; a
    from-scratch run may turn it off for the slightly faster nn.GELU.
    """
    config = load_architecture_config(name)
    if context_length is not None:
        config["text_cfg"]["context_length"] = int(context_length)
    if image_size is not None:
        config["vision_cfg"]["image_size"] = int(image_size)
    return {
        "spec_version": SPEC_VERSION,
        "family": "openai",
        "architecture": canonical_name(name),
        "model_config": config,
        "quick_gelu": bool(quick_gelu),
        "embed_dim": int(config["embed_dim"]),
        "text": {"context_length": int(config["text_cfg"]["context_length"]), "tokenizer": "openai-bpe"},
        "image": {"size": int(config["vision_cfg"]["image_size"]), "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }


class QuickGELU(nn.Module):
    """OpenAI's activation x * sigmoid(1.702 x), computed as SiLU(1.702 x) / 1.702.

    The same function (up to float rounding), but SiLU is one kernel forward and one backward,
    where open_clip's form runs three and keeps two activations of every MLP for the backward
    pass instead of one.
    """

    # pooled_towers.py folds this scale into the MLP's weights instead of scaling activations.
    silu_scale = 1.702

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x * 1.702) / 1.702  # a literal: TorchScript compiles this forward (OpenAI archives)


class OpenAICLIP(open_clip.CLIP):
    """open_clip's CLIP, telling the trainer which of its parameters start untrained."""

    # Set by `load_openai_weights`; a model pretrained from scratch has no pretrained weights at all.
    # Unannotated on purpose: a class annotation here would hide open_clip's `output_dict: Final`
    # from TorchScript, which OpenAI-format archives are written with.
    towers_pretrained = False

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's text features, computed only as far as the batch's longest caption (pooled_towers.py)."""
        if not text_fits(self):
            return super().encode_text(text, normalize)
        features = encode_pooled_text(self, text)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's image features; a ViT's last block runs at its class token only (pooled_towers.py)."""
        if not image_fits(self.visual):
            return super().encode_image(image, normalize)
        features = encode_pooled_image(self.visual, image)
        return F.normalize(features, dim=-1) if normalize else features

    def __prepare_scriptable__(self) -> open_clip.CLIP:
        """What torch.jit.script compiles: open_clip's own CLIP over the same weights, since TorchScript
        cannot follow the pooled forward passes (OpenAI-format archives are scripted models)."""
        plain = copy.copy(self)  # shares parameters and buffers
        plain.__class__ = open_clip.CLIP
        return plain

    def whole_batch_on_cpu(self) -> bool:
        """A ViT trains its whole batch at once on a CPU (train_config.CPU_TRAIN_IMAGE_SLICE); a ResNet in slices."""
        return isinstance(self.visual, VisionTransformer)

    def new_parameter_names(self) -> set[str]:
        """From scratch, every parameter; finetuning released weights, the projections into the shared
        space and the temperature (text_projection, visual.proj, logit_scale), so that `--lr` and
        `--tower_lr` mean the same as in the pretrained-towers family (the door's --tower_lr
        defaults to --lr, which keeps the whole model at one rate)."""
        names = {name for name, _ in self.named_parameters()}
        if not self.towers_pretrained:
            return names
        return names & {"text_projection", "visual.proj", "logit_scale"}

    def tower_depths(self) -> dict[str, int]:
        """Each parameter's depth below the top of its tower, for --layer_decay: the last transformer
        block with its final norm (or a ResNet's attention pool) is 0, the embeddings or stem the
        deepest; the projections count as top."""
        visual = self.visual
        if hasattr(visual, "attnpool"):  # ModifiedResNet: stem, layer1..layer4, attention pool
            image_levels, image_offset = 5, 0
        else:
            image_levels, image_offset = len(visual.transformer.resblocks), 1
        text_levels = len(self.transformer.resblocks)
        depths = {}
        for name, _ in self.named_parameters():
            levels, offset = (image_levels, image_offset) if name.startswith("visual.") else (text_levels, 1)
            block = BLOCK_INDEX.search(name)
            if block:
                depths[name] = levels - offset - int(block.group(1))
            elif name.startswith(TOWER_TOPS):
                depths[name] = 0
            else:  # token and position embeddings, class token, patch embedding and ln_pre, or ResNet stem
                depths[name] = levels
        return depths


@register_family("openai")
def build_openai_clip(spec: dict):
    """Random-init open_clip CLIP and its BPE tokenizer, from a spec made by `openai_clip_spec`."""
    config = spec["model_config"]
    model = OpenAICLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=config["vision_cfg"],
        text_cfg=config["text_cfg"],
        quick_gelu=spec["quick_gelu"],
    )
    for block in model.modules():  # open_clip's QuickGELU modules, in every MLP of both towers
        mlp = getattr(block, "mlp", None)
        if isinstance(getattr(mlp, "gelu", None), open_clip.transformer.QuickGELU):
            mlp.gelu = QuickGELU()
    if isinstance(config["vision_cfg"]["layers"], list | tuple):
        # ResNet towers: NHWC convolutions run about twice as fast on the CPU (see image_tower.py).
        model.visual.to(memory_format=torch.channels_last)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=spec["text"]["context_length"])
    return model, tokenizer


def _is_torchscript_archive(path: Path) -> bool:
    # OpenAI's released .pt files are TorchScript zips (they carry code/ and constants.pkl).
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in archive.namelist())


def read_openai_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict from OpenAI's TorchScript archive, a plain state dict, or a {'state_dict': ...} file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    if _is_torchscript_archive(path):
        # torch.jit.load runs no pickled Python: TorchScript code is interpreted by torch itself.
        state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state_dict.pop(key, None)
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises several types for non-checkpoints
            raise ValueError(f"{path} is not a readable CLIP checkpoint ({type(error).__name__}: {error})") from error
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path} holds no state dict")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def load_openai_weights(model: OpenAICLIP, path: str | Path, architecture: str) -> None:
    """Load OpenAI-format weights into `model`, resizing position embeddings if sizes were changed."""
    state_dict = read_openai_state_dict(path)
    state_dict = {key: value.float() for key, value in state_dict.items()}  # fp32 master weights
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    if "logit_scale" in state_dict and state_dict["logit_scale"].shape != model.logit_scale.shape:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    expected = model.state_dict()
    # TorchScript archives also carry buffers that eager modules keep out of their state dict.
    non_persistent = {name for name, _ in model.named_buffers()} - set(expected)
    state_dict = {key: value for key, value in state_dict.items() if key not in non_persistent}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not hold {architecture} weights: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]})"
        )
    model.load_state_dict(state_dict)
    model.towers_pretrained = True
    logger.info("loaded %s weights from %s", architecture, path)
