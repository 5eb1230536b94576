"""SigLIP and SigLIP 2 (``SiglipModel``, ``Siglip2Model``): sigmoid contrastive head, bidirectional text tower.

* Text: the pooled token is the *last position* (``last_hidden_state[:, -1]``), so a text must be padded to the
  model's maximum length (64 for the published checkpoints) exactly as in training — ``padding="max_length"``,
  which is what Hugging Face's SigLIP processors do — otherwise an embedding would depend on its batch. The
  attention mask is passed only when the checkpoint's tokenizer produces one (SigLIP's SentencePiece tokenizer
  does not: the model was trained attending to the padding; SigLIP 2's Gemma tokenizer does, left-padded).
* Images: SigLIP's own processor (plain resize to the model's square, e.g. 256 for
  siglip-base-patch16-256-multilingual, no crop; mean = std = 0.5). SigLIP 2 (NaFlex) keeps the aspect ratio:
  its processor returns flattened patches plus ``pixel_attention_mask`` and ``spatial_shapes``, which the image
  tower needs too; its "image size" is the side of a square of ``max_num_patches`` patches.
* Projection: SigLIP has no separate projection layer; the towers' heads map to ``hidden_size`` (768 for base).
"""
from __future__ import annotations

import math

from .base import ImageInputs, ModelAdapter, exp_scalar, _scalar


class SiglipAdapter(ModelAdapter):
    family = "siglip"
    model_types = ("siglip",)
    display = "SigLIP"
    pad_to_longest = False  # last-token pooling: always pad to the maximum length, as trained

    def model_class(self):
        from transformers import SiglipModel

        return SiglipModel

    def dim(self, model) -> int:
        text = int(getattr(model.config.text_config, "projection_size", 0) or model.config.text_config.hidden_size)
        vision = int(model.config.vision_config.hidden_size)
        if text != vision:
            raise ValueError(f"SigLIP towers disagree on the embedding size: text {text}, vision {vision}")
        return vision

    def score_scale(self, model) -> dict:
        return {"activation": "sigmoid", "logit_scale": exp_scalar(getattr(model, "logit_scale", None)),
                "logit_bias": _scalar(getattr(model, "logit_bias", None))}

    def text_tower(self, model):
        return [(model, "text_model")]  # the projection ("head") is inside the text transformer


class Siglip2Adapter(SiglipAdapter):
    family = "siglip2"
    model_types = ("siglip2",)
    display = "SigLIP 2"

    def model_class(self):
        from transformers import Siglip2Model

        return Siglip2Model

    def image_size(self, model, image_processor) -> int:
        patches = int(getattr(image_processor, "max_num_patches", 0) or 0)
        patch = int(getattr(image_processor, "patch_size", 0) or model.config.vision_config.patch_size)
        if patches > 0:
            return int(math.isqrt(patches)) * patch
        return int(math.isqrt(int(model.config.vision_config.num_patches))) * patch

    def preprocess(self, image_processor, images, **kwargs) -> ImageInputs:
        out = image_processor(images=list(images), return_tensors="pt", **kwargs)
        return {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"],
                "spatial_shapes": out["spatial_shapes"]}
