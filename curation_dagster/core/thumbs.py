"""Model-input thumbnails: each clean image once more as a small *baseline* JPEG, made while cleaning decodes it.

Why: the embedding stage is bound by JPEG decoding (on a GPU always; on a CPU with a small model), and every
Rakuten photo is a 500x500 *progressive* JPEG, whose entropy decoding DCT scaling cannot skip: decoding it at
250x250 (Pillow ``draft``) is only 1.1-1.3x faster than at full size. Cleaning decodes every image fully anyway (to
reject truncated files), so it writes the picture reduced by an integer factor (box filter: ``Image.reduce``, close
to what DCT scaling gives) to the smallest size that still covers ``min_side`` on its short side, as a baseline JPEG.
The embedding stage then decodes that: ~7x faster per core on the sample photos
(benchmarks/bench_image_loading.py), and every later embedding run (another model, a cache miss) gains again —
the img2dataset practice of resizing once at ingestion, kept next to the originals, which stay what is served.

Content-addressed: ``<root>/<sha256[:2]>/<sha256>-<width>x<height>.jpg`` names the source file's content and the
thumbnail's size, so a changed photo or another ``min_side`` never reuses a stale one, and a re-run writes none.
The embedding cache key of an image embedded from a thumbnail says so (``|thumb<w>x<h>``).
"""
from __future__ import annotations

import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .atomic import DIR_MODE, FILE_MODE, world_readable

THUMB_DIRNAME = "thumbs"
DEFAULT_MIN_SIDE = 224  # CLIP/SigLIP base inputs; a model needing more falls back to the original file
QUALITY = 95  # tiny-random (the most pixel-sensitive model here) min cosine 0.993 to full decoding; 90: 0.990
_NAME_RE = re.compile(r"^[0-9a-f]{64}-(\d+)x(\d+)\.jpg$")


def reduce_factor(width: int, height: int, min_side: int) -> int:
    return max(1, min(width, height) // max(1, min_side))


def reduced_size(width: int, height: int, factor: int) -> tuple[int, int]:
    return -(-width // factor), -(-height // factor)  # Image.reduce rounds up


def thumb_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from a thumbnail's name; None for a path that is not one."""
    m = _NAME_RE.match(Path(path).name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Thumbnails:
    root: Path
    min_side: int = DEFAULT_MIN_SIDE

    def path(self, sha256: str, width: int, height: int) -> Path:
        w, h = reduced_size(width, height, reduce_factor(width, height, self.min_side))
        return self.root / sha256[:2] / f"{sha256}-{w}x{h}.jpg"

    def write(self, rgb: Image.Image, sha256: str) -> Path:
        """The thumbnail of ``rgb`` (the decoded picture of the file whose content hash is ``sha256``)."""
        dest = self.path(sha256, *rgb.size)
        if dest.is_file():
            return dest
        factor = reduce_factor(*rgb.size, self.min_side)
        small = rgb.reduce(factor) if factor > 1 else rgb
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=QUALITY)  # baseline (Pillow's default), 4:2:0
        for d in (self.root, dest.parent):
            d.mkdir(parents=True, exist_ok=True)
            world_readable(d, DIR_MODE)
        # Written aside and renamed (a reader never sees half a file), not fsynced one by one: the cleaning stage
        # syncs once at its end (tens of thousands of fsyncs would cost more than the thumbnails).
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-thumb-", suffix=".jpg")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(buf.getvalue())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest


def image_sources(image_paths: list[str], image_keys: list[str], thumb_paths: list[str | None] | None,
                  loader) -> tuple[list[str], list[str], int]:
    """Per row, the file the embedding stage decodes and its cache key: the thumbnail where the loader may use it
    (it decodes JPEGs at reduced size, and the thumbnail still covers the size it would decode to), else the
    original. Returns (paths, keys, rows that use a thumbnail)."""
    if not thumb_paths or getattr(loader, "decode", "full") != "reduced":
        return list(image_paths), list(image_keys), 0
    paths, keys, used = [], [], 0
    for path, key, thumb in zip(image_paths, image_keys, thumb_paths):
        size = thumb_size(thumb) if thumb else None
        if size is not None and loader.covers(*size) and os.path.isfile(thumb):
            paths.append(thumb)
            keys.append(f"{key}|thumb{size[0]}x{size[1]}")
            used += 1
        else:
            paths.append(path)
            keys.append(key)
    return paths, keys, used
