"""The model-family interface behind the encoder: one adapter per Hugging Face dual-encoder family.

The encoder (core/encoder.py) owns everything that does not depend on the architecture: device and precision
choice, the tokenizer lock, batching by length, out-of-memory halving, the image loaders, L2 normalisation and
the float32 output. An adapter owns what does: which ``transformers`` class loads the checkpoint, how images are
preprocessed (the tensors the image tower takes), how texts are tokenized and padded (as the family was trained),
how projected features are read, what the embedding dimension, image size and text length are, the score
scale of the contrastive head, and which modules make up the text tower (for the API's int8 quantization).
Adding a family = one module with a ``ModelAdapter`` subclass registered in ``models/__init__.py``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

ImageInputs = dict  # {"pixel_values": Tensor[n, ...], optional extra tensors with the batch first}


def features(out: Any, kind: str) -> torch.Tensor:
    """Projected features from get_*_features: a tensor (transformers 4) or an output object (transformers 5,
    projected vectors in ``pooler_output``; some models also name them ``image_embeds``/``text_embeds``)."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in (f"{kind}_embeds", "pooler_output"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected output type from get_{kind}_features: {type(out).__name__}")


class ModelAdapter:
    """Stateless description of one family; every method takes the loaded objects it needs."""

    family: str = ""
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter loads
    display: str = ""  # human name for logs
    # Whether a text's embedding is independent of how much padding follows it (then texts can be padded to the
    # longest in their batch); False = always pad to the maximum length, as the family was trained.
    pad_to_longest: bool = True

    # ------------------------------------------------------------------ loading
    def model_class(self):
        raise NotImplementedError

    def load(self, source: str, **kwargs) -> tuple[Any, Any, Any]:
        """(model, tokenizer, image_processor), all through from_pretrained (a Hub id or a local directory)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        model = self.model_class().from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        return model, tokenizer, image_processor

    # ------------------------------------------------------------------ shapes
    def dim(self, model) -> int:
        raise NotImplementedError

    def max_text_length(self, model, tokenizer) -> int:
        tok_max = int(getattr(tokenizer, "model_max_length", 0) or 0)
        pos_max = int(model.config.text_config.max_position_embeddings)
        return min(tok_max, pos_max) if 0 < tok_max < 1_000_000 else pos_max

    def image_size(self, model, image_processor) -> int:
        """Side of the square the image tower sees (the API shrinks uploads towards it)."""
        return int(model.config.vision_config.image_size)

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, image_processor, images: Sequence, **kwargs) -> ImageInputs:
        out = image_processor(images=list(images), return_tensors="pt", **kwargs)
        return {"pixel_values": out["pixel_values"]}

    def text_kwargs(self, max_length: int) -> dict:
        """Tokenizer arguments for a batch: padding as the family was trained, truncation at max_length."""
        return {"padding": True if self.pad_to_longest else "max_length", "truncation": True,
                "max_length": max_length}

    def uses_attention_mask(self, tokenizer) -> bool:
        """Feed the model what its own processor would: the mask only when the tokenizer produces one."""
        return "attention_mask" in (getattr(tokenizer, "model_input_names", None) or ["attention_mask"])

    # ------------------------------------------------------------------ forward
    def image_features(self, model, pixel_values: torch.Tensor, **extra) -> torch.Tensor:
        return features(model.get_image_features(pixel_values=pixel_values, **extra), "image")

    def text_features(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        return features(model.get_text_features(input_ids=input_ids, **kw), "text")

    # ------------------------------------------------------------------ reporting / quantization
    def score_scale(self, model) -> dict:
        """How the family turns a cosine into a training logit (for reports; search ranks by cosine)."""
        raise NotImplementedError

    def text_tower(self, model) -> list[tuple[Any, str]]:
        """(owner, attribute) slots of the modules that make up the text tower, projection included."""
        raise NotImplementedError


def _scalar(p) -> float | None:
    if p is None:
        return None
    return float(p.detach().float().reshape(-1)[0])


def exp_scalar(p) -> float | None:
    v = _scalar(p)
    return None if v is None else float(math.exp(v))


def slice_inputs(inputs: Mapping[str, torch.Tensor], a: int, b: int) -> ImageInputs:
    return {k: v[a:b] for k, v in inputs.items()}
