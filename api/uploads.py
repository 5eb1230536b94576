"""Image-query uploads: decode a JPEG/PNG/WebP into a small RGB image with bounded memory (413/415 otherwise)."""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import threading
import warnings
from typing import Callable

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from api.service import NotReadyError
from curation_dagster.core.color import has_alpha, to_rgb
from curation_dagster.core.images import exif_orientation, jpeg_scans_detail, jpeg_scans_over, upright

UPLOAD_PATH = "/search/image"
MULTIPART_OVERHEAD = 64 * 1024  # multipart framing allowed beyond the file itself
# Decoded image formats accepted for an image query. Pillow would otherwise also open EPS/PS (through Ghostscript),
# PDF, TIFF, ... : a stated allowlist keeps those decoders (and their bugs) out of reach.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP")
_NOT_AN_IMAGE = "the upload is not a readable image: accepted formats are JPEG, PNG and WebP"
_CORRUPT = "the upload is not a readable image: the JPEG, PNG or WebP data is truncated or corrupt"
_DECODE_WAIT_S = 30.0
_TRIM_ABOVE_PIXELS = 2_000_000  # give freed decode buffers back to the OS after decoding an image this large


def too_large(limit: int) -> str:
    return f"image upload larger than the limit of {limit} bytes (CURATION_API_MAX_UPLOAD_BYTES)"


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (hands freed heap pages back to the OS); None where libc has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, "malloc_trim", None)
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def decode_upload(data: bytes, *, max_pixels: int, target: int = 224, gate: threading.Semaphore | None = None,
                  shrink: Callable[[Image.Image, int], Image.Image] | None = None) -> Image.Image:
    """Decode an uploaded JPEG/PNG/WebP into a small RGB image: 415 when it is not one, 413 for too many pixels.

    Memory is bounded before anything is decoded: the pixel count comes from the header (for JPEG after choosing
    a reduced DCT scale, ``draft``); decoding then happens under ``gate`` (a few at a time), and the image is
    shrunk at once to what the model needs (shortest side ``2 * target``; the model's own preprocessing resizes
    further). After a large decode, freed memory is handed back to the OS.
    """
    shrink = shrink or _shrink
    if not data:
        raise HTTPException(415, "the upload is empty, not an image")
    pixels = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            if img.format == "JPEG":
                img.draft("RGB", (2 * target, 2 * target))  # decode at 1/2, 1/4 or 1/8 scale where that suffices
            width, height = img.size
            pixels = width * height
            if pixels > max_pixels:
                raise HTTPException(413, f"image of {width}x{height} = {pixels} pixels is over the limit of {max_pixels} "
                                         "pixels (CURATION_API_MAX_UPLOAD_PIXELS)")
            if img.format == "JPEG" and (scans := jpeg_scans_over(data)):
                raise HTTPException(413, f"the upload is a {jpeg_scans_detail(scans)}")
            if gate is not None and not gate.acquire(timeout=_DECODE_WAIT_S):
                raise NotReadyError("too many image uploads are being decoded; retry shortly")
            try:
                img.load()
                # upright as a browser shows it (the pipeline rewrites stored images the same way: decode_fully)
                return to_rgb(upright(shrink(img, 2 * target), exif_orientation(img)))  # 16-bit scaled, alpha on white
            finally:
                del img
                if gate is not None:
                    gate.release()
    except (HTTPException, NotReadyError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HTTPException(413, "image has too many pixels (over the decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise HTTPException(415, _NOT_AN_IMAGE) from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - whatever a decoder raises on hostile bytes is the upload's fault: 415, not 500
        raise HTTPException(415, _CORRUPT) from None
    finally:
        if pixels > _TRIM_ABOVE_PIXELS:
            release_memory()


def _shrink(img: Image.Image, short_side: int) -> Image.Image:
    """The image with its shortest side reduced to ``short_side`` (unchanged when already that small)."""
    width, height = img.size
    short = min(width, height)
    if short <= short_side:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # deep greyscale: scaled to 8 bits (convert would clip)
        img = to_rgb(img)
    elif has_alpha(img) and img.mode != "RGBA":  # a transparent colour: as alpha before resizing blends it away
        img = img.convert("RGBA")
    elif img.mode in ("1", "P"):  # modes Pillow resizes poorly or not at all
        img = img.convert("RGB" if img.mode == "P" else "L")
    scale = short_side / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
