"""Image loading for the encoder (core/pixels.py): reduced-size JPEG decoding and the vectorised preprocessing.

The references are the full decode and the model's own image processor; the sample's real product photos
(500x500 progressive JPEGs) are the data."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from curation_dagster.core import settings
from curation_dagster.core.embedding_cache import EmbeddingCache, embed_with_cache
from curation_dagster.core.encoder import ClipEncoder, DualEncoder, ImageReadError
from curation_dagster.core import pixels
from curation_dagster.core.pixels import (FAST_TOLERANCE, MAX_ASPECT, RESIZE_LEVELS, ImageLoader, centre_window,
                                          cut_to_centre, plain_recipe)
from pipeline_helpers import SAMPLE_DIR

IMAGES = sorted((SAMPLE_DIR / "images").rglob("*.jpg"))


@pytest.fixture(scope="module")
def enc() -> ClipEncoder:
    return ClipEncoder.load("tiny-random", "cpu", precision="fp32")


def _loader(enc, decode: str, vectorise: bool = True, torch_resize: bool = True) -> ImageLoader:
    return ImageLoader(enc.image_processor, enc.adapter, decode=decode, fallback_side=enc.image_size,
                       vectorise=vectorise, torch_resize=torch_resize)


def test_reduced_decoding_is_the_default_and_halves_the_sample_photos(enc, monkeypatch):
    assert enc.images.decode == "reduced" and enc.image_key_suffix
    with Image.open(IMAGES[0]) as im:
        assert im.size == (500, 500)
    assert enc.images.open(IMAGES[0]).size == (250, 250)  # the largest DCT scale still covering 224
    assert _loader(enc, "full").open(IMAGES[0]).size == (500, 500)
    monkeypatch.setenv("CURATION_IMAGE_DECODE", "full")
    full = ClipEncoder.load("tiny-random", "cpu", precision="fp32")
    assert full.images.decode == "full" and full.image_key_suffix == "|resize-torch"
    full.images = _loader(full, "full", torch_resize=False)
    assert full.image_key_suffix == ""  # the processor's own pixels: the plain cache key
    monkeypatch.setenv("CURATION_IMAGE_DECODE", "tiny")
    with pytest.raises(ValueError, match="CURATION_IMAGE_DECODE"):
        settings.image_decode()


@pytest.mark.parametrize("size, expected", [((300, 300), (300, 300)),  # 1/2 would be 150 < 224: full size
                                            ((1000, 460), (500, 230)),  # limited by the short side
                                            ((2000, 1800), (250, 225)),  # 1/8
                                            ((200, 120), (200, 120))])  # already smaller than the input
def test_reduced_decode_always_covers_the_resize_target(enc, tmp_path, size, expected):
    f = tmp_path / "photo.jpg"
    Image.new("RGB", size, (120, 30, 200)).save(f, "JPEG", quality=90)
    got = enc.images.open(f)
    assert got.size == expected and got.mode == "RGB"
    w, h = got.size
    assert min(w, h) >= min(224, *size)


def test_embeddings_of_reduced_decoding_stay_within_cosine_099_of_full_decoding(enc):
    """Every sample photo: reduced decode + vectorised preprocessing vs full decode + the model's processor."""
    enc_ref = ClipEncoder.load("tiny-random", "cpu", precision="fp32")
    enc_ref.images = _loader(enc_ref, "full", vectorise=False)
    ref = enc_ref.encode_images(IMAGES, batch_size=64, num_workers=0)
    got = enc.encode_images(IMAGES, batch_size=64, num_workers=0)
    cos = np.sum(ref * got, axis=1)
    assert cos.min() >= 0.99, f"worst image cosine {cos.min():.4f}"
    assert not np.allclose(ref, got, atol=1e-6)  # it really decoded something else


def _photos(enc) -> list[Image.Image]:
    photos = [_loader(enc, "full").open(p) for p in IMAGES[:24]]
    photos += [_loader(enc, "reduced").open(p) for p in IMAGES[:4]]  # 250x250: the pipeline's case
    photos.append(photos[0].crop((0, 0, 500, 300)))  # landscape
    photos.append(photos[1].crop((0, 0, 180, 420)).convert("L"))  # portrait, grayscale (converted)
    photos.append(photos[2].crop((0, 0, 300, 700 if photos[2].height >= 700 else photos[2].height)))
    photos.append(photos[2].resize((90, 60)))  # smaller than the input: upscaled
    return photos


@pytest.mark.parametrize("torch_resize", [False, True])
def test_vectorised_preprocessing_reproduces_the_processor_on_real_photos(enc, torch_resize):
    """Pillow resizing: the processor's output to float rounding. torch resizing: within RESIZE_LEVELS grey
    levels (where its size check lets it resize; elsewhere Pillow's exact output)."""
    loader = _loader(enc, "reduced", torch_resize=torch_resize)
    assert loader.fast and loader.torch_resize == torch_resize, loader.describe()
    tolerance = FAST_TOLERANCE + (RESIZE_LEVELS * loader.recipe.level_step() if torch_resize else 0.0)
    assert loader.fast_max_diff is not None and loader.fast_max_diff <= tolerance
    photos = _photos(enc)
    worst = 0.0
    for im in photos:
        ref = enc.adapter.preprocess(enc.image_processor, [im.convert("RGB")])["pixel_values"]
        got = loader.preprocess([im])["pixel_values"]
        assert got.shape == ref.shape == (1, 3, 224, 224) and got.dtype == torch.float32
        worst = max(worst, float((got - ref).abs().max()))
    assert worst <= tolerance
    if torch_resize:
        assert worst > FAST_TOLERANCE  # it really resized in torch somewhere (a grey level or two apart)
    batch = loader.preprocess(photos[:8])["pixel_values"]
    ref = enc.adapter.preprocess(enc.image_processor, photos[:8])["pixel_values"]
    assert float((batch - ref).abs().max()) <= tolerance


def test_torch_resizes_only_the_size_pairs_where_it_matches_pillow(enc):
    """Pillow 13 runs some resizes vertical pass first (300x700 → 224x522 here), torch always horizontal first:
    the rounded intermediate then differs by several grey levels. Such a size pair goes through Pillow, exactly."""
    loader = _loader(enc, "reduced")
    assert loader._torch_resize_agrees(250, 250, 224, 224)  # the sample photos after reduced decoding
    assert not loader._torch_resize_agrees(300, 700, 224, 522)
    noise = Image.fromarray(np.random.default_rng(5).integers(0, 256, (700, 300, 3), dtype=np.uint8))
    ref = enc.adapter.preprocess(enc.image_processor, [noise])["pixel_values"]
    assert float((loader.preprocess([noise])["pixel_values"] - ref).abs().max()) <= FAST_TOLERANCE
    assert not _loader(enc, "reduced", torch_resize=False)._torch_resize_agrees(250, 250, 224, 224)


def test_a_processor_the_fast_path_does_not_reproduce_is_used_as_it_is(enc):
    """A processor whose steps differ from the recipe read off it (here: its resize was changed behind the
    attributes) fails the probe check, and then every batch goes through the processor itself."""
    import copy

    proc = copy.deepcopy(enc.image_processor)
    original = proc.resize

    def shifted_resize(*args, **kwargs):
        return original(*args, **kwargs) + 7  # a processor that does something the recipe does not know
    proc.resize = shifted_resize
    loader = ImageLoader(proc, enc.adapter, decode="reduced", fallback_side=224)
    assert not loader.fast and "differed" in loader.describe()["image_preprocess"]
    im = loader.open(IMAGES[3])
    np.testing.assert_array_equal(loader.preprocess([im])["pixel_values"],
                                  enc.adapter.preprocess(proc, [im])["pixel_values"])
    padded = copy.deepcopy(enc.image_processor)
    padded.do_pad = True
    assert plain_recipe(padded) is None


def test_siglip_processor_resizes_to_a_fixed_size_and_is_reproduced():
    sig = DualEncoder.load(settings.TINY_RANDOM_SIGLIP, "cpu", precision="fp32")
    r = sig.images.recipe
    assert r is not None and r.shortest_edge is None and (r.height, r.width) == (sig.image_size,) * 2
    assert sig.images.fast
    im = _loader(sig, "full").open(IMAGES[5]).crop((0, 0, 500, 320))
    ref = sig.adapter.preprocess(sig.image_processor, [im])["pixel_values"]
    assert sig.images.torch_resize  # bilinear: torch resizes it too, where its size check agrees
    tolerance = FAST_TOLERANCE + RESIZE_LEVELS * r.level_step()
    assert float((sig.images.preprocess([im])["pixel_values"] - ref).abs().max()) <= tolerance


def test_reduced_and_full_decoding_are_cached_apart(enc, tmp_path):
    cache_root = tmp_path / "cache"
    files = IMAGES[:6]
    keys = [f"sha-{i}" for i in range(len(files))]
    texts = [f"produit {i}" for i in range(len(files))]
    full = ClipEncoder.load("tiny-random", "cpu", precision="fp32", image_decode="full")
    assert full.model_identity == enc.model_identity  # text vectors do not depend on the decode: shared
    img_r, _, st = embed_with_cache(enc, EmbeddingCache(cache_root, enc.model_identity, enc.dim), files, keys, texts)
    assert st["images_encoded"] == 6
    img_f, _, st = embed_with_cache(full, EmbeddingCache(cache_root, full.model_identity, full.dim), files, keys, texts)
    assert st["images_encoded"] == 6 and st["text_cache_hits"] == 6  # images again, texts from the cache
    assert not np.allclose(img_r, img_f, atol=1e-6)
    again, _, st = embed_with_cache(enc, EmbeddingCache(cache_root, enc.model_identity, enc.dim), files, keys, texts)
    assert st["image_cache_hits"] == 6
    np.testing.assert_array_equal(again, img_r)


def test_damaged_files_still_fail_naming_the_file_when_decoding_reduced(enc, tmp_path):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(IMAGES[0].read_bytes()[:4000])  # a valid header, then the scans stop
    with pytest.raises(ImageReadError, match="cut.jpg"):
        enc.images.open(truncated)
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(IMAGES[1]).convert("CMYK").save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.open(IMAGES[2]).save(png, "PNG")
    (tmp_path / "photo.png").write_bytes(png.getvalue())
    for f in (cmyk, tmp_path / "photo.png"):
        im = enc.images.open(f)
        assert im.mode == "RGB"
    assert enc.images.open(cmyk).size == (250, 250) and enc.images.open(tmp_path / "photo.png").size == (500, 500)


def _largest_resize(monkeypatch) -> list[int]:
    """Records the pixel count of every resize output (Pillow's and torch's) from now on."""
    sizes: list[int] = []
    pil_resize, torch_resize = Image.Image.resize, pixels.F.interpolate

    def pil(self, size, *a, **k):
        sizes.append(int(size[0]) * int(size[1]))
        return pil_resize(self, size, *a, **k)

    def tch(x, size=None, *a, **k):
        sizes.append(int(size[0]) * int(size[1]))
        return torch_resize(x, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", pil)
    monkeypatch.setattr(pixels.F, "interpolate", tch)
    return sizes


@pytest.mark.parametrize("vectorise", [True, False])
def test_a_banner_is_cut_to_its_centre_before_the_shortest_edge_resize(enc, monkeypatch, vectorise):
    """2x4000 pixels, resized shortest edge first, would be 224x448,000 (measured: 2 GB, 11 s) for a centre crop
    of 224x224. Both the fast path and the processor path now resize at most MAX_ASPECT x 224 x 224 pixels."""
    loader = _loader(enc, "reduced", vectorise=vectorise)
    assert loader.bound_aspect
    banner = Image.fromarray(np.random.default_rng(1).integers(0, 256, (4000, 2, 3), dtype=np.uint8))
    sizes = _largest_resize(monkeypatch)
    out = loader.preprocess([banner, banner.transpose(Image.Transpose.TRANSPOSE)])["pixel_values"]
    assert out.shape == (2, 3, 224, 224) and torch.isfinite(out).all()
    assert sizes and max(sizes) <= 224 * 224 * (MAX_ASPECT + 1), max(sizes)


def test_cutting_a_banner_keeps_what_the_centre_crop_sees(enc):
    """Within a couple of grey levels of the processor on the uncut image (the rounded resize size moves the kept
    centre by a fraction of a pixel); ordinary shapes are never cut, so their pixels stay exactly the processor's."""
    assert all(centre_window(w, h) is None for w, h in ((500, 500), (640, 480), (300, 700), (90, 1400), (1400, 90)))
    photo = _loader(enc, "full").open(IMAGES[3])
    loader = _loader(enc, "reduced", torch_resize=False)
    for w, h in ((20, 600), (600, 25), (8, 900)):
        im = photo.resize((w, h))
        assert centre_window(w, h) is not None
        ref = enc.adapter.preprocess(enc.image_processor, [im])["pixel_values"]
        diff = (loader.preprocess([im])["pixel_values"] - ref).abs() / loader.recipe.level_step()
        assert float(diff.max()) <= 3.0 and float(diff.mean()) < 0.2, (w, h, float(diff.max()), float(diff.mean()))


def test_the_gpu_decoders_tensors_are_cut_like_pil_images():
    """The nvJPEG path hands [3, h, w] tensors to the processor: they get the same centre cut as PIL images."""
    arr = np.random.default_rng(2).integers(0, 256, (40, 2000, 3), dtype=np.uint8)  # 40 high, 2000 wide
    pil, tensor, square = cut_to_centre([Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1),
                                         torch.zeros(3, 50, 60, dtype=torch.uint8)])
    assert pil.size == (16 * 40, 40) and tuple(tensor.shape) == (3, 40, 16 * 40)
    np.testing.assert_array_equal(np.asarray(pil), tensor.permute(1, 2, 0).numpy())
    assert tuple(square.shape) == (3, 50, 60)  # ordinary shapes untouched
