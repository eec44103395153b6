"""Model families and the contract they share; importing this registers every family."""
from __future__ import annotations

from clipsearch.models.bundle import ModelBundle
from clipsearch.models.registry import SPEC_VERSION, build_from_spec, register_family

# Each family module registers itself on import.
from clipsearch.models import openai_clip, our_clip  # noqa: E402, F401  isort: skip
from clipsearch.models import hf_clip, open_clip_family  # noqa: E402, F401  isort: skip

register_family("openai")(openai_clip.build_openai_clip)
register_family("our")(our_clip.build_our_clip)

__all__ = ["SPEC_VERSION", "ModelBundle", "build_from_spec", "register_family"]
