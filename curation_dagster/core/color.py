"""Any decoded picture → the 8-bit RGB picture a browser shows: the one home of that conversion (pipeline, API).

Pillow's own ``convert("RGB")`` is not that for two kinds of file a catalogue does contain:
- 16-bit greyscale (PNG ``I;16``, or ``I`` as Pillow widens it): values are clipped at 255, not scaled, so the
  picture comes out nearly all white;
- transparency (RGBA, LA, PA, a palette or greyscale with a transparent colour): the alpha is dropped and whatever
  colour sits under the transparent pixels shows (often black), where a browser shows the page (white).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_8bit_grey(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode == "F":
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        scaled = arr * 255.0 if hi <= 1.0 else arr  # 0..1 floats are the usual convention
        return Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8), "L")
    arr = arr.astype(np.int64)
    # 16-bit data: scale to 8 bits. A 32-bit "I" image holding 8-bit values (some TIFFs) is left as it is.
    if im.mode in _SIXTEEN_BIT or (arr.size and int(arr.max()) > 255):
        arr = arr >> 8 if int(arr.max(initial=0)) <= 0xFFFF else arr >> 24
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """``im`` as 8-bit RGB: deep greyscale scaled (not clipped), transparency composited on ``background``."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in (*_SIXTEEN_BIT, "I", "F"):
        grey = _to_8bit_grey(im)
        key = im.info.get("transparency")
        if isinstance(key, int) and not isinstance(key, bool):  # a transparent grey level (PNG tRNS)
            hidden = np.asarray(im).astype(np.int64) == key
            arr = np.asarray(grey).copy()
            arr[hidden] = round(sum(background) / 3)
            grey = Image.fromarray(arr, "L")
        return grey.convert("RGB")
    if has_alpha(im):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return im.convert("RGB")
