"""Deep greyscale and transparent pictures become the RGB a browser shows, in the pipeline and in the API alike.

Before core/color.py both used Pillow's convert("RGB"): a 16-bit PNG came out ~99 % white (clipped at 255) and a
cut-out on a transparent background showed the colour hidden under the transparent pixels (here black)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from api.uploads import decode_upload
from curation_dagster.core.color import to_rgb
from curation_dagster.core.images import decode_fully


def _gradient16() -> Image.Image:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    return Image.fromarray(ramp)  # uint16 → mode I;16


def _cutout(mode: str) -> Image.Image:
    """A red (or grey) square in the middle of a fully transparent field whose hidden colour is black."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (220, 30, 30, 255)
    im = Image.fromarray(rgba, "RGBA")
    return im if mode == "RGBA" else im.convert(mode)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _check_gradient(rgb: Image.Image) -> None:
    arr = np.asarray(rgb, np.float64)
    assert rgb.mode == "RGB" and 120 < arr.mean() < 135  # the ramp's middle grey, not white (clipped: ~254)
    row = arr[0, :, 0]
    assert row[0] < 3 and row[-1] > 252 and np.all(np.diff(row) >= 0)  # dark to light, in order


def _check_cutout(rgb: Image.Image) -> None:
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB"
    assert (arr[2, 2] >= 250).all()  # transparent corner: white page, not the hidden black
    assert abs(int(arr[32, 32, 0]) - 220) < 8  # the opaque object keeps its colour


def test_to_rgb_scales_deep_grey_and_flattens_transparency_on_white():
    _check_gradient(to_rgb(_gradient16()))
    _check_gradient(to_rgb(_gradient16().convert("I")))
    for mode in ("RGBA", "LA", "PA"):
        out = to_rgb(_cutout(mode))
        assert (np.asarray(out)[2, 2] >= 250).all(), mode
    _check_cutout(to_rgb(_cutout("RGBA")))
    keyed = _gradient16()
    keyed.info["transparency"] = 0  # PNG tRNS: grey level 0 is transparent
    assert (np.asarray(to_rgb(keyed))[0, 0] == 255).all() and np.asarray(to_rgb(keyed))[0, 128, 0] < 140
    plain = Image.new("RGB", (8, 8), (10, 20, 30))
    assert to_rgb(plain) is plain  # the common case costs nothing
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")
    assert abs(np.asarray(to_rgb(floats)).mean() - 127.5) < 1


def test_a_pipeline_image_that_is_16_bit_or_transparent_is_rewritten_as_a_browser_shows_it(tmp_path):
    grey = tmp_path / "grey.jpg"
    grey.write_bytes(_png(_gradient16()))  # a PNG named .jpg, as the catalogue has them
    res = decode_fully(grey)
    assert res.ok and res.rewritten and "PNG → JPEG" in res.rewritten
    with Image.open(grey) as im:
        assert im.format == "JPEG"
        _check_gradient(im.convert("RGB"))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_png(_cutout("RGBA")))
    assert decode_fully(cut).ok
    with Image.open(cut) as im:
        _check_cutout(im.convert("RGB"))


@pytest.mark.parametrize("kind", ["16-bit", "transparent"])
def test_an_uploaded_16_bit_or_transparent_image_is_seen_as_a_browser_shows_it(kind):
    data = _png(_gradient16() if kind == "16-bit" else _cutout("RGBA"))
    for target in (224, 16):  # 16: the upload is shrunk first (another code path)
        out = decode_upload(data, max_pixels=10**7, target=target)
        if kind == "16-bit":
            assert 120 < np.asarray(out, np.float64).mean() < 135
        else:
            assert (np.asarray(out)[1, 1] >= 245).all()


def test_a_transparent_colour_is_not_blended_into_a_dark_edge_when_an_upload_is_shrunk():
    """An RGB PNG whose black is transparent (tRNS): resizing before flattening blended the hidden black into the
    object's edge; as alpha first, the edge stays light as in the pipeline's full-size flattening."""
    arr = np.zeros((400, 400, 3), np.uint8)
    arr[100:300, 100:300] = (240, 240, 240)
    im = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=(0, 0, 0))
    out = np.asarray(decode_upload(buf.getvalue(), max_pixels=10**7, target=16), np.int16)  # shrunk to 32 px
    assert out.min() > 200, out.min()  # no dark ring where the object meets the transparent field


def test_an_mpo_photo_is_kept_as_it_is(tmp_path):
    """Camera MPO files (a JPEG with more pictures after it) are JPEGs to every reader: before, cleaning re-encoded
    them (a generation of JPEG loss for nothing)."""
    photo = tmp_path / "camera.jpg"
    first = Image.new("RGB", (300, 200), (200, 10, 10))
    first.save(photo, format="MPO", save_all=True, append_images=[Image.new("RGB", (300, 200), (10, 200, 10))])
    with Image.open(photo) as im:
        assert im.format == "MPO"
    before = photo.read_bytes()
    res = decode_fully(photo)
    assert res.ok and res.rewritten is None and photo.read_bytes() == before
