"""Model-input thumbnails (core/thumbs.py): written by cleaning from its one full decode, read by the embedding stage.

The data: the sample's real product photos (500x500 progressive JPEGs). The reference: full decoding + the model's
own image processor, as in tests/test_pixels.py."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

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


@pytest.mark.parametrize("size, expected", [((300, 300), None), ((1000, 460), (500, 230)), ((700, 700), (233, 233)),
                                            ((2000, 1800), (250, 225)), ((200, 120), None), ((503, 1001), (252, 500))])
def test_a_thumbnail_covers_the_model_input_or_is_not_made(enc, tmp_path, size, expected):
    """Under twice the model input on the short side, no thumbnail (the original is read); else the smallest
    integer reduction that still covers the input."""
    f = tmp_path / "photo.jpg"
    Image.new("RGB", size, (120, 30, 200)).save(f, "JPEG", quality=90)
    thumb = decode_fully(f, thumbs=Thumbnails(tmp_path / "thumbs")).thumb
    assert (thumb_size(thumb) if thumb else None) == expected
    if expected:
        assert enc.images.covers(*expected)
        with Image.open(thumb) as t:
            assert t.size == expected


@pytest.mark.parametrize("side", [None, 700, 503])  # None: the photos as they are (500: halved exactly)
def test_embeddings_from_thumbnails_stay_within_cosine_099_of_full_decoding(enc, tmp_path, side):
    """Sample photos: thumbnail + the default loader vs the original fully decoded + the model's processor. 700 and
    503: sizes the reduction factor (3, 2) does not divide; Image.reduce stretched those (cosine 0.94, 0.96)."""
    thumbs = Thumbnails(tmp_path / "thumbs")
    copies = []
    for p in IMAGES[::4] if side is None else IMAGES[:64]:  # every 4th photo: 137 (the suite's time is budgeted)
        copies.append(tmp_path / p.name)
        if side is None:
            shutil.copy(p, copies[-1])
        else:
            Image.open(p).resize((side, side), Image.Resampling.BICUBIC).save(copies[-1], "JPEG", quality=92)
    results = [decode_fully(p, thumbs=thumbs) for p in copies]
    paths, keys, used = image_sources([str(p) for p in copies], [r.sha256 for r in results],
                                      [r.thumb for r in results], enc.images)
    assert used == len(copies) and all("|thumb" in k for k in keys)
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
    small = decode_fully(photo, thumbs=Thumbnails(tmp_path / "t64", min_side=64)).thumb  # 500/7: 71x71
    fitting = decode_fully(photo, thumbs=Thumbnails(tmp_path / "t224")).thumb
    full = ImageLoader(enc.image_processor, enc.adapter, decode="full", fallback_side=enc.image_size)
    key = file_sha256(photo)
    other = tmp_path / "other.jpg"
    shutil.copy(IMAGES[1], other)
    not_ours = decode_fully(other, thumbs=Thumbnails(tmp_path / "t224")).thumb
    cases = [(small, enc.images), (fitting, full), (fitting.replace("t224", "gone"), enc.images), (None, enc.images),
             (not_ours, enc.images)]
    # too small for a 224 input / CURATION_IMAGE_DECODE=full / deleted / none / another file's thumbnail
    for thumb, loader in cases:
        assert image_sources([str(photo)], [key], [thumb], loader) == ([str(photo)], [key], 0), thumb
    assert image_sources([str(photo)], [key], [fitting], enc.images)[2] == 1


def _one_collected_row(tmp_path) -> pl.DataFrame:
    """One sample photo as product_images hands it to cleaning."""
    photo = tmp_path / "a.jpg"
    shutil.copy(IMAGES[0], photo)
    return pl.DataFrame({"record_id": [1], "image_path": [str(photo)], "image_status": ["ok"], "image_error": [None],
                         "image_file": ["a.jpg"], "designation": ["Lampe torche"], "description": [""],
                         "image_sha256": [file_sha256(photo)], "image_mode": ["RGB"], "image_format": ["JPEG"],
                         "image_bytes": [photo.stat().st_size], "image_width": [500], "image_height": [500]},
                        schema_overrides={"image_error": pl.Utf8})


def test_a_thumbnail_that_cannot_be_written_costs_speed_not_the_row(tmp_path, monkeypatch):
    def disk_full(self, rgb, sha256):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Thumbnails, "write", disk_full)
    df = _one_collected_row(tmp_path)
    result = clean_products(df, thumbs=Thumbnails(tmp_path / "thumbs"), workers=1)
    assert result.clean.height == 1 and result.clean["thumb_path"].to_list() == [None]


def test_a_thumbnail_cut_short_by_a_crash_is_written_again_and_temp_files_are_cleared(tmp_path, monkeypatch):
    """Thumbnails are renamed into place without an fsync each; after a power cut one may be empty or cut short.
    Before the fix it was reused for ever, and the embedding stage failed on it (ImageReadError, whole asset)."""
    import os
    import time

    from curation_dagster.core import cleaning

    syncs = []
    monkeypatch.setattr(cleaning.os, "sync", lambda: syncs.append(1))
    df = _one_collected_row(tmp_path)
    thumbs = Thumbnails(tmp_path / "thumbs")
    thumb = clean_products(df, thumbs=thumbs, workers=1).clean["thumb_path"][0]
    assert len(syncs) == 1
    assert clean_products(df, thumbs=thumbs, workers=1).clean["thumb_path"][0] == thumb
    assert len(syncs) == 1  # nothing new written: no machine-wide sync
    good = open(thumb, "rb").read()
    with open(thumb, "r+b") as fh:
        fh.truncate(100)
    stale = Path(thumb).parent / ".tmp-thumb-killed.jpg"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert clean_products(df, thumbs=thumbs, workers=1).clean["thumb_path"][0] == thumb
    assert open(thumb, "rb").read() == good and len(syncs) == 2
    assert not stale.exists()


def test_thumbnails_no_clean_row_names_are_pruned_and_nothing_else(tmp_path, monkeypatch):
    """Content addressing never overwrites a thumbnail: without pruning, every product that left the sample, every
    changed photo and every other min_side would stay on disk for ever."""
    from curation_dagster.core import cleaning

    monkeypatch.setattr(cleaning.os, "sync", lambda: None)
    one = _one_collected_row(tmp_path)
    other = tmp_path / "b.jpg"
    shutil.copy(IMAGES[1], other)
    both = pl.concat([one, one.with_columns(pl.lit(2, dtype=pl.Int64).alias("record_id"),
                                            pl.lit(str(other)).alias("image_path"),
                                            pl.lit(file_sha256(other)).alias("image_sha256"))])
    thumbs = Thumbnails(tmp_path / "thumbs")
    kept, gone = clean_products(both, thumbs=thumbs, workers=1, prune_thumbs=True).clean["thumb_path"].to_list()
    assert Path(kept).is_file() and Path(gone).is_file()
    sha = Path(kept).name[:64]
    older_recipe = Path(kept).parent / f"{sha}-250x250-reduce-q90.jpg"  # a recipe this version no longer makes
    older_recipe.write_bytes(b"x" * 10)
    foreign = [tmp_path / "thumbs" / "README.txt", Path(kept).parent / "notes.jpg", tmp_path / "thumbs" / "zz" / Path(gone).name]
    for f in foreign:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"not a thumbnail of ours")

    # a subset (prune off, the default of the plain function) deletes nothing
    assert clean_products(one, thumbs=thumbs, workers=1).counts.get("thumbnails_pruned") is None
    assert Path(gone).is_file() and older_recipe.is_file()

    gone_bytes = Path(gone).stat().st_size
    result = clean_products(one, thumbs=thumbs, workers=1, prune_thumbs=True)
    assert result.clean["thumb_path"].to_list() == [kept] and Path(kept).is_file()
    assert not Path(gone).exists() and not older_recipe.exists()
    assert result.counts["thumbnails_pruned"] == 2 and result.counts["thumbnail_bytes_pruned"] == gone_bytes + 10
    assert all(f.is_file() for f in foreign)
    # the pruned photo comes back: its thumbnail is made again
    again = clean_products(both, thumbs=thumbs, workers=1, prune_thumbs=True)
    assert again.clean["thumb_path"].to_list() == [kept, gone] and Path(gone).is_file()
    assert again.counts["thumbnails_pruned"] == 0
