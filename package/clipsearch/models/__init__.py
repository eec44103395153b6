"""CLIP model families behind one registry: `build_from_spec` rebuilds whichever family a spec names."""
# One line per family: importing a family module registers it.
import clipsearch.models.hf_clip  # noqa: F401
import clipsearch.models.open_clip_family  # noqa: F401
import clipsearch.models.openai_clip  # noqa: F401
import clipsearch.models.pretrained_towers  # noqa: F401
from clipsearch.models.bundle import SPEC_VERSION, ImageViews, ModelBundle, embed_images, model_device
from clipsearch.models.registry import build_from_spec, register_family

__all__ = ["SPEC_VERSION", "ImageViews", "ModelBundle", "build_from_spec", "embed_images", "model_device", "register_family"]
