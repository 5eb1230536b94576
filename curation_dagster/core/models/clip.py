"""CLIP (``CLIPModel``): causal text tower pooled at the first end-of-text token, softmax contrastive head.

Texts are padded to the longest in their batch: under the causal mask the pooled token never sees the padding
that follows it, so padding never changes a text's embedding (tests/test_encoder.py checks it). Images: the
checkpoint's CLIPImageProcessor (resize shortest side, centre crop, CLIP mean/std).
"""
from __future__ import annotations

from .base import ModelAdapter, exp_scalar


class ClipAdapter(ModelAdapter):
    family = "clip"
    model_types = ("clip",)
    display = "CLIP"
    pad_to_longest = True

    def model_class(self):
        from transformers import CLIPModel

        return CLIPModel

    def dim(self, model) -> int:
        return int(model.config.projection_dim)

    def score_scale(self, model) -> dict:
        return {"activation": "softmax", "logit_scale": exp_scalar(getattr(model, "logit_scale", None)),
                "logit_bias": None}

    def text_tower(self, model):
        return [(model, "text_model"), (model, "text_projection")]
