"""Optional int8 dynamic quantization of the text tower (any family), for query encoding on CPU.

Why: on a small CPU the text tower is ~90% of a search request. Dynamic int8 ``Linear`` layers make a
single ViT-B/32 query ~3x faster on this 2-core machine (measured: 54 → 17 ms) with query embeddings
within cosine ~0.998 of fp32. Only the query side changes: the corpus embeddings stay the pipeline's.

Guarded like the encoder's bf16 path, by capability and fidelity, never by timing (a timing probe flips with
the machine's load): on a CPU, under float32 (not bf16 autocast), with torch's dynamic quantization available,
a probe of real-looking queries must stay within ``MIN_COSINE`` of fp32, otherwise the fp32 modules are
restored. ``auto`` and ``on`` behave alike; ``off`` keeps fp32.
Activation scales are per batch, so a query's embedding would depend on what it is batched with:
the service encodes one query per forward when int8 is active (batching gains little with int8 anyway).

Family-neutral: the encoder names its text tower's modules (``text_tower_modules()``: CLIP = text_model +
text_projection, SigLIP / SigLIP 2 = text_model, whose head is the projection); each is swapped as a unit.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

log = logging.getLogger("api")

MIN_COSINE = 0.995
PROBE_QUERIES = [
    "armoire chambre enfants",
    "lampe torche étanche camping",
    "jeu vidéo console édition collector",
    "coussin décoratif en coton pour canapé",
    "Lot de 12 crayons de couleur pour enfants avec taille-crayon et trousse de transport",
    "wireless gaming controller",
    "x",
    "Piscine hors sol tubulaire ronde avec pompe de filtration, bâche de protection et échelle de sécurité " * 3,
]


def _probe(encoder: Any) -> np.ndarray:
    return np.concatenate([encoder.encode_texts([q]) for q in PROBE_QUERIES])  # one at a time, as served


def quantize_text_tower(encoder: Any, mode: str = "auto") -> str:
    """Swap the text tower's Linear layers for dynamic int8 ones if the probe allows; returns what was done."""
    if mode == "off":
        return "float32 (int8 text tower off: CURATION_API_TEXT_INT8=off)"
    model = getattr(encoder, "model", None)
    tower = getattr(encoder, "text_tower_modules", None)
    try:
        slots = list(tower()) if model is not None and callable(tower) else []
    except Exception as exc:  # noqa: BLE001 - an adapter that cannot name its tower
        return f"unchanged (no text tower to quantize: {type(exc).__name__}: {exc})"
    if not slots or not all(hasattr(owner, attr) for owner, attr in slots):
        return "unchanged (the encoder exposes no text tower modules)"
    if getattr(encoder, "device", "cpu") != "cpu":
        return "unchanged (int8 dynamic quantization is for CPU)"
    if getattr(encoder, "_autocast_dtype", None) is not None:
        # The encoder chose bf16 autocast (native bf16 CPU, faster on its probe): int8 dynamic Linear layers
        # take float32 activations only ("expected scalar type Float but found BFloat16").
        return "unchanged (the encoder runs bf16 autocast; int8 dynamic quantization needs float32)"
    import torch
    from torch import nn

    quantize_dynamic = getattr(getattr(torch, "ao", None), "quantization", None)
    quantize_dynamic = getattr(quantize_dynamic, "quantize_dynamic", None)
    if quantize_dynamic is None:
        return "float32 (this torch has no torch.ao.quantization.quantize_dynamic)"
    ref = _probe(encoder)
    originals = [getattr(owner, attr) for owner, attr in slots]

    def restore() -> None:
        for (owner, attr), orig in zip(slots, originals):
            setattr(owner, attr, orig)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notice pointing at torchao
            # wrapped in a Sequential so that a bare Linear (CLIP's text_projection) is swapped too
            swapped = [quantize_dynamic(nn.Sequential(orig), {nn.Linear}, dtype=torch.qint8)[0] for orig in originals]
            for (owner, attr), new in zip(slots, swapped):
                setattr(owner, attr, new)
            got = _probe(encoder)
        cos = float(np.min(np.sum(ref * got, axis=1)))
    except Exception as exc:  # noqa: BLE001 - any failure means fp32
        restore()
        log.warning("int8 text tower not used: %s", exc)
        return f"float32 (int8 failed: {type(exc).__name__}: {exc})"
    if not cos >= MIN_COSINE:
        why = f"int8 query embeddings drifted from fp32 (min cosine {cos:.4f} < {MIN_COSINE})"
        restore()
        log.info("int8 text tower not used: %s", why)
        return f"float32 ({why})"
    desc = f"int8 dynamic (probe min cosine to fp32 {cos:.4f})"
    log.info("text tower: %s", desc)
    return desc
