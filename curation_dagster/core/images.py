"""Collecting product images into the artifacts directory, and checking that they really decode.

The collected copy is what the encoder reads and what the API serves, so it is a file of the artifacts tree's own:
cloned where the file system can share blocks copy-on-write (btrfs, XFS), copied otherwise, and replaced atomically,
never written in place. Not a hard link to the source: the source tree is someone else's, and a photo rewritten in
place there (an editor, ``rsync --inplace``, PIL's save) would silently change the served pictures of every
published version (they pin the collected files by hard link, see artifacts._pin_images). ``verify()`` alone misses
truncated files, so the decode check loads every pixel.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import polars as pl
from PIL import Image, ImageFile, UnidentifiedImageError

from .artifacts import image_file_name
from .atomic import DIR_MODE, FILE_MODE, atomic_file, world_readable
from .color import to_rgb
from .thumbs import Thumbnails

log = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey picture

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

IMAGE_COLUMNS = {
    "image_file": pl.Utf8,
    "image_path": pl.Utf8,
    "image_status": pl.Utf8,   # ok | missing | unreadable
    "image_error": pl.Utf8,
    "image_sha256": pl.Utf8,
    "image_bytes": pl.Int64,
    "image_width": pl.Int64,
    "image_height": pl.Int64,
    "image_format": pl.Utf8,
    "image_mode": pl.Utf8,
    "image_action": pl.Utf8,   # cloned | copied | unchanged | none
}


MAX_JPEG_SIDE = 65_500  # libjpeg's limit: a picture cleaning must re-encode cannot be wider or taller
MAX_JPEG_SCANS = 100  # libjpeg's progressive script has 10 (colour) or 6 (grey); optimisers rarely pass ~30
_JPEG_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")  # after a scan's data: stuffed 0x00 and RSTn are data


def jpeg_scans_over(data: bytes, limit: int = MAX_JPEG_SCANS) -> int | None:
    """None when a JPEG's first picture has at most ``limit`` scans, else how many it has (counted up to limit + 1).

    Why: a progressive JPEG's decoder walks the whole picture once per scan, and a repeated scan costs ~30 bytes, so a
    250 KB upload with 6,000 scans held a decoding thread for 7.7 s (10 MB: minutes), and Pillow has no limit."""
    if data.count(b"\xff\xda") <= limit:  # every SOS marker is one of these: the usual answer, at memchr speed
        return None
    scans = count_jpeg_scans(data, stop_after=limit)
    return scans if scans > limit else None


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """The SOS markers of a JPEG's first picture (stopping once over ``stop_after``). The walk hops segment to
    segment by their lengths (APPn data, which may hold any bytes, is never searched) and skips each scan's entropy
    data to the next real marker; malformed data ends the count (the decoder then reports it)."""
    i, n, scans = 2, len(data), 0
    while i + 4 <= n and (stop_after is None or scans <= stop_after):
        if data[i] != 0xFF:
            break
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes before a marker
            i += 1
        if i + 1 >= n:
            break
        marker = data[i + 1]
        if marker == 0xD9:  # end of image (an MPO's further pictures are not decoded)
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if i + 4 > n:
            break
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _JPEG_MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
    return scans


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_FICLONE = 0x40049409  # linux/fs.h: share the source's blocks copy-on-write


def _atomic_clone_or_copy(src: Path, dest: Path) -> str:
    """A file of our own at ``dest`` (0644, readable by an API running as another user), renamed into place. Not
    fsynced one by one (85k fsyncs would dominate the stage): a torn file after a crash fails the next run's hash
    comparison and is collected again, and a version fsyncs the images it pins when it is written."""
    tmp = dest.parent / f".tmp-copy-{os.getpid()}-{threading.get_ident()}-{dest.name}"
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            try:
                fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
                action = "cloned"
            except OSError:
                action = "copied"
        if action == "copied":
            shutil.copyfile(src, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return action


def place_image(src: Path, dest: Path, src_sha256: str) -> str:
    """Put ``src`` at ``dest`` unless an identical file is already there (idempotent re-materialization)."""
    if dest.exists():
        try:
            if os.path.samefile(src, dest):  # a hard link made by an earlier version of this code: make it ours
                return _atomic_clone_or_copy(src, dest)
        except OSError:
            pass
        if dest.stat().st_size == src.stat().st_size and file_sha256(dest) == src_sha256:
            return "unchanged"
    return _atomic_clone_or_copy(src, dest)


@dataclass
class ImageInfo:
    status: str
    error: str | None = None
    sha256: str | None = None
    size: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    mode: str | None = None
    action: str = "none"


def inspect_and_collect(src: str, dest: Path) -> ImageInfo:
    """Header-level look (format, size, mode) plus the copy; the full decode happens at cleaning.

    A symlinked source is resolved first: link(2) on a symlink links the symlink itself, and the collected "image"
    would then point into the source tree (or nowhere) instead of being a file the API can serve."""
    path = Path(src)
    if not path.is_file():
        return ImageInfo(status="missing", error=f"no file at {path}")
    path = path.resolve()
    size = path.stat().st_size
    sha = file_sha256(path)
    try:
        with Image.open(path) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
    except Image.DecompressionBombError as exc:
        # Header is readable; cleaning rejects it with the right reason.
        fmt, mode, w, h = None, None, None, None
        action = place_image(path, dest, sha)
        return ImageInfo("ok", f"decompression bomb: {exc}", sha, size, w, h, fmt, mode, action)
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types (a damaged DDS: NotImplementedError)
        what = "empty file (0 bytes)" if size == 0 else f"{type(exc).__name__}: {exc}"
        return ImageInfo(status="unreadable", error=what, sha256=sha, size=size)
    action = place_image(path, dest, sha)
    return ImageInfo("ok", None, sha, size, w, h, fmt, mode, action)


def collect_images(df: pl.DataFrame, images_dir: Path, *, workers: int = 4,
                   progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
    """Add the IMAGE_COLUMNS to ``df`` (one row per input row, none dropped)."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    for d in (images_dir.parent, images_dir):  # the API may run as another user, under any umask of ours
        world_readable(d, DIR_MODE)
    names = [image_file_name(i, p) for i, p in zip(df["imageid"].to_list(), df["productid"].to_list())]
    srcs = df["source_image_path"].to_list()
    infos: list[ImageInfo] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, info in enumerate(pool.map(lambda a: inspect_and_collect(a[0], images_dir / a[1]), zip(srcs, names))):
            infos.append(info)
            if progress and ((i + 1) % 200 == 0 or i + 1 == len(names)):
                progress(i + 1, len(names))
    cols = {
        "image_file": names,
        "image_path": [str(images_dir / n) if inf.status == "ok" else None for n, inf in zip(names, infos)],
        "image_status": [i.status for i in infos],
        "image_error": [i.error for i in infos],
        "image_sha256": [i.sha256 for i in infos],
        "image_bytes": [i.size for i in infos],
        "image_width": [i.width for i in infos],
        "image_height": [i.height for i in infos],
        "image_format": [i.format for i in infos],
        "image_mode": [i.mode for i in infos],
        "image_action": [i.action for i in infos],
    }
    return df.with_columns(pl.Series(k, v, dtype=IMAGE_COLUMNS[k]) for k, v in cols.items())


@dataclass
class DecodeResult:
    ok: bool
    reason: str | None = None   # image_corrupt | image_too_large | image_unreadable
    detail: str | None = None
    converted_from: str | None = None  # original mode when the file was rewritten as RGB
    rewritten: str | None = None  # why the file was rewritten, e.g. "CMYK → RGB; PNG → JPEG; EXIF orientation 6"
    size: tuple[int, int] | None = None  # (width, height) of the rewritten file (an EXIF rotation swaps them)
    sha256: str | None = None  # of the file as it now is (when rewritten, or with ``thumbs``)
    thumb: str | None = None  # its model-input thumbnail (core/thumbs.py), with ``thumbs``
    thumb_written: bool = False  # written by this call (not found from an earlier run)


def decode_fully(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, convert_to_rgb: bool = True,
                 thumbs: Thumbnails | None = None) -> DecodeResult:
    """Decode every pixel. An image that decodes but is not an upright RGB JPEG is rewritten as one in place
    (atomically): another mode is converted to RGB, another format (a PNG or WebP named .jpg) becomes a JPEG, so
    that what is served as image/jpeg is one, and an EXIF orientation is applied to the pixels, so that the model
    embeds the picture a browser shows (the sideways pixels embedded at cosine -0.06 to the upright picture).
    ``thumbs``: also write the model-input thumbnail of the (rewritten) picture, from this one decode."""
    path = Path(path)
    thumb = digest = None
    written = False
    # The pixel limit is checked on the header before decoding (no global Pillow state is changed: threads share it).
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                return DecodeResult(False, "image_too_large",
                                    f"{w}x{h} = {w * h} pixels exceeds the decompression-bomb limit of {max_pixels}")
            data = None
            if im.format in ("JPEG", "MPO"):  # the file's bytes are needed for its hash anyway
                data = path.read_bytes()
                if scans := jpeg_scans_over(data):
                    return DecodeResult(False, "image_too_large", jpeg_scans_detail(scans))
            im.load()
            mode, fmt = im.mode, im.format
            orientation = exif_orientation(im) if convert_to_rgb else 1
            why = [f"{mode} → RGB"] * (mode != "RGB") + [f"{fmt} → JPEG"] * (fmt not in ("JPEG", "MPO")) \
                + [f"EXIF orientation {orientation}"] * (orientation != 1)
            rgb = None
            if convert_to_rgb and why:
                rgb = to_rgb(upright(im, orientation))
            if thumbs is not None and rgb is None:  # an upright RGB JPEG as it is (the usual case)
                digest = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(path)
                thumb, written = _write_thumb(thumbs, im, digest)
    except Image.DecompressionBombError as exc:
        return DecodeResult(False, "image_too_large", str(exc))
    except UnidentifiedImageError as exc:
        return DecodeResult(False, "image_unreadable", f"not an image: {exc}")
    except Exception as exc:  # noqa: BLE001 - a decoder's error on one file is that row's rejection, not the stage's
        return DecodeResult(False, "image_corrupt", f"{type(exc).__name__}: {exc}")
    if rgb is None:
        return DecodeResult(True, sha256=digest, thumb=thumb, thumb_written=written)
    if max(rgb.size) > MAX_JPEG_SIDE:  # a 70000x2 PNG is 140 kpx, but no JPEG can hold it
        return DecodeResult(False, "image_too_large", f"{rgb.size[0]}x{rgb.size[1]} cannot be stored as a JPEG "
                                                      f"(at most {MAX_JPEG_SIDE} pixels a side)")
    buf = io.BytesIO()
    try:
        rgb.save(buf, format="JPEG", quality=95)
    except (OSError, ValueError) as exc:
        return DecodeResult(False, "image_corrupt", f"cannot be re-encoded as a JPEG: {type(exc).__name__}: {exc}")
    with atomic_file(path) as tmp:  # replaces a hard link with a new file: the source tree is never modified
        tmp.write_bytes(buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()  # the rewritten file's new hash (the bytes are at hand)
    if thumbs is not None:
        thumb, written = _write_thumb(thumbs, rgb, digest)
    return DecodeResult(True, converted_from=mode if mode != "RGB" else None, rewritten="; ".join(why), size=rgb.size,
                        sha256=digest, thumb=thumb, thumb_written=written)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8); 1 when there is none or the EXIF block cannot be parsed (broken writers are
    common, and the pixels are still a photo)."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - any parse failure of the metadata means "no usable orientation"
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def upright(im: Image.Image, orientation: int | None = None) -> Image.Image:
    """The picture as a browser shows it. Not ImageOps.exif_transpose: that also rewrites the EXIF block, and a
    mistyped tag (XResolution stored as text) made it raise TypeError and stop the whole cleaning stage."""
    orientation = exif_orientation(im) if orientation is None else orientation
    return im.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else im


def jpeg_scans_detail(scans: int) -> str:
    return (f"JPEG with over {MAX_JPEG_SCANS} scans ({scans}+): a progressive decoder walks the whole picture once per "
            "scan (a decoding-time bomb); re-save the image")


def _write_thumb(thumbs: Thumbnails, picture: Image.Image, digest: str) -> tuple[str | None, bool]:
    """A thumbnail that cannot be written (disk full) costs the embedding stage speed, not the row."""
    try:
        path, written = thumbs.write(picture, digest)
    except OSError as exc:
        thumbs.warn_once(f"thumbnail of {digest[:12]} not written ({exc}): the embedding stage decodes the original")
        return None, False
    return (str(path) if path is not None else None), written


def decode_many(paths: Iterable[str | None], *, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4,
                progress: Callable[[int, int], None] | None = None, convert_to_rgb: bool = True,
                thumbs: Thumbnails | None = None) -> list[DecodeResult]:
    """``decode_fully`` over many files on a thread pool (Pillow decodes without the GIL), results in input order."""
    paths = list(paths)

    def one(p: str | None) -> DecodeResult:
        if p is None:
            return DecodeResult(False, "image_missing", "no collected image")
        return decode_fully(Path(p), max_pixels=max_pixels, convert_to_rgb=convert_to_rgb, thumbs=thumbs)

    out: list[DecodeResult] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, r in enumerate(pool.map(one, paths)):
            out.append(r)
            if progress and ((i + 1) % 200 == 0 or i + 1 == len(paths)):
                progress(i + 1, len(paths))
    return out
