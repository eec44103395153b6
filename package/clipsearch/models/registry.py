"""Model families by name: each family module registers a builder, and a spec names its family."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clipsearch.models.bundle import SPEC_VERSION, ModelBundle
from clipsearch.models.transforms import make_image_transform

# spec -> (model with random weights, tokenizer); the caller loads a state dict.
FamilyBuilder = Callable[[dict], tuple[nn.Module, Callable]]

# spec -> (train transform, eval transform), for a family that preprocesses otherwise than
# `make_image_transform` (e.g. a HuggingFace image processor, whose crop floors where torchvision rounds).
TransformsBuilder = Callable[[dict], tuple[Callable, Callable]]

_BUILDERS: dict[str, FamilyBuilder] = {}
_TRANSFORMS: dict[str, TransformsBuilder] = {}
# Older names a family answers to, so checkpoints written under them keep loading.
_ALIASES: dict[str, str] = {}
# Families whose image tower takes any input size (convolutional towers), so they may encode
# at another size than they trained at.
_RESIZABLE: set[str] = set()


def register_family(
    name: str, *aliases: str, transforms: TransformsBuilder | None = None, resizable_image: bool = False
) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Decorator: `build(spec) -> (model, tokenizer)` builds specs whose "family" is `name` or an alias.

    `resizable_image`: the family's image tower may take other sizes than its spec's (checked by a
    forward pass for each model, since a family may hold both CNNs and fixed-grid ViTs).
    """

    def register(build: FamilyBuilder) -> FamilyBuilder:
        for key in (name, *aliases):
            if key in _BUILDERS or key in _ALIASES:
                raise ValueError(f"model family {key!r} is registered twice")
        _BUILDERS[name] = build
        if transforms is not None:
            _TRANSFORMS[name] = transforms
        _ALIASES.update(dict.fromkeys(aliases, name))
        if resizable_image:
            _RESIZABLE.add(name)
        return build

    return register


def _default_transforms(spec: dict) -> tuple[Callable, Callable]:
    image = spec["image"]
    return (
        make_image_transform(image["size"], image["mean"], image["std"], is_train=True),
        make_image_transform(image["size"], image["mean"], image["std"], is_train=False),
    )


def family_names() -> list[str]:
    return sorted(_BUILDERS)


def build_from_spec(spec: dict) -> ModelBundle:
    """Rebuild the architecture (random weights) that `spec` describes; the caller loads a state dict."""
    if spec.get("spec_version") != SPEC_VERSION:
        raise ValueError(
            f"model spec version {spec.get('spec_version')!r} is not supported (expected {SPEC_VERSION}); "
            "was this checkpoint written by another version of clipsearch?"
        )
    family = _ALIASES.get(spec.get("family"), spec.get("family"))
    build = _BUILDERS.get(family)
    if build is None:
        raise ValueError(f"unknown model family {spec.get('family')!r} in model spec; known: {', '.join(family_names())}")
    model, tokenizer = build(spec)
    train_transform, eval_transform = _TRANSFORMS.get(family, _default_transforms)(spec)
    return ModelBundle(
        model=model, train_transform=train_transform, eval_transform=eval_transform, tokenizer=tokenizer, spec=spec
    )


def with_image_size(bundle: ModelBundle, size: int) -> ModelBundle:
    """The same model and weights, encoding images at `size` px.

    Why: a CNN trained on random crops sees objects larger than a whole image at the same size
    shows them, and scores better encoded somewhat larger (FixRes, Touvron et al. 2019); the
    spec, and so the fingerprint, records the new size. Sizes it also averages over
    (`with_scale_average`) stay as they were.
    """
    family = _resizable_family(bundle)
    _check_encodes(bundle, size)
    spec = {**bundle.spec, "image": {**bundle.spec["image"], "size": int(size)}}
    spec.pop("scale_average", None)
    train_transform, eval_transform = _TRANSFORMS.get(family, _default_transforms)(spec)
    resized = ModelBundle(model=bundle.model, train_transform=train_transform, eval_transform=eval_transform,
                          tokenizer=bundle.tokenizer, spec=spec)
    resized.set_scale_average([extra for extra in bundle.image_views.extra_sizes if extra != int(size)])
    return resized


def with_scale_average(bundle: ModelBundle, sizes: list[int]) -> ModelBundle:
    """The same model, each image also embedded at `sizes` px (resized from the encoding size) and
    the unit embeddings of all sizes averaged (`ImageViews`); no sizes turns it off."""
    if sizes:
        _resizable_family(bundle)
    encoding_size = int(bundle.spec["image"]["size"])
    for size in sizes:
        if size == encoding_size:
            raise ValueError(f"{size} px is the size the model already encodes at; name other sizes")
        _check_encodes(bundle, size)
    spec = {**bundle.spec}
    averaged = ModelBundle(model=bundle.model, train_transform=bundle.train_transform,
                           eval_transform=bundle.eval_transform, tokenizer=bundle.tokenizer, spec=spec)
    averaged.set_scale_average(sizes)
    return averaged


def _resizable_family(bundle: ModelBundle) -> str:
    """The family, when its image tower may take other sizes (so far the pretrained-towers family's timm CNNs)."""
    family = _ALIASES.get(bundle.spec.get("family"), bundle.spec.get("family"))
    if family not in _RESIZABLE:
        raise ValueError(f"only 'our' CLIP (pretrained towers) encodes at another image size; this model is "
                         f"{bundle.spec.get('family')!r}, whose image tower is built for {bundle.spec.get('image', {}).get('size')} px")
    return family


def _check_encodes(bundle: ModelBundle, size: int) -> None:
    """A forward pass at `size` px, on the model's device: a timm ViT's fixed grid fails here, not at encoding time."""
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        with torch.no_grad():
            bundle.model.encode_image(torch.zeros(1, 3, size, size, device=next(bundle.model.parameters()).device))
    except Exception as error:  # noqa: BLE001 - any failure means the tower cannot take this size
        raise ValueError(f"the image tower {bundle.spec['image'].get('timm_name')!r} cannot encode {size} px images: "
                         f"{error}") from error
    finally:
        bundle.model.train(was_training)
