"""Model families: which adapter loads a checkpoint, chosen from its config's ``model_type``."""
from __future__ import annotations

from .base import ModelAdapter, features
from .clip import ClipAdapter
from .siglip import Siglip2Adapter, SiglipAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (ClipAdapter(), SiglipAdapter(), Siglip2Adapter())
FAMILIES: tuple[str, ...] = tuple(a.family for a in ADAPTERS)


class UnsupportedModelError(ValueError):
    """The checkpoint is not a dual encoder of a supported family."""


def adapter_for_model_type(model_type: str | None) -> ModelAdapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported image-text dual encoder (supported: {supported}); "
        "a new family is one adapter in curation_dagster/core/models/")


def adapter_for_family(family: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise UnsupportedModelError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def detect_adapter(source: str, **kwargs) -> ModelAdapter:
    """The adapter for a checkpoint (Hub id or local directory), from its config.json's model_type."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **kwargs)
    return adapter_for_model_type(getattr(config, "model_type", None))


__all__ = ["ADAPTERS", "FAMILIES", "ModelAdapter", "UnsupportedModelError", "adapter_for_family",
           "adapter_for_model_type", "detect_adapter", "features"]
