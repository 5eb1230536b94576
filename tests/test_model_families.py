"""Model families behind one encoder: CLIP, SigLIP (tiny-random-siglip) and SigLIP 2 (a tiny NaFlex model built
here), each loaded from a save_pretrained directory through the same DualEncoder.load / from_pretrained path.

Also: the family comes from config.json's model_type, the cache identity and describe() carry it, SigLIP's
own preprocessing and max-length padding are what reaches the model, tiny-random-siglip separates the
bundled sample like tiny-random does, and the evaluation-report comparison table.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from curation_dagster.core import settings, tiny_clip, tiny_siglip
from curation_dagster.core.encoder import ClipEncoder, DualEncoder, ModelLoadError
from curation_dagster.core.models import (
    FAMILIES,
    UnsupportedModelError,
    adapter_for_family,
    adapter_for_model_type,
)
from curation_dagster.core.report_compare import compare_reports_dir
from test_encoder import _reencoded  # the same re-encoded copy as tiny-random's quality test

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
IMAGES = sorted((SAMPLE / "images" / "image_train").glob("*.jpg"))


@pytest.fixture(scope="module")
def sig() -> DualEncoder:
    return DualEncoder.load(settings.TINY_RANDOM_SIGLIP, "cpu", precision="fp32")


@pytest.fixture(scope="module")
def designations() -> list[str]:
    return pl.read_csv(SAMPLE / "X_sample.csv", infer_schema=False)["designation"].to_list()


def _unit_float32(a: np.ndarray, n: int, dim: int) -> None:
    assert a.dtype == np.float32 and a.shape == (n, dim) and np.isfinite(a).all()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ family choice
def test_family_is_chosen_from_the_config_model_type(tmp_path):
    assert FAMILIES == ("clip", "siglip", "siglip2")
    assert adapter_for_model_type("clip").family == "clip"
    assert adapter_for_model_type("siglip").family == "siglip"
    assert adapter_for_model_type("siglip2").family == "siglip2"
    assert adapter_for_family("siglip2").model_types == ("siglip2",)
    with pytest.raises(UnsupportedModelError, match="bert"):
        adapter_for_model_type("bert")
    assert ClipEncoder is DualEncoder  # the historical name still works everywhere
    # A checkpoint of an unsupported architecture fails at once, naming the supported families.
    from transformers import BertConfig

    d = tmp_path / "bert"
    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(d)
    with pytest.raises(ModelLoadError, match=r"model_type 'bert'.*clip, siglip, siglip2"):
        DualEncoder.load(str(d), "cpu")


# ----------------------------------------------------------------------------------------- tiny-random-siglip
def test_tiny_random_siglip_is_built_and_loaded_through_from_pretrained(sig):
    built = tiny_siglip.build_tiny_siglip()
    assert built == settings.model_cache_dir() / tiny_siglip.TINY_DIR_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (built / name).is_file(), name
    assert json.loads((built / "config.json").read_text())["model_type"] == "siglip"
    assert tiny_clip.resolve_model_source("tiny-random-siglip") == (str(built), True)
    assert tiny_clip.is_tiny_random_dir(built)
    assert sig.source == str(built.resolve()) and sig.family == "siglip"
    assert type(sig.model).__name__ == "SiglipModel"
    assert sig.meaningless and sig.model_name == "tiny-random-siglip"
    d = sig.describe()
    assert d["family"] == "siglip" and "MEANINGLESS" in d["note"] and "siglip" in d["note"]
    assert d["score_scale"]["activation"] == "sigmoid" and d["score_scale"]["logit_bias"] == pytest.approx(-10.0)
    assert sig.dim == tiny_siglip.HIDDEN and sig.image_size == 256 and sig.max_text_length == 64
    assert sig.model_identity.startswith("tiny-random-siglip@local:") and sig.model_identity.endswith("#siglip")


def test_tiny_siglip_build_is_deterministic(sig, tmp_path):
    built = tiny_siglip.build_tiny_siglip()
    other = tiny_siglip.build_tiny_siglip(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (built / name).read_bytes(), name


def test_cache_identity_includes_the_family(sig, tmp_path):
    clip = DualEncoder.load(settings.TINY_RANDOM, "cpu", precision="fp32")
    assert clip.family == "clip" and clip.model_identity.endswith("#clip")
    assert clip.describe()["family"] == "clip" and clip.describe()["score_scale"]["activation"] == "softmax"
    assert sig.model_identity != clip.model_identity
    # a copied tiny-random-siglip stays flagged meaningless, with its own note, wherever it lives
    copy = tmp_path / "my-siglip"
    shutil.copytree(tiny_siglip.build_tiny_siglip(), copy)
    local = DualEncoder.load(str(copy), "cpu", precision="fp32")
    assert local.meaningless and local.family == "siglip" and "tiny-random-siglip" in local.describe()["note"]
    np.testing.assert_array_equal(local.encode_images(IMAGES[:2]), sig.encode_images(IMAGES[:2]))


def test_siglip_uses_its_own_image_preprocessing(sig):
    """SigLIP: a plain resize to 256 x 256 (no centre crop), then (x/255 - 0.5) / 0.5 — not CLIP's crop + mean/std."""
    with Image.open(IMAGES[3]) as im:
        pil = im.convert("RGB").resize((500, 300))  # not square: a crop would drop the sides
    pixels = sig._preprocess([pil])["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 256, 256)
    expected = (np.asarray(pil.resize((256, 256), Image.BICUBIC), dtype=np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, atol=0.02)
    assert float(pixels.min()) >= -1.0001 and float(pixels.max()) <= 1.0001


def test_siglip_texts_are_padded_to_max_length_without_a_mask(sig, designations, monkeypatch):
    seen = []
    real = sig._text_forward

    def spy(ids, mask):
        seen.append((tuple(ids.shape), mask))
        return real(ids, mask)

    monkeypatch.setattr(sig, "_text_forward", spy)
    texts = [designations[0], "x", designations[1] * 3, designations[2]]
    t = sig.encode_texts(texts, batch_size=2)
    _unit_float32(t, 4, sig.dim)
    assert seen and all(shape[1] == 64 and mask is None for shape, mask in seen)  # max_length, as trained
    one_by_one = np.concatenate([sig.encode_texts([s]) for s in texts])
    np.testing.assert_allclose(t, one_by_one, atol=1e-5)  # batch composition never changes a text
    # Why max_length matters: SigLIP pools the last position, so padding to the longest would change a text.
    enc = sig.tokenizer(["lampe torche"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        short = torch.nn.functional.normalize(real(enc["input_ids"], None), dim=-1).numpy()
    assert float(np.sum(short * sig.encode_texts(["lampe torche"]))) < 0.999


def test_siglip_output_contract(sig, designations):
    a = sig.encode_images(IMAGES[:5], batch_size=2)
    _unit_float32(a, 5, sig.dim)
    np.testing.assert_allclose(sig.encode_images([IMAGES[3], IMAGES[0]], batch_size=1), a[[3, 0]], atol=1e-5)
    with Image.open(IMAGES[1]) as im:
        np.testing.assert_allclose(sig.encode_pil([im.copy()]), a[[1]], atol=1e-5)
    head = " ".join(f"mot{i}" for i in range(200))
    x, y = sig.encode_texts([head + " une fin", head + " une tout autre fin"])
    np.testing.assert_allclose(x, y, atol=1e-6)  # truncated at 64 tokens
    assert sig.encode_texts([]).shape == (0, sig.dim) and sig.encode_images([]).shape == (0, sig.dim)
    again = DualEncoder.load("tiny-random-siglip", "cpu", precision="fp32")
    assert again.model_identity == sig.model_identity
    np.testing.assert_array_equal(again.encode_texts(designations[:3]), sig.encode_texts(designations[:3]))


def test_tiny_random_siglip_separates_distinct_items_and_keeps_copies_together(sig, designations):
    """Same bar as tiny-random (tests/test_encoder.py): dedup on tiny-random-siglip neither merges distinct
    sample items nor misses re-encoded copies (measured: image p99 0.70, max 0.93; copies min 0.998; text p99
    0.59, max 0.90)."""
    paths = IMAGES[:80]
    a = sig.encode_images(paths, num_workers=2)
    sims = (a @ a.T)[np.triu_indices(len(a), 1)]
    assert np.quantile(sims, 0.99) < 0.9 and sims.mean() < 0.5
    assert (sims > 0.95).sum() <= 1
    copies = sig.encode_pil([_reencoded(p) for p in paths])
    assert np.sum(a * copies, axis=1).min() > 0.97

    t = sig.encode_texts(designations[:300])
    tsims = (t @ t.T)[np.triu_indices(len(t), 1)]
    assert np.quantile(tsims, 0.99) < 0.9 and tsims.max() < 0.97


def test_siglip_precision_guard_and_oom_halving(sig, monkeypatch):
    monkeypatch.setattr(DualEncoder, "_probe_cosine", staticmethod(lambda ref, got: 1.0))
    bf16 = DualEncoder.load("tiny-random-siglip", "cpu", precision="bf16")
    assert bf16.precision == "bf16" and bf16.model_identity.endswith("#siglip|bf16")
    _unit_float32(bf16.encode_images(IMAGES[:2]), 2, bf16.dim)
    monkeypatch.setattr(DualEncoder, "_probe_cosine", staticmethod(lambda ref, got: 0.5))
    assert DualEncoder.load("tiny-random-siglip", "cpu", precision="bf16").dtype_used.startswith("float32 (fallback")

    fresh = DualEncoder.load("tiny-random-siglip", "cpu", precision="fp32")
    expected = sig.encode_images(IMAGES[:6], batch_size=6)
    seen, real = [], fresh._image_forward

    def forward(pixels, **extra):
        seen.append(len(pixels))
        if len(pixels) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(pixels, **extra)

    fresh._image_forward = forward
    np.testing.assert_allclose(fresh.encode_images(IMAGES[:6], batch_size=6), expected, atol=1e-5)
    assert seen[:3] == [6, 3, 1] and fresh._max_image_batch == 1


# ------------------------------------------------------------------------------------------------- SigLIP 2
@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory) -> Path:
    """A tiny random Siglip2Model (NaFlex: patches + mask + spatial shapes) saved with save_pretrained."""
    from transformers import PreTrainedTokenizerFast, Siglip2Config, Siglip2Model
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    out = tmp_path_factory.mktemp("siglip2")
    fast, pad_id, eos_id, vocab = tiny_siglip._build_tokenizer(tiny_siglip.corpus())
    # SigLIP 2's Gemma tokenizer pads on the left and returns an attention mask: mimic both.
    tok = PreTrainedTokenizerFast(tokenizer_object=fast.backend_tokenizer, eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", model_max_length=64, padding_side="left")
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = Siglip2Config(
        text_config=dict(vocab_size=vocab, max_position_embeddings=64, pad_token_id=pad_id, eos_token_id=eos_id,
                         bos_token_id=None, projection_size=64, **common),
        vision_config=dict(patch_size=16, num_patches=64, **common))
    torch.manual_seed(0)
    Siglip2Model(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    Siglip2ImageProcessorPil(patch_size=16, max_num_patches=64).save_pretrained(out)
    return out


def test_siglip2_naflex_loads_and_encodes_through_the_same_path(siglip2_dir, designations, monkeypatch):
    enc = DualEncoder.load(str(siglip2_dir), "cpu", precision="fp32")
    assert enc.family == "siglip2" and type(enc.model).__name__ == "Siglip2Model"
    assert enc.dim == 64 and enc.image_size == 128 and enc.max_text_length == 64  # 8 x 8 patches of 16 px
    assert enc.model_identity.endswith("#siglip2") and not enc.meaningless
    inputs = enc._preprocess([Image.new("RGB", (300, 100), "red")])
    assert set(inputs) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    assert tuple(inputs["pixel_values"].shape) == (1, 64, 3 * 16 * 16)
    paths = IMAGES[:5]
    a = enc.encode_images(paths, batch_size=3)
    _unit_float32(a, 5, 64)
    # aspect ratios differ within a batch: the patch mask keeps each image's embedding its own
    np.testing.assert_allclose(np.concatenate([enc.encode_images([p]) for p in paths]), a, atol=1e-5)
    np.testing.assert_allclose(enc.encode_pil([enc.images.open(paths[2])]), a[[2]], atol=1e-5)  # decoded alike
    assert not enc.images.fast  # patch packing: the processor itself prepares every batch
    np.testing.assert_allclose(enc.encode_images(paths, batch_size=2, loader="process", num_workers=1), a, atol=1e-5)
    seen = []
    real = enc._text_forward
    monkeypatch.setattr(enc, "_text_forward", lambda ids, mask: (seen.append((ids.shape[1], mask)), real(ids, mask))[1])
    texts = [designations[0], "x", designations[5]]
    t = enc.encode_texts(texts, batch_size=2)
    _unit_float32(t, 3, 64)
    assert all(length == 64 and mask is not None for length, mask in seen)  # max_length + the tokenizer's mask
    np.testing.assert_allclose(np.concatenate([enc.encode_texts([s]) for s in texts]), t, atol=1e-5)
    # the API's int8 text tower works for SigLIP 2 too (its text_model, head included, is swapped)
    from api import quantize

    monkeypatch.setattr(quantize, "MIN_COSINE", 0.9)
    assert quantize.quantize_text_tower(enc, "on").startswith("int8 dynamic")
    _unit_float32(enc.encode_texts(texts), 3, 64)


# ----------------------------------------------------------------------------------------- report comparison
def _metrics(model: str, macro: float, meaningless: bool = False, test_hash: str = "abc") -> dict:
    sets = {s: {"mean": {"accuracy": macro + 0.1, "macro_f1": macro + d, "weighted_f1": macro + 0.05},
                "std": {"accuracy": 0.0, "macro_f1": 0.01, "weighted_f1": 0.0}, "n_train": 100}
            for s, d in (("raw", 0.0), ("curated", 0.02), ("random", -0.01))}
    return {"model": model, "meaningless": meaningless, "split": {"n_test": 50, "test_ids_sha256": test_hash},
            "curation": {"kept_fraction": 0.8},
            "modalities": {"image+text": {"sets": sets, "delta_vs_random": {"macro_f1": {"mean": 0.03, "std": 0.01}}}}}


def test_compare_reports_takes_the_latest_report_per_model(tmp_path, capsys):
    reports = tmp_path / "reports"

    def write(version: str, data: dict, age_s: float) -> None:
        d = reports / version
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(data))
        t = time.time() - age_s
        os.utime(d / "metrics.json", (t, t))

    write("v1", _metrics("openai/clip-vit-base-patch32", 0.40), 300)
    write("v2", _metrics("google/siglip-base-patch16-256-multilingual", 0.55), 200)
    write("v3", _metrics("openai/clip-vit-base-patch32", 0.45), 100)  # newer CLIP report wins
    (reports / "broken").mkdir()
    (reports / "broken" / "metrics.json").write_text("{not json")
    table = compare_reports_dir(reports)
    lines = table.splitlines()
    assert lines[0] == "| | `google/siglip-base-patch16-256-multilingual` | `openai/clip-vit-base-patch32` |"
    assert "| report version | v2 | v3 |" in lines
    assert "| image+text · curated · macro_f1 | 0.5700 ± 0.0100 | 0.4700 ± 0.0100 |" in lines
    assert "| image+text · raw · accuracy | 0.6500 | 0.5500 |" in lines
    assert "Same held-out test rows" in table

    write("v4", _metrics("tiny-random-siglip", 0.1, meaningless=True, test_hash="zzz"), 50)
    table = compare_reports_dir(reports)
    assert "`tiny-random-siglip`" in table and "**yes**" in table
    assert "different test rows" in table and "meaningless" in table

    import runpy
    import sys

    monkey_argv = ["compare_reports.py", "--reports", str(reports)]
    old = sys.argv
    sys.argv = monkey_argv
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "compare_reports.py"),
                           run_name="__main__")
    finally:
        sys.argv = old
    assert done.value.code == 0
    assert "`tiny-random-siglip`" in capsys.readouterr().out
    assert compare_reports_dir(tmp_path / "none").startswith("No evaluation reports")
