"""The self-describing checkpoint format: rebuild any variant's model from the file alone."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from clipsearch.durable import atomic_write
from clipsearch.models import ModelBundle, build_from_spec

# Key under which a checkpoint carries its model spec; Lightning checkpoints get it in on_save_checkpoint.
META_KEY = "clipsearch"
MODEL_PREFIX = "model."


def save_bundle(bundle: ModelBundle, path: str | Path, **extra) -> Path:
    """A model-only checkpoint in the same format training writes (tests, exports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {MODEL_PREFIX + key: value for key, value in bundle.model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict, META_KEY: {"spec": bundle.spec, **extra}}, buffer)
    return atomic_write(path, buffer.getbuffer())


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without unpickling code, and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model checkpoint not found: {path} (train one with 1_pretrain_our.sh, or pass --load_model=<file>)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for foreign files
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or META_KEY not in checkpoint or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a clipsearch checkpoint: it lacks the '{META_KEY}' model description "
            f"(found {keys}). Checkpoints written by this project's training scripts carry it."
        )
    return checkpoint


def load_bundle(path: str | Path) -> ModelBundle:
    """Rebuild the model a checkpoint describes and load its weights; returned in eval mode."""
    checkpoint = read_checkpoint(path)
    bundle = build_from_spec(checkpoint[META_KEY]["spec"])
    state_dict = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    missing, unexpected = bundle.model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the architecture it describes "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    bundle.model.eval()
    return bundle


def model_fingerprint(bundle: ModelBundle) -> str:
    """A short identity of architecture plus weights, stored beside embeddings to catch model mix-ups."""
    digest = hashlib.sha256()
    spec = {k: v for k, v in bundle.spec.items() if k != "text"}
    digest.update(json.dumps(spec, sort_keys=True).encode())
    text = {k: v for k, v in bundle.spec.get("text", {}).items() if k != "tokenizer_files"}
    digest.update(json.dumps(text, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in bundle.model.state_dict().items():
            values = tensor.detach().double()
            digest.update(f"{name}{tuple(tensor.shape)}{values.sum().item():.6e}{values.abs().sum().item():.6e}".encode())
    return digest.hexdigest()[:16]
