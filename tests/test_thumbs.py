"""Model-input thumbnails (core/thumbs.py): written by cleaning from its one full decode, read by the embedding stage.

The data: the sample's real product photos (500x500 progressive JPEGs). The reference: full decoding + the model's
own image processor, as in tests/test_pixels.py."""
from __future__ import annotations

import errno
import shutil

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_dagster.core.cleaning import clean_products
from curation_dagster.core.encoder import ClipEncoder
from curation_dagster.core.images import decode_fully, file_sha256
from curation_dagster.core.pixels import ImageLoader
from curation_dagster.core.thumbs import Thumbnails, image_sources, thumb_size
from pipeline_helpers import SAMPLE_DIR

IMAGES = sorted((SAMPLE_DIR / "images").rglob("*.jpg"))


@pytest.fixture(scope="module")
def enc() -> ClipEncoder:
    return ClipEncoder.load("tiny-random", "cpu", precision="fp32")


def test_a_thumbnail_is_a_small_baseline_jpeg_named_by_content_and_written_once(tmp_path):
    thumbs = Thumbnails(tmp_path / "thumbs")
    photo = tmp_path / "a.jpg"
    shutil.copy(IMAGES[0], photo)
    with Image.open(photo) as im:
        assert im.info.get("progressive")  # the sample photos are progressive
    res = decode_fully(photo, thumbs=thumbs)
    assert res.ok and res.thumb and res.sha256 == file_sha256(photo)
    with Image.open(res.thumb) as t:
        assert t.size == (250, 250) == thumb_size(res.thumb)  # 500 / 2: still covers a 224 input
        assert t.format == "JPEG" and not t.info.get("progressive")
    assert res.sha256 in res.thumb
    inode = (tmp_path / "thumbs").rglob("*.jpg").__next__().stat().st_ino
    again = decode_fully(photo, thumbs=thumbs)
    assert again.thumb == res.thumb and next((tmp_path / "thumbs").rglob("*.jpg")).stat().st_ino == inode
    # a file cleaning rewrites (a PNG named .jpg) gets the thumbnail of what it now holds
    png = tmp_path / "b.jpg"
    Image.open(IMAGES[1]).convert("RGBA").save(png, format="PNG")
    res = decode_fully(png, thumbs=thumbs)
    assert res.rewritten and res.sha256 == file_sha256(png) and res.sha256 in res.thumb


@pytest.mark.parametrize("size, expected", [((300, 300), (300, 300)), ((1000, 460), (500, 230)),
                                            ((2000, 1800), (250, 225)), ((200, 120), (200, 120))])
def test_a_thumbnail_keeps_what_the_reduced_decode_keeps(enc, tmp_path, size, expected):
    """Same sizes as the reduced decode of the original (tests/test_pixels.py): the loader may use it."""
    f = tmp_path / "photo.jpg"
    Image.new("RGB", size, (120, 30, 200)).save(f, "JPEG", quality=90)
    thumb = decode_fully(f, thumbs=Thumbnails(tmp_path / "thumbs")).thumb
    assert thumb_size(thumb) == expected == enc.images.open(f).size
    assert enc.images.covers(*expected) or min(size) < 224


def test_embeddings_from_thumbnails_stay_within_cosine_099_of_full_decoding(enc, tmp_path):
    """Every sample photo: thumbnail + the default loader vs the original fully decoded + the model's processor."""
    thumbs = Thumbnails(tmp_path / "thumbs")
    copies = []
    for p in IMAGES:
        copies.append(tmp_path / p.name)
        shutil.copy(p, copies[-1])
    results = [decode_fully(p, thumbs=thumbs) for p in copies]
    paths, keys, used = image_sources([str(p) for p in copies], [r.sha256 for r in results],
                                      [r.thumb for r in results], enc.images)
    assert used == len(IMAGES) and all("|thumb250x250" in k for k in keys)
    ref_enc = ClipEncoder.load("tiny-random", "cpu", precision="fp32")
    ref_enc.images = ImageLoader(ref_enc.image_processor, ref_enc.adapter, decode="full",
                                 fallback_side=ref_enc.image_size, vectorise=False)
    ref = ref_enc.encode_images(copies, batch_size=64, num_workers=0)
    got = enc.encode_images(paths, batch_size=64, num_workers=0)
    cos = np.sum(ref * got, axis=1)
    assert cos.min() >= 0.99, f"worst image cosine {cos.min():.4f}"
    assert not np.allclose(ref, got, atol=1e-6)  # it really read other pixels


def test_the_original_is_read_where_a_thumbnail_does_not_serve(enc, tmp_path):
    photo = tmp_path / "a.jpg"
    shutil.copy(IMAGES[0], photo)
    small = decode_fully(photo, thumbs=Thumbnails(tmp_path / "t64", min_side=64)).thumb  # 500/7: 72x72
    fitting = decode_fully(photo, thumbs=Thumbnails(tmp_path / "t224")).thumb
    full = ImageLoader(enc.image_processor, enc.adapter, decode="full", fallback_side=enc.image_size)
    key = file_sha256(photo)
    cases = [(small, enc.images), (fitting, full), (str(tmp_path / "gone" / (key + "-250x250.jpg")), enc.images),
             (None, enc.images)]
    for thumb, loader in cases:  # too small for a 224 input / CURATION_IMAGE_DECODE=full / deleted / none
        assert image_sources([str(photo)], [key], [thumb], loader) == ([str(photo)], [key], 0), thumb
    assert image_sources([str(photo)], [key], [fitting], enc.images)[2] == 1


def test_a_thumbnail_that_cannot_be_written_costs_speed_not_the_row(tmp_path, monkeypatch):
    def disk_full(self, rgb, sha256):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Thumbnails, "write", disk_full)
    photo = tmp_path / "a.jpg"
    shutil.copy(IMAGES[0], photo)
    df = pl.DataFrame({"record_id": [1], "image_path": [str(photo)], "image_status": ["ok"], "image_error": [None],
                       "image_file": ["a.jpg"], "designation": ["Lampe torche"], "description": [""],
                       "image_sha256": [file_sha256(photo)], "image_mode": ["RGB"], "image_format": ["JPEG"],
                       "image_bytes": [photo.stat().st_size], "image_width": [500], "image_height": [500]},
                      schema_overrides={"image_error": pl.Utf8})
    result = clean_products(df, thumbs=Thumbnails(tmp_path / "thumbs"), workers=1)
    assert result.clean.height == 1 and result.clean["thumb_path"].to_list() == [None]
