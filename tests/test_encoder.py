"""ClipEncoder + tiny-random CLIP: the real from_pretrained path, output contract, failure modes, precision guard.

The session fixture in conftest.py points CURATION_MODEL_CACHE at a private temp dir, so tiny-random is built
fresh here (nothing from the user's cache leaks in).
"""
from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from curation_dagster.core import settings, tiny_clip
from curation_dagster.core.encoder import ClipEncoder, ImageReadError, ModelLoadError, _features, cpu_has_native_bf16

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
IMAGES = sorted((SAMPLE / "images" / "image_train").glob("*.jpg"))


@pytest.fixture(scope="module")
def enc() -> ClipEncoder:
    return ClipEncoder.load(settings.TINY_RANDOM, "cpu")


@pytest.fixture(scope="module")
def designations() -> list[str]:
    return pl.read_csv(SAMPLE / "X_sample.csv", infer_schema=False)["designation"].to_list()


def _unit_float32(a: np.ndarray, n: int, dim: int) -> None:
    assert a.dtype == np.float32
    assert a.shape == (n, dim)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------ tiny-random build
def test_tiny_random_is_built_and_loaded_through_from_pretrained(enc):
    built = tiny_clip.build_tiny_clip()
    assert built == settings.model_cache_dir() / tiny_clip.TINY_DIR_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (built / name).is_file(), name
    assert tiny_clip.resolve_model_source("tiny-random") == (str(built), True)
    assert tiny_clip.resolve_model_source("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", False)
    assert enc.source == str(built.resolve())
    assert enc.meaningless and "MEANINGLESS" in enc.describe()["note"]
    assert enc.model_name == "tiny-random" and enc.device == "cpu"
    assert enc.dim == tiny_clip.PROJECTION_DIM and enc.max_text_length == tiny_clip.MAX_TEXT_LEN
    assert enc.model_identity.startswith("tiny-random@local:")


def test_tiny_build_is_idempotent_and_deterministic(enc, tmp_path):
    built = tiny_clip.build_tiny_clip()
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    assert tiny_clip.build_tiny_clip() == built
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    # A second build elsewhere (fixed seed) gives the very same model: same weights, same embeddings.
    other = tiny_clip.build_tiny_clip(tmp_path / "again")
    assert (other / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_text() == (built / "tokenizer.json").read_text()


def test_tiny_build_concurrent_builders_never_expose_partial_dirs(tmp_path, monkeypatch):
    calls = []

    def slow_fake_build(out: Path) -> None:  # stands in for the real build: writes the files slowly
        calls.append(out)
        for name in tiny_clip._REQUIRED:
            time.sleep(0.05)
            (out / name).write_text(f"{name} from {out.name}")

    monkeypatch.setattr(tiny_clip, "_build_into", slow_fake_build)
    target = tmp_path / "cache" / "tiny"
    results, errors = [], []

    def worker():
        try:
            results.append(tiny_clip.build_tiny_clip(target))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [target] * 4 and tiny_clip.is_complete(target)
    written_by = {(target / name).read_text().split(" from ")[1] for name in tiny_clip._REQUIRED}
    assert len(written_by) == 1  # all files come from one builder, never a mix
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # temp dirs cleaned up
    # A crashed build (no marker) is rebuilt instead of being trusted.
    (target / tiny_clip._MARKER).unlink()
    calls.clear()
    assert tiny_clip.build_tiny_clip(target) == target and len(calls) == 1 and tiny_clip.is_complete(target)


# ------------------------------------------------------------------------------------------- output contract
def test_images_and_texts_are_float32_unit_vectors_in_input_order(enc, designations):
    paths = IMAGES[:5]
    a = enc.encode_images(paths, batch_size=2)
    _unit_float32(a, 5, enc.dim)
    # order: encoding a permutation permutes the rows
    b = enc.encode_images([paths[3], paths[0]], batch_size=1)
    np.testing.assert_allclose(b, a[[3, 0]], atol=1e-5)

    texts = [designations[0], "x", designations[1] * 3, designations[2]]  # mixed lengths: batched by length
    t = enc.encode_texts(texts, batch_size=2)
    _unit_float32(t, 4, enc.dim)
    one_by_one = np.concatenate([enc.encode_texts([s]) for s in texts])
    np.testing.assert_allclose(t, one_by_one, atol=1e-5)  # padding and length-sorting never change a text
    assert not np.allclose(t[0], t[3])

    assert enc.encode_images([]).shape == (0, enc.dim)
    assert enc.encode_texts([]).shape == (0, enc.dim)
    assert enc.encode_pil([]).shape == (0, enc.dim)


def test_all_loaders_give_the_same_embeddings(enc, tmp_path):
    paths = IMAGES[:6]
    threads = enc.encode_images(paths, batch_size=4, loader="thread", num_workers=2)
    procs = enc.encode_images(paths, batch_size=4, loader="process", num_workers=2)
    np.testing.assert_allclose(procs, threads, atol=1e-6)
    inline = enc.encode_images(paths, batch_size=4, num_workers=0)  # decoded in the calling thread
    np.testing.assert_allclose(inline, threads, atol=1e-6)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        enc.encode_images([paths[0], bad], batch_size=1, loader="process", num_workers=1)
    with pytest.raises(ValueError, match="loader"):
        enc.encode_images(paths, loader="bogus")
    if not enc.gpu_decode_available():  # nvJPEG decoding needs CUDA + torchvision
        with pytest.raises(ValueError, match="CUDA"):
            enc.encode_images(paths, loader="gpu")


def test_auto_loader_overlaps_only_when_decoding_is_the_bottleneck(enc, monkeypatch):
    paths = IMAGES[:6]
    reference = enc.encode_images(paths, batch_size=2, num_workers=1, loader="thread")
    # decoding slower than the model (simulated: 0.3 s per batch; tiny-random on 2 cores is close to the real
    # decode time, so the real race would be a coin toss): the rest is decoded ahead by a thread pool
    real_load = enc.images.load
    monkeypatch.setattr(enc.images, "load", lambda batch: (time.sleep(0.3), real_load(batch))[1])
    np.testing.assert_allclose(enc.encode_images(paths, batch_size=2), reference, atol=1e-6)
    assert enc.last_loader == "thread"
    monkeypatch.undo()
    # a model slower than decoding (simulated: 1 s per batch) already keeps every core busy: decode inline
    slow = ClipEncoder.load("tiny-random", "cpu")
    real = slow._image_forward
    monkeypatch.setattr(slow, "_image_forward", lambda pixels: (time.sleep(1.0), real(pixels))[1])
    np.testing.assert_allclose(slow.encode_images(paths, batch_size=3), reference, atol=1e-6)
    assert slow.last_loader == "inline"


def test_progress_reports_up_to_the_total(enc):
    seen = []
    enc.encode_images(IMAGES[:5], batch_size=2, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_deterministic_across_two_loads(enc, designations):
    again = ClipEncoder.load("tiny-random", "cpu")
    assert again.model_identity == enc.model_identity
    np.testing.assert_array_equal(again.encode_images(IMAGES[:3]), enc.encode_images(IMAGES[:3]))
    np.testing.assert_array_equal(again.encode_texts(designations[:3]), enc.encode_texts(designations[:3]))


def test_encode_pil_matches_encode_images(enc):
    path = IMAGES[7]
    pil = enc.images.open(path)  # decoded as encode_images decodes files (reduced-size JPEG by default)
    np.testing.assert_allclose(enc.encode_pil([pil]), enc.encode_images([path]), atol=1e-6)
    with Image.open(path) as im:  # a fully decoded copy (an API upload of the same photo) lands next to it
        assert float((enc.encode_pil([im.copy()]) @ enc.encode_images([path]).T)[0, 0]) > 0.99
    # a non-RGB query image (grayscale) is converted, not rejected
    _unit_float32(enc.encode_pil([pil.convert("L")]), 1, enc.dim)


def test_long_text_is_truncated_to_the_model_maximum(enc):
    head = " ".join(f"mot{i}" for i in range(400))  # far beyond 77 tokens
    assert len(enc.tokenizer(head)["input_ids"]) > enc.max_text_length
    a, b, short = enc.encode_texts([head + " une fin", head + " une tout autre fin, bien différente", "mot0 mot1"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # everything past the limit is cut, so the tails do not matter
    assert not np.allclose(a, short)


def test_unreadable_image_raises_naming_the_file(enc, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(IMAGES[0].read_bytes()[:300])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a jpeg")
    for bad in (truncated, not_image, tmp_path / "missing.jpg"):
        with pytest.raises(ImageReadError, match=bad.name):
            enc.encode_images([IMAGES[0], bad, IMAGES[1]], batch_size=2)


def test_features_accepts_tensor_and_output_objects():
    t = torch.ones(2, 3)

    class V5Output:  # transformers 5: get_*_features returns an output object
        pooler_output = t

    assert _features(t, "image") is t  # transformers 4 returned the tensor
    assert _features(V5Output(), "text") is t
    with pytest.raises(TypeError):
        _features(object(), "image")


# ------------------------------------------------------------------------------------------- loading failures
def test_unknown_model_fails_at_once_naming_the_model(monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", lambda s: sleeps.append(s))  # huggingface_hub's retry back-off
    name = "no-such-org-xyz/no-such-clip-model-xyz"
    with pytest.raises(ModelLoadError) as info:
        ClipEncoder.load(name, "cpu")
    msg = str(info.value)
    assert name in msg and "CURATION_CLIP_MODEL" in msg and "tiny-random" in msg
    assert sleeps == []  # failed without any retry back-off (offline: ~25 s of retries otherwise)


def test_missing_local_directory_fails_naming_it(tmp_path):
    missing = tmp_path / "no" / "clip"
    with pytest.raises(ModelLoadError, match=str(missing)):
        ClipEncoder.load(str(missing), "cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="broken"):
        ClipEncoder.load(str(broken), "cpu")


def test_a_saved_local_checkpoint_loads_like_a_real_one(enc, tmp_path):
    copy = tmp_path / "my-clip"
    shutil.copytree(tiny_clip.build_tiny_clip(), copy)
    local = ClipEncoder.load(str(copy), "cpu", precision="fp32")
    assert local.model_name == str(copy) and local.model_identity.startswith(f"{copy}@local:")
    assert local.meaningless  # a copy of tiny-random still has random weights (its build marker says so)
    np.testing.assert_array_equal(local.encode_images(IMAGES[:2]), enc.encode_images(IMAGES[:2]))
    (copy / tiny_clip._MARKER).unlink()  # without the marker it is just some user's checkpoint
    other = ClipEncoder.load(str(copy), "cpu", precision="fp32")
    assert not other.meaningless and other.model_identity != local.model_identity


def test_bad_precision_and_device_are_rejected():
    with pytest.raises(ValueError, match="precision"):
        ClipEncoder.load("tiny-random", "cpu", precision="int4")
    with pytest.raises(ValueError, match="fp16"):
        ClipEncoder.load("tiny-random", "cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            ClipEncoder.load("tiny-random", "cuda")


# ------------------------------------------------------------------------------------------ OOM and precision
def test_out_of_memory_halves_the_batch_and_retries(enc, designations):
    fresh = ClipEncoder.load("tiny-random", "cpu")
    expected_img = enc.encode_images(IMAGES[:10], batch_size=8)
    expected_txt = enc.encode_texts(designations[:10])
    seen_img, seen_txt = [], []
    real_img, real_txt = fresh._image_forward, fresh._text_forward

    def img_forward(pixels):
        seen_img.append(len(pixels))
        if len(pixels) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_img(pixels)

    def txt_forward(ids, mask):
        seen_txt.append(len(ids))
        if len(ids) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_txt(ids, mask)

    fresh._image_forward, fresh._text_forward = img_forward, txt_forward
    got_img = fresh.encode_images(IMAGES[:10], batch_size=8)
    got_txt = fresh.encode_texts(designations[:10], batch_size=10)
    np.testing.assert_allclose(got_img, expected_img, atol=1e-5)
    np.testing.assert_allclose(got_txt, expected_txt, atol=1e-5)
    assert seen_img[:3] == [8, 4, 2] and fresh._max_image_batch == 2  # 8 -> 4 -> 2, then stays at 2
    assert max(seen_img[3:]) == 2 and sum(seen_img[2:]) == 10
    assert seen_txt[:2] == [10, 5] and fresh._max_text_batch == 2

    # a single item that still does not fit is a real error, not an endless loop
    fresh._image_forward = lambda pixels: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("still OOM"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fresh.encode_images(IMAGES[:1])


def test_reduced_precision_guard(enc, monkeypatch):
    # On this CPU: auto picks bf16 only with native bf16 support; otherwise fp32 with the reason.
    if not cpu_has_native_bf16():
        auto = ClipEncoder.load("tiny-random", "cpu", precision="auto")
        assert auto.dtype_used.startswith("float32") and "bf16" in auto.dtype_used
        assert auto._autocast_dtype is None

    # Forced bf16 whose probe drifts from fp32 (injected) falls back to fp32 and says so.
    monkeypatch.setattr(ClipEncoder, "_probe_cosine", staticmethod(lambda ref, got: 0.5))
    fallback = ClipEncoder.load("tiny-random", "cpu", precision="bf16")
    assert fallback.dtype_used.startswith("float32 (fallback") and "0.5" in fallback.dtype_used
    assert fallback._autocast_dtype is None
    np.testing.assert_array_equal(fallback.encode_images(IMAGES[:2]), enc.encode_images(IMAGES[:2]))

    # A faithful probe (injected) keeps bf16 autocast; outputs stay float32 unit vectors close to fp32.
    monkeypatch.setattr(ClipEncoder, "_probe_cosine", staticmethod(lambda ref, got: 1.0))
    bf16 = ClipEncoder.load("tiny-random", "cpu", precision="bf16")
    assert bf16.dtype_used.startswith("bfloat16") and bf16._autocast_dtype == torch.bfloat16
    got = bf16.encode_images(IMAGES[:2])
    _unit_float32(got, 2, bf16.dim)
    assert np.min(np.sum(got * enc.encode_images(IMAGES[:2]), axis=1)) > 0.98

    forced = ClipEncoder.load("tiny-random", "cpu", precision="fp32")
    assert forced.dtype_used == "float32 (requested)"


def test_precision_is_chosen_by_capability_never_by_timing(monkeypatch):
    """auto → bf16 on a CPU with native bf16 (faithful probe), fp32 without; however slow the probe was."""
    import curation_dagster.core.encoder as encoder_mod

    real = ClipEncoder._timed_probe
    calls = {"n": 0}

    def slow_reduced(self):  # the reduced-precision probe looks 10x slower than fp32 (a loaded machine)
        emb, t = real(self)
        calls["n"] += 1
        return emb, (t if self._autocast_dtype is None else t * 10 + 1.0)

    monkeypatch.setattr(ClipEncoder, "_timed_probe", slow_reduced)
    monkeypatch.setattr(encoder_mod, "cpu_has_native_bf16", lambda: True)
    capable = [ClipEncoder.load("tiny-random", "cpu", precision="auto") for _ in range(2)]
    assert all(e.precision == "bf16" and e._autocast_dtype == torch.bfloat16 for e in capable), \
        [e.dtype_used for e in capable]
    assert capable[0].model_identity.endswith("|bf16")  # cached apart from fp32 embeddings
    assert capable[0].describe()["precision"] == "bf16"
    monkeypatch.setattr(encoder_mod, "cpu_has_native_bf16", lambda: False)
    plain = ClipEncoder.load("tiny-random", "cpu", precision="auto")
    assert plain.precision == "fp32" and "no native bf16" in plain.dtype_used
    assert "|" not in plain.model_identity
    assert calls["n"] >= 4


def test_precision_setting_is_validated(monkeypatch):
    from curation_dagster.core import settings

    monkeypatch.setenv("CURATION_PRECISION", "BF16")
    assert settings.precision() == "bf16"
    monkeypatch.setenv("CURATION_PRECISION", "int4")
    with pytest.raises(ValueError, match="CURATION_PRECISION must be one of auto, fp32, bf16, fp16"):
        settings.precision()


def test_probe_cosine_is_the_worst_row():
    ref = np.eye(3, dtype=np.float32)
    got = ref.copy()
    got[1] = [0.6, 0.8, 0.0]
    assert ClipEncoder._probe_cosine(ref, got) == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------- tiny-random quality
def _reencoded(path: Path) -> Image.Image:
    with Image.open(path) as im:
        small = im.convert("RGB").resize((400, 400), Image.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=60)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def test_tiny_random_separates_distinct_items_and_keeps_copies_together(enc, designations):
    """Downstream dedup (cosine ~0.95 image / ~0.97 text) runs on tiny-random in the pipeline tests: distinct
    sample items must stay clearly apart and re-encoded copies together, or dedup would merge everything."""
    paths = IMAGES[:80]
    a = enc.encode_images(paths, num_workers=2)
    sims = (a @ a.T)[np.triu_indices(len(a), 1)]
    assert np.quantile(sims, 0.99) < 0.9 and sims.mean() < 0.5
    assert (sims > 0.95).sum() <= 1  # the sample has one near-identical template pair
    copies = enc.encode_pil([_reencoded(p) for p in paths])  # JPEG q60, resized to 400x400
    assert np.sum(a * copies, axis=1).min() > 0.97

    t = enc.encode_texts(designations[:300])
    tsims = (t @ t.T)[np.triu_indices(len(t), 1)]
    assert np.quantile(tsims, 0.99) < 0.9 and tsims.max() < 0.97
