"""A tiny random-weight SigLIP, built locally, for offline smoke runs and tests of the SigLIP family.

`CURATION_CLIP_MODEL=tiny-random-siglip` builds (once, fixed seed) a small `SiglipModel` with random weights, a
SentencePiece-style Unigram tokenizer trained with the `tokenizers` library on the bundled sample's French
titles (plus tiny_clip's built-in corpus; cased, NFKC, "▁" word-boundary marker, `</s>` appended, no attention
mask: what SigLIP's own SentencePiece tokenizer produces), and SigLIP's own image preprocessing (a plain resize
to a 256 x 256 square, mean = std = 0.5, as google/siglip-base-patch16-256-multilingual). It is saved with
`save_pretrained` and loaded by the encoder through exactly the code path used for a real SigLIP checkpoint
(config model_type "siglip" -> the SigLIP adapter: padding="max_length" to 64 tokens, last-position pooling).

Its scores are MEANINGLESS (random weights): everything that reports on it must say so (the build marker
carries the note; tiny_clip.is_tiny_random_dir recognises the directory wherever it is copied).

Like tiny-random, the random net must keep distinct sample items apart and near-copies together for the
dedup tests, so `_decollapse` reshapes the weights the same way (smooth DC-free patch filters, large position
embeddings, stronger attention/MLP paths), adapted to SigLIP's poolers: the image tower pools with an
attention head (centred through its MLP's output bias), the text tower takes the last position — a padding
token under max-length padding — so content reaches it only through attention, which is strengthened; the
final LayerNorm is centred at that position. Measured on the bundled sample: see tests/test_model_families.py
(`test_tiny_random_siglip_separates_distinct_items_and_keeps_copies_together`).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from . import settings, tiny_clip

TINY_DIR_NAME = "tiny-random-siglip-v1"
SEED = 6
MEANINGLESS_NOTE = (
    "tiny-random-siglip: random weights built locally for offline smoke runs; "
    "all its scores, similarities and rankings are MEANINGLESS"
)
_MARKER = "tiny_siglip_build.json"
if _MARKER not in tiny_clip.TINY_MARKERS:  # is_tiny_random_dir must recognise a copied tiny-random-siglip
    raise ImportError(f"{_MARKER} is missing from tiny_clip.TINY_MARKERS")
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", _MARKER)

VOCAB_SIZE = 3000
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 3
HEADS = 4
MAX_TEXT_LEN = 64  # SigLIP's published text length
IMAGE_SIZE = 256  # siglip-base-patch16-256(-multilingual)
PATCH = 32  # 8 x 8 patches (the real model: 16 x 16 of 16 px)
SAMPLE_TITLES = settings.REPO_ROOT / "data" / "sample" / "X_sample.csv"
# Letters the tokenizer always knows, whatever the corpus (French/European accents), so they never become <unk>.
_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                 "àâäçéèêëîïôöùûüÿœæÀÂÄÇÉÈÊËÎÏÔÖÙÛÜŸŒÆñÑßáíóúÁÍÓÚ"
                 ".,;:!?'\"()[]{}-_/\\&%+*=<>#@°€$£")


def default_dir() -> Path:
    return settings.model_cache_dir() / TINY_DIR_NAME


def is_complete(path: Path) -> bool:
    return all((Path(path) / name).is_file() for name in _REQUIRED)


def build_tiny_siglip(target_dir: Path | None = None) -> Path:
    """Build the tiny random SigLIP once and return its directory (idempotent, safe under concurrency)."""
    target = Path(target_dir) if target_dir is not None else default_dir()
    return tiny_clip.build_atomically(target, lambda out: _build_into(out), is_complete)


def corpus() -> list[str]:
    """Training text for the tokenizer: the built-in corpus + the bundled sample's titles (when present)."""
    lines = tiny_clip._CORPUS.splitlines()
    if SAMPLE_TITLES.is_file():
        with open(SAMPLE_TITLES, newline="", encoding="utf-8") as fh:
            lines += [row["designation"] for row in csv.DictReader(fh) if row.get("designation")]
    return lines


def _build_tokenizer(lines: list[str]):
    """A SentencePiece-style Unigram tokenizer (NFKC, "▁" word marker, `</s>` appended), built deterministically.

    The `tokenizers` Unigram trainer is not deterministic from one process to the next (its EM iterates hash
    maps), so the pieces come from its BPE trainer (deterministic) and each piece's Unigram score is its log
    frequency when the corpus is segmented with them, counted here in Python.
    """
    import math
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = "<pad>", "</s>", "<unk>"
    normalizer = normalizers.NFKC()
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe = Tokenizer(models.BPE(unk_token=unk))
    bpe.normalizer, bpe.pre_tokenizer = normalizer, pre
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[pad, eos, unk], show_progress=False,
                                  initial_alphabet=sorted(set(_ALPHABET) | {"▁"}), max_token_length=12)
    bpe.train_from_iterator(lines, trainer=trainer)
    vocab = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])  # (piece, id) in id order
    counts = Counter(piece for enc in bpe.encode_batch(lines) for piece in enc.tokens)
    total = sum(counts.values()) + len(vocab)
    specials = {pad, eos, unk}
    pieces = [(piece, 0.0 if piece in specials else math.log((counts[piece] + 1) / total)) for piece, _ in vocab]
    tok = Tokenizer(models.Unigram(pieces, unk_id=[p for p, _ in pieces].index(unk)))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    eos_id = tok.token_to_id(eos)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, eos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token=unk, model_max_length=MAX_TEXT_LEN,
        padding_side="right",
        model_input_names=["input_ids"],  # like SiglipTokenizer: no attention mask (trained attending to padding)
    )
    return fast, tok.token_to_id(pad), eos_id, tok.get_vocab_size()


def _build_into(out: Path) -> None:
    import torch
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    lines = corpus()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tokenizer, pad_id, eos_id, vocab = _build_tokenizer(lines)
        common = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS)
        config = SiglipConfig(
            text_config=dict(vocab_size=vocab, max_position_embeddings=MAX_TEXT_LEN, pad_token_id=pad_id,
                             eos_token_id=eos_id, bos_token_id=None, projection_size=HIDDEN, **common),
            vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH, **common),
        )
        model = SiglipModel(config).eval()
        with torch.no_grad():  # the published init: scale exp(log 10), bias -10
            model.logit_scale.fill_(float(torch.log(torch.tensor(10.0))))
            model.logit_bias.fill_(-10.0)
        _decollapse(model, tokenizer, lines)
        model.save_pretrained(out)
    # SigLIP's own preprocessing: plain resize to the square (no crop), rescale, mean = std = 0.5. The PIL
    # backend is named explicitly so that the numbers do not depend on whether torchvision is installed.
    SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    tokenizer.save_pretrained(out)
    tok_cfg = out / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_input_names"] = ["input_ids"]
    tok_cfg.write_text(json.dumps(cfg, indent=2) + "\n")
    corpus_hash = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    (out / _MARKER).write_text(json.dumps({"seed": SEED, "family": "siglip", "tokenizer_corpus_sha256": corpus_hash,
                                           "note": MEANINGLESS_NOTE}, indent=2) + "\n")


# Weight surgery (see the module docstring); values tuned on the bundled sample.
_POS_GAIN = 100.0
_VISION_OV_GAIN = 5.0
_VISION_FC_GAINS = (10.0, 3.0)
_TEXT_OV_GAIN = 10.0
_TEXT_FC_GAINS = (5.0, 3.0)
_TEXT_POS_GAIN = 1.0


def _synthetic_images(n: int, gen):
    import torch
    import torch.nn.functional as F

    low = torch.rand(n, 3, 4, 4, generator=gen)
    img = F.interpolate(low, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    white = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5) & \
        (torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen) < 0.6)
    img = torch.where(white, torch.ones_like(img), img)
    return (img - 0.5) / 0.5


def _decollapse(model, tokenizer, lines: list[str]) -> None:
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    vm, tm = model.vision_model, model.text_model
    with torch.no_grad():
        emb = vm.embeddings
        w = emb.patch_embedding.weight
        w.copy_(tiny_clip._smooth_dc_free_filters(w.shape[0], w.shape[-1], gen))
        emb.position_embedding.weight.mul_(_POS_GAIN)
        for layer in vm.encoder.layers:
            layer.self_attn.v_proj.weight.mul_(_VISION_OV_GAIN**0.5)
            layer.self_attn.out_proj.weight.mul_(_VISION_OV_GAIN**0.5)
            layer.mlp.fc1.weight.mul_(_VISION_FC_GAINS[0])
            layer.mlp.fc2.weight.mul_(_VISION_FC_GAINS[1])
        tm.embeddings.position_embedding.weight.mul_(_TEXT_POS_GAIN)
        for layer in tm.encoder.layers:
            layer.self_attn.v_proj.weight.mul_(_TEXT_OV_GAIN**0.5)
            layer.self_attn.out_proj.weight.mul_(_TEXT_OV_GAIN**0.5)
            layer.mlp.fc1.weight.mul_(_TEXT_FC_GAINS[0])
            layer.mlp.fc2.weight.mul_(_TEXT_FC_GAINS[1])

    # Vision: the attention-pooling head ends with `residual + mlp(layernorm(residual))`; shifting the MLP's
    # output bias by minus the mean pooled vector over the probe images centres the embeddings.
    with torch.inference_mode():
        pooled = vm(pixel_values=_synthetic_images(256, gen)).pooler_output
    with torch.no_grad():
        vm.head.mlp.fc2.bias.sub_(pooled.mean(0))

    # Text: centre the final LayerNorm at the pooled (last) position over probe texts padded as served, then
    # drop the head's bias, so the probe embeddings have zero mean.
    texts = lines + tiny_clip._synthetic_texts(100)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TEXT_LEN, return_tensors="pt")
    captured: dict = {}
    hook = tm.final_layer_norm.register_forward_hook(lambda _m, inp, _o: captured.__setitem__("x", inp[0]))
    try:
        with torch.inference_mode():
            tm(input_ids=enc["input_ids"])
    finally:
        hook.remove()
    tiny_clip._centre_layernorm(tm.final_layer_norm, captured["x"][:, -1].clone())
    with torch.no_grad():
        tm.head.bias.zero_()
