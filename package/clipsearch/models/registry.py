"""Model families by name: each family module registers its builder; specs are rebuilt through it."""
from __future__ import annotations

from collections.abc import Callable

from clipsearch.models.bundle import ModelBundle
from clipsearch.models.transforms import make_image_transform

# Bumped when the meaning of a spec changes, so old checkpoints fail loudly instead of loading wrongly.
SPEC_VERSION = 1

_BUILDERS: dict[str, Callable] = {}
_TRANSFORMS: dict[str, Callable] = {}


def register_family(name: str, *aliases: str, transforms: Callable | None = None):
    """Decorator on `build(spec) -> (model, tokenizer)`; `transforms(spec) -> (train, eval)` when a
    family preprocesses otherwise than `make_image_transform` (e.g. a HuggingFace image processor)."""

    def register(build: Callable) -> Callable:
        for key in (name, *aliases):
            _BUILDERS[key] = build
            if transforms is not None:
                _TRANSFORMS[key] = transforms
        return build

    return register


def _default_transforms(spec: dict):
    image = spec["image"]
    return (
        make_image_transform(image["size"], image["mean"], image["std"], is_train=True),
        make_image_transform(image["size"], image["mean"], image["std"], is_train=False),
    )


def build_from_spec(spec: dict) -> ModelBundle:
    """Rebuild the architecture (random weights) that `spec` describes; the caller loads a state dict."""
    if spec.get("spec_version") != SPEC_VERSION:
        raise ValueError(
            f"model spec version {spec.get('spec_version')!r} is not supported (expected {SPEC_VERSION}); "
            "was this checkpoint written by another version of clipsearch?"
        )
    family = spec.get("family")
    if family not in _BUILDERS:
        raise ValueError(f"unknown model family {family!r} in model spec; known: {', '.join(sorted(_BUILDERS))}")
    model, tokenizer = _BUILDERS[family](spec)
    train_transform, eval_transform = _TRANSFORMS.get(family, _default_transforms)(spec)
    return ModelBundle(model, train_transform, eval_transform, tokenizer, spec)
