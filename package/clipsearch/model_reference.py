"""What `--load_model` may name, told apart without importing torch so that flags fail at once."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from clipsearch.defaults import DEFAULT_OUTPUTS_DIR, in_project
from clipsearch.errors import UserError

# The four OpenAI releases, found as files where finetuning looks for them too.
OPENAI_SHORT_NAMES = ("ViT-B/32", "RN50", "RN101", "RN50x4")
OPENAI_WEIGHTS_DIR = Path(in_project("models/openai"))
OPEN_CLIP_PREFIX = "open_clip:"
OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")
WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".npz")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# OpenAI's naming (ViT-L/14, ViT-L/14@336px, RN50x16) would otherwise read as a hub id.
OPENAI_STYLE_NAME = re.compile(r"^(ViT-\w+/\d+(@\d+px)?|RN\d+(x\d+)?)$")
EXAMPLES = (
    "a clipsearch checkpoint, an OpenAI CLIP .pt file, one of "
    f"{', '.join(OPENAI_SHORT_NAMES)} (files in {OPENAI_WEIGHTS_DIR}/), open_clip:<model>/<tag> "
    "(e.g. open_clip:ViT-B-32/laion2b_s34b_b79k), open_clip:local-dir:<folder>, open_clip:hf-hub:<repo>, "
    "or a HuggingFace CLIP folder or hub id (e.g. openai/clip-vit-base-patch32)"
)
HELP = (
    f"the model: {EXAMPLES}. OpenAI's TorchScript archives are opened with torch.jit.load, which is not "
    "safe on untrusted files: use archives from OpenAI or open_clip only"
)


class ModelReferenceError(UserError, ValueError):
    """A --load_model value that names nothing loadable here (a ValueError too, for older callers)."""


@dataclass(frozen=True)
class ModelReference:
    kind: str  # "file", "hf_folder", "hf_hub" or "open_clip"
    location: str  # a path, a hub id, or an open_clip model name (possibly with its schema)
    pretrained: str | None = None  # the open_clip tag
    text: str = ""

    @property
    def label(self) -> str:
        """How records name this model: the absolute path of a local file, else the reference itself."""
        if self.kind in ("file", "hf_folder"):
            return os.path.abspath(self.location)
        if self.kind == "open_clip":
            return OPEN_CLIP_PREFIX + self.location + (f"/{self.pretrained}" if self.pretrained else "")
        return self.location


def canonical_name(name: str) -> str:
    return name.replace("/", "-")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _check_hub_cached(repo_id: str, filename: str, reference: str) -> None:
    """Offline, a hub id must already be in the local cache; say what to provide if it is not."""
    if not _hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return
    raise ModelReferenceError(
        f"--load_model {reference}: {repo_id} is on the HuggingFace hub, which HF_HUB_OFFLINE=1 keeps us from "
        f"reaching, and it is not in the local cache. Where there is internet, run `python -m clipsearch.export "
        f"--load_model {reference} --out model.ckpt` (or download {repo_id} into a folder) and pass that file or folder"
    )


def _open_clip_reference(text: str, rest: str) -> ModelReference:
    if rest.startswith("local-dir:"):
        folder = Path(os.path.expanduser(rest[len("local-dir:"):]))
        if not (folder / "open_clip_config.json").is_file():
            raise ModelReferenceError(
                f"--load_model {text}: {folder} holds no open_clip_config.json; an open_clip local-dir folder "
                "has that file and the weights (open_clip_model.safetensors or open_clip_pytorch_model.bin)"
            )
        return ModelReference("open_clip", f"local-dir:{folder.resolve()}", None, text)
    if rest.startswith("hf-hub:"):
        repo_id = rest[len("hf-hub:"):]
        if not HUB_ID.match(repo_id):
            raise ModelReferenceError(f"--load_model {text}: expected hf-hub:<organisation>/<repository>")
        _check_hub_cached(repo_id, "open_clip_config.json", text)
        return ModelReference("open_clip", rest, None, text)
    name, _, tag = rest.rpartition("/")
    if not name or not tag:
        raise ModelReferenceError(
            f"--load_model {text}: expected open_clip:<model>/<pretrained tag>, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k"
        )
    return ModelReference("open_clip", canonical_name(name), tag, text)


def parse_model_reference(reference: str) -> ModelReference:
    """Classify a --load_model value, checking what can be checked without torch (files, the hub cache)."""
    text = str(reference).strip()
    if not text:
        raise ModelReferenceError(f"--load_model is empty; pass {EXAMPLES}")
    if text.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_reference(text, text[len(OPEN_CLIP_PREFIX):])
    if text.startswith(OPEN_CLIP_SCHEMAS):
        return _open_clip_reference(text, text)
    if text in OPENAI_SHORT_NAMES or text in map(canonical_name, OPENAI_SHORT_NAMES):
        path = OPENAI_WEIGHTS_DIR / f"{canonical_name(text)}.pt"
        if not path.is_file():
            raise ModelReferenceError(
                f"--load_model {text}: OpenAI's {canonical_name(text)}.pt is not at {path}; put the file there, or "
                f"pass --load_model open_clip:{canonical_name(text)}/openai to download it where there is internet"
            )
        return ModelReference("file", str(path), None, text)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return ModelReference("file", str(path), None, text)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelReference("hf_folder", str(path), None, text)
        if (path / "open_clip_config.json").is_file():
            return ModelReference("open_clip", f"local-dir:{path.resolve()}", None, text)
        inside = next((str(path / name) for name in ("best.ckpt", "last.ckpt") if (path / name).is_file()), None)
        hint = f"; did you mean {inside}?" if inside else ""
        raise ModelReferenceError(
            f"--load_model {text} is a folder without config.json (HuggingFace) or open_clip_config.json "
            f"(open_clip){hint}"
        )
    looks_like_path = text.endswith(WEIGHT_SUFFIXES) or text.startswith(("/", ".", "~")) or text.count("/") > 1
    if looks_like_path:
        raise ModelReferenceError(
            f"--load_model {text}: no such file. Train a model first (bash 1_pretrain_our.sh), or pass "
            "released weights, e.g. --load_model open_clip:ViT-B-32/laion2b_s34b_b79k"
        )
    if OPENAI_STYLE_NAME.match(text):
        raise ModelReferenceError(
            f"--load_model {text}: unknown model name; the short names are {', '.join(OPENAI_SHORT_NAMES)} "
            f"(OpenAI's files in {OPENAI_WEIGHTS_DIR}/); for other releases use e.g. "
            f"open_clip:{canonical_name(text).replace('@', '-')}/openai"
        )
    if HUB_ID.match(text):
        _check_hub_cached(text, "config.json", text)
        return ModelReference("hf_hub", text, None, text)
    raise ModelReferenceError(f"--load_model {text}: unknown model name; pass {EXAMPLES}")


def check_model_reference(reference: str) -> None:
    """Raise ModelReferenceError unless `reference` names something `load_model` can try (no torch imported)."""
    parse_model_reference(reference)


def model_label(reference: str) -> str:
    """How model.json and results name a model: a local file's absolute path, else the reference."""
    try:
        return parse_model_reference(reference).label
    except ModelReferenceError:
        return str(reference)


def results_stem(reference: str) -> Path:
    """Results about a model live beside its file; a hub or open_clip model gets outputs/<its name>."""
    parsed = parse_model_reference(reference)
    if parsed.kind in ("file", "hf_folder"):
        return Path(parsed.location)
    safe = re.sub(r"[^\w.-]+", "_", parsed.label.removeprefix(OPEN_CLIP_PREFIX)).strip("_")
    return Path(DEFAULT_OUTPUTS_DIR) / (safe + ".model")
