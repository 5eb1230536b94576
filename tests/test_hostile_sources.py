"""Source data an unlucky operator or a hostile file brings, found by an adversarial review (2026-11-29): each must end
as a clear error or a recorded rejection, never a stage crash or silently changed rows. Each test failed before its
fix."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from curation_dagster.core.cleaning import clean_products
from curation_dagster.core.images import collect_images
from curation_dagster.core.rakuten import LABEL_ONLY_REASONS, SourceLayoutError, read_source
from curation_dagster.resources import CurationPaths


def _accounted(read) -> bool:
    rejected = read.rejections.filter(~pl.col("reason").is_in(LABEL_ONLY_REASONS)).height
    return read.products.height + rejected == read.n_source_rows


# ---------------------------------------------------------------- images


def test_a_png_wider_than_jpeg_allows_is_rejected_not_a_crash(source_builder, tmp_path):
    """A 70000x2 PNG named .jpg (140 kpx, far under the pixel limit) decodes, then the JPEG re-encode (outside the
    try in decode_fully) raises OSError from libjpeg and the whole cleaning stage dies."""
    b = source_builder(3)
    Image.new("RGB", (70_000, 2), (200, 10, 10)).save(b.image_path(b.rows[0]), format="PNG")
    b.write()
    read = read_source(b.root)
    images = collect_images(read.products, tmp_path / "artifacts" / "images", workers=1)
    result = clean_products(images, workers=1)  # before: OSError: broken data stream when writing image file
    assert result.clean.height + result.rejections.height == images.height
    rid = int(b.rows[0]["productid"])
    rejected = result.rejections.filter(pl.col("record_id") == rid)
    assert rejected["reason"].to_list() == ["image_too_large"] and "65500" in rejected["detail"][0]


def test_a_damaged_dds_named_jpg_is_rejected_not_a_crash(source_builder, tmp_path):
    """A file with the DDS magic and an unknown pixel format: Image.open raises NotImplementedError, which
    inspect_and_collect does not catch, so the image-collection stage dies for one bad file."""
    b = source_builder(3)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="DDS")
    data = bytearray(buf.getvalue())
    data[80:84] = (9).to_bytes(4, "little")  # DDS_PIXELFORMAT.dwFlags: a combination Pillow does not implement
    b.image_path(b.rows[0]).write_bytes(bytes(data))
    b.write()
    read = read_source(b.root)
    images = collect_images(read.products, tmp_path / "artifacts" / "images", workers=1)  # before: NotImplementedError
    assert images.height == read.products.height
    row = images.filter(pl.col("record_id") == int(b.rows[0]["productid"])).row(0, named=True)
    assert row["image_status"] == "unreadable"


# ---------------------------------------------------------------- CSVs


def test_csv_with_old_mac_line_endings_is_read(source_builder):
    """CR-only line ends ("CSV (Macintosh)" from Excel): the layout check (Python csv) sees the header, polars reads
    the whole file as one line and the reader crashes with polars' ColumnNotFoundError."""
    b = source_builder(3)
    b.write()
    for name in ("X_train.csv", "Y_train.csv"):
        p = b.root / name
        p.write_bytes(p.read_bytes().replace(b"\r\n", b"\r"))
    read = read_source(b.root)
    assert read.products.height == 3 and _accounted(read)
    assert read.products["prdtypecode"].to_list() == [int(r["prdtypecode"]) for r in b.rows]


def test_an_exactly_repeated_column_name_is_refused(source_builder):
    """_read_csv_strict means to refuse a header naming a column twice, but polars renames an exact repeat to
    "<name>_duplicated_0" first, so the guard never fires: with two productid columns the first is used silently."""
    b = source_builder(3)
    with open(b.root / "X_train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "designation", "description", "productid", "imageid", "productid"])
        for r in b.rows:
            w.writerow([r["index"], r["designation"], "", r["productid"], r["imageid"], "777"])
    with open(b.root / "Y_train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "prdtypecode"])
        for r in b.rows:
            w.writerow([r["index"], r["prdtypecode"]])
    with pytest.raises(SourceLayoutError, match="repeated column names"):
        read_source(b.root)
    # a trailing comma (an empty second unnamed column) is not a repeat
    with open(b.root / "X_train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "designation", "description", "productid", "imageid", ""])
        for r in b.rows:
            w.writerow([r["index"], r["designation"], "", r["productid"], r["imageid"], ""])
    assert read_source(b.root).products.height == 3


def test_an_empty_y_file_is_refused_not_read_as_unlabelled_products(source_builder):
    """Y_train.csv truncated to 0 bytes is not recognised as a Y file (no header), so X_train.csv is read as an
    unlabelled split: every row is kept with prdtypecode null and no rejection. A Y file with its header but no
    rows rejects every X row as missing_label; the empty one should not be silently different."""
    b = source_builder(3)
    b.write()
    (b.root / "Y_train.csv").write_bytes(b"")
    with pytest.raises(SourceLayoutError, match="Y_train.csv is empty .* the labels of X_train.csv are missing"):
        read_source(b.root)


def test_a_non_positive_imageid_is_rejected(source_builder):
    """imageid -7 is read as a product; its collected image is named "-7_<pid>.jpg", which the API's image route
    (IMAGE_NAME_RE: first character alphanumeric) answers 404 for, so the published product has no image. The API's
    own inbox refuses ids < 1 (ge=1)."""
    from api.routers.images import IMAGE_NAME_RE
    from curation_dagster.core.artifacts import image_file_name

    b = source_builder(3)
    old = b.image_path(b.rows[1])
    b.rows[1]["imageid"] = "-7"
    old.rename(b.image_path(b.rows[1]))
    b.write()
    read = read_source(b.root)
    assert _accounted(read)
    for iid, pid in read.products.select("imageid", "productid").iter_rows():
        assert IMAGE_NAME_RE.match(image_file_name(iid, pid)), f"product {pid} kept with an unservable image name"
    rejected = read.rejections.filter(pl.col("record_id") == int(b.rows[1]["productid"]))
    assert rejected["reason"].to_list() == ["invalid_id"] and "imageid='-7'" in rejected["detail"][0]


# ---------------------------------------------------------------- inbox


@pytest.mark.parametrize("field,value", [("productid", "12x"), ("productid", None), ("prdtypecode", "abc")])
def test_a_foreign_inbox_entry_with_a_bad_field_does_not_stop_the_reader(source_builder, tmp_path, field, value):
    """Inbox._parse skips hand-made entries whose record_id is bad ("one bad entry must not stop readers"), but
    inbox_products then calls int() on productid/imageid and builds an Int64 column from prdtypecode unchecked."""
    from curation_dagster.core.inbox import Inbox, inbox_dir

    b = source_builder(3)
    b.write()
    artifacts = tmp_path / "artifacts"
    record = {"record_id": 10**15 + 1, "productid": 10**15 + 1, "imageid": 5, "designation": "Tente",
              "description": "", "prdtypecode": 2583}
    record[field] = value
    Inbox(artifacts).add(record, b.image_path(b.rows[0]).read_bytes())
    read = read_source(b.root, inbox_root=inbox_dir(artifacts))
    assert read.products.height == 3 and _accounted(read)
    rejected = read.rejections.filter(pl.col("reason") == "invalid_inbox_entry")
    assert rejected["record_id"].to_list() == [10**15 + 1] and f"{field} {value!r}" in rejected["detail"][0]


def test_a_jpeg_with_an_orientation_and_a_mistyped_exif_tag_is_kept_or_rejected_not_a_crash(source_builder, tmp_path):
    """EXIF orientation 6 plus XResolution stored as ASCII ("72") instead of RATIONAL (broken EXIF writers do this):
    ImageOps.exif_transpose re-serialises the EXIF and raises TypeError, which decode_fully does not catch, so the
    cleaning stage dies for one photo."""
    import struct

    def entry(tag, typ, count, value4):
        return struct.pack(">HHI", tag, typ, count) + value4

    ifd = struct.pack(">H", 2) + entry(0x011A, 2, 3, b"72\x00\x00") + entry(0x0112, 3, 1, struct.pack(">HH", 6, 0)) \
        + struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    b = source_builder(3)
    with Image.open(b.image_path(b.rows[0])) as im:
        im.convert("RGB").save(b.image_path(b.rows[0]), format="JPEG", quality=95, exif=exif)
    b.write()
    read = read_source(b.root)
    images = collect_images(read.products, tmp_path / "artifacts" / "images", workers=1)
    result = clean_products(images, workers=1)  # before: TypeError: bad operand type for abs(): 'str'
    assert result.clean.height == images.height == 3  # a photo with a broken EXIF tag is still a photo
    row = result.clean.filter(pl.col("record_id") == int(b.rows[0]["productid"])).row(0, named=True)
    assert row["image_rewritten"] == "EXIF orientation 6"
    with Image.open(row["image_path"]) as im, Image.open(b.image_path(b.rows[0])) as src:
        assert im.size == src.size[::-1]  # turned upright, as a browser shows it


def test_pipeline_and_api_agree_on_an_artifacts_dir_with_surrounding_blanks(tmp_path, monkeypatch):
    """A stray blank in an env file: the pipeline (dg.EnvVar passed it on) published into ".../artifacts " while the
    API (core.settings strips) served ".../artifacts" and kept answering 503. From an ops review (2026-11-29)."""
    import dagster as dg

    from curation_dagster.core import settings
    from curation_dagster.resources import build_resources

    monkeypatch.setenv("CURATION_ARTIFACTS_DIR", f"{tmp_path}/artifacts ")
    seen = {}

    @dg.asset
    def where(paths: CurationPaths) -> None:
        seen["pipeline"] = paths.artifacts

    assert dg.materialize([where], resources={"paths": build_resources()["paths"]},
                          instance=dg.DagsterInstance.ephemeral()).success
    assert seen["pipeline"] == settings.artifacts_dir() == tmp_path / "artifacts"
