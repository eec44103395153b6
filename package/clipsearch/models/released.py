"""One door for every model-taking command: a clipsearch checkpoint or released CLIP weights -> ModelBundle."""
from __future__ import annotations

import copy
import difflib
import logging
import os
from pathlib import Path

import torch

from clipsearch.checkpoint import META_KEY, load_bundle
from clipsearch.model_reference import (
    ModelReference,
    ModelReferenceError,
    check_model_reference,
    parse_model_reference,
)
from clipsearch.models import ModelBundle, build_from_spec
from clipsearch.models.openai_clip import (
    OPENAI_RELEASES,
    _is_torchscript_archive,
    available_architectures,
    load_architecture_config,
    load_openai_weights,
    read_openai_state_dict,
)
from clipsearch.models.transforms import OPENAI_MEAN, OPENAI_STD

logger = logging.getLogger(__name__)

__all__ = ["ModelReferenceError", "check_model_reference", "is_clipsearch_checkpoint", "load_model"]

# Config keys that only size tensors; a known config with other keys may behave differently at equal shapes.
PLAIN_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
PLAIN_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers"}


def load_model(reference: str) -> ModelBundle:
    """The model `reference` names (see model_reference.EXAMPLES), in eval mode; ModelReferenceError if it cannot be had."""
    parsed = parse_model_reference(reference)
    loaders = {"file": _load_file, "hf_folder": _load_hf_clip, "hf_hub": _load_hf_clip, "open_clip": _load_open_clip}
    bundle = loaders[parsed.kind](parsed)
    bundle.model.eval()
    return bundle


def _with_weights(spec: dict, model: torch.nn.Module) -> ModelBundle:
    # Rebuilt from the spec alone, as a checkpoint is: what loads here loads the same after export.
    bundle = build_from_spec(spec)
    bundle.model.load_state_dict(model.state_dict())
    return bundle


# ---------------------------------------------------------------------------------------------
# Files: clipsearch checkpoints and OpenAI's releases
# ---------------------------------------------------------------------------------------------


def _peek(path: Path):
    # mmap: telling a checkpoint from a state dict reads the keys, not the tensors.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def is_clipsearch_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint this project wrote (a training run's or an export's)."""
    path = Path(path)
    if not path.is_file() or _is_torchscript_archive(path):
        return False
    try:
        content = _peek(path)
    except Exception:  # noqa: BLE001 - anything unreadable is simply not one of ours
        return False
    return isinstance(content, dict) and META_KEY in content


def _load_file(reference: ModelReference) -> ModelBundle:
    path = Path(reference.location)
    if not _is_torchscript_archive(path):
        try:
            content = _peek(path)
        except Exception as error:  # noqa: BLE001 - torch raises several types for foreign files
            raise ModelReferenceError(
                f"--load_model {reference.text} is neither a clipsearch checkpoint nor an OpenAI CLIP file "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            ) from None
        if isinstance(content, dict) and META_KEY in content:
            try:
                return load_bundle(path)
            except ValueError as error:
                raise ModelReferenceError(str(error)) from None
        if isinstance(content, dict) and {"path", "emb"} <= set(content):
            raise ModelReferenceError(
                f"--load_model {reference.text} is an embedding shard, not a model: pass the checkpoint that encoded "
                "it (e.g. models/<run>/best.ckpt) or released weights"
            )
        if not _looks_like_openai(content):
            raise ModelReferenceError(
                f"--load_model {reference.text} is neither a clipsearch checkpoint (it lacks '{META_KEY}') "
                "nor an OpenAI-format CLIP state dict (visual.*, token_embedding.weight, text_projection)"
            )
    return _load_openai_file(path, reference)


def _looks_like_openai(content) -> bool:
    state_dict = content.get("state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state_dict, dict):
        return False
    keys = {str(key).removeprefix("module.") for key in state_dict}
    return {"token_embedding.weight", "text_projection"} <= keys and any(k.startswith("visual.") for k in keys)


def _numbered_children(state_dict: dict, prefix: str) -> int:
    return len({key[len(prefix):].split(".", 1)[0] for key in state_dict if key.startswith(prefix)})


def openai_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """open_clip's config of the architecture an OpenAI-format state dict holds, read from tensor shapes.

    Head counts leave no trace in shapes: OpenAI's releases use 64-wide heads, which is assumed
    unless a known config (ours or open_clip's) matches every shape and says otherwise.
    """
    text_width = int(state_dict["ln_final.weight"].shape[0])
    text = {
        "context_length": int(state_dict["positional_embedding"].shape[0]),
        "vocab_size": int(state_dict["token_embedding.weight"].shape[0]),
        "width": text_width,
        "heads": max(1, text_width // 64),
        "layers": _numbered_children(state_dict, "transformer.resblocks."),
    }
    if "visual.proj" in state_dict:  # a ViT
        patch_size = int(state_dict["visual.conv1.weight"].shape[-1])
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {
            "image_size": patch_size * grid,
            "layers": _numbered_children(state_dict, "visual.transformer.resblocks."),
            "width": int(state_dict["visual.conv1.weight"].shape[0]),
            "patch_size": patch_size,
        }
    else:  # a ModifiedResNet: the attention pool sees the image at 1/32 of its size
        grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {
            "image_size": grid * 32,
            "layers": [_numbered_children(state_dict, f"visual.layer{stage}.") for stage in range(1, 5)],
            "width": int(state_dict["visual.layer1.0.conv1.weight"].shape[0]),
            "patch_size": None,
        }
    return {"embed_dim": int(state_dict["text_projection"].shape[1]), "vision_cfg": vision, "text_cfg": text}


def _matching_architecture(config: dict) -> str | None:
    """The known architecture with exactly these shapes (OpenAI's releases first), if any."""
    names = [name.replace("/", "-") for name in OPENAI_RELEASES] + available_architectures()
    for name in dict.fromkeys(names):
        known = load_architecture_config(name)
        vision, text = known.get("vision_cfg", {}), known.get("text_cfg", {})
        if set(known) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}:
            continue
        if set(vision) - PLAIN_VISION_KEYS or set(text) - PLAIN_TEXT_KEYS:
            continue
        same_vision = all(vision.get(key) == value for key, value in config["vision_cfg"].items())
        same_text = all(text.get(key) == value for key, value in config["text_cfg"].items() if key != "heads")
        if known["embed_dim"] == config["embed_dim"] and same_vision and same_text:
            return name
    return None


def _load_openai_file(path: Path, reference: ModelReference) -> ModelBundle:
    from clipsearch.models.openai_clip import openai_clip_spec

    try:
        config = openai_config_from_state_dict(read_openai_state_dict(path))
    except (KeyError, IndexError, ValueError) as error:
        raise ModelReferenceError(f"--load_model {reference.text}: not an OpenAI-format CLIP ({error})") from None
    architecture = _matching_architecture(config)
    if architecture is not None:
        spec = openai_clip_spec(architecture)
    else:
        spec = copy.deepcopy(openai_clip_spec(OPENAI_RELEASES[0]))
        spec.update(architecture="inferred", model_config=config, embed_dim=config["embed_dim"])
        spec["text"]["context_length"] = config["text_cfg"]["context_length"]
        spec["image"].update(size=config["vision_cfg"]["image_size"], mean=list(OPENAI_MEAN), std=list(OPENAI_STD))
    spec["released"] = f"openai:{path.name}"
    bundle = build_from_spec(spec)
    # The file is read a second time here; checking shapes and buffers lives in load_openai_weights.
    load_openai_weights(bundle.model, path, spec["architecture"])
    logger.info("OpenAI CLIP %s from %s", spec["architecture"], path)
    return bundle


# ---------------------------------------------------------------------------------------------
# open_clip tags and folders, HuggingFace CLIP
# ---------------------------------------------------------------------------------------------


def _offline_advice(reference: ModelReference, source: str) -> str:
    return (
        f"Where there is internet, run `python -m clipsearch.export --load_model {reference.label} --out model.ckpt` "
        f"and pass that file here, or download {source} and pass the folder"
    )


def _why(error: Exception, remote: bool = True) -> str:
    if remote and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "it is not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading"
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _load_open_clip(reference: ModelReference) -> ModelBundle:
    import open_clip

    from clipsearch.models.open_clip_family import load_open_clip

    name, tag = reference.location, reference.pretrained
    source = name
    if tag is not None:
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
            raise ModelReferenceError(
                f"--load_model {reference.text}: open_clip has no model {name!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()")
            )
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags:
            raise ModelReferenceError(
                f"--load_model {reference.text}: open_clip has no weights tagged {tag!r} for {name}; "
                f"its tags: {', '.join(tags) or 'none'}"
            )
        tag_config = open_clip.get_pretrained_cfg(name, tag)
        source = (
            f"https://huggingface.co/{tag_config['hf_hub'].rstrip('/')} into a folder (use open_clip:local-dir:<folder>)"
            if tag_config.get("hf_hub") else f"{tag_config.get('url')} (pass the file as --load_model <file>)"
        )
    try:
        # open_clip logs a failed download as an ERROR before raising; the one line below says it all.
        logging.disable(logging.ERROR)
        spec, model = load_open_clip(name, tag, reference.label)
    except Exception as error:  # noqa: BLE001 - hub, network and file errors all lead to the same advice
        raise ModelReferenceError(
            f"--load_model {reference.text}: could not load it: {_why(error, not name.startswith('local-dir:'))}. {_offline_advice(reference, source)}"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    return _with_weights(spec, model)


def _load_hf_clip(reference: ModelReference) -> ModelBundle:
    from clipsearch.models.hf_clip import load_hf_clip

    released = f"hf:{Path(reference.location).name}" if reference.kind == "hf_folder" else f"hf:{reference.location}"
    try:
        spec, model = load_hf_clip(reference.location, released)
    except (OSError, ValueError) as error:
        detail = _why(error, reference.kind == "hf_hub")
        advice = "" if reference.kind == "hf_folder" else " " + _offline_advice(reference, reference.location)
        raise ModelReferenceError(f"--load_model {reference.text}: {detail}.{advice}") from None
    return _with_weights(spec, model)
