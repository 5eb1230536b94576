"""Model-input thumbnails: each clean image once more as a small *baseline* JPEG, made while cleaning decodes it.

Why: the embedding stage is bound by JPEG decoding (on a GPU always; on a CPU with a small model), and every
Rakuten photo is a 500x500 *progressive* JPEG, whose entropy decoding DCT scaling cannot skip: decoding it at
250x250 (Pillow ``draft``) is only 1.1-1.3x faster than at full size. Cleaning decodes every image fully anyway (to
reject truncated files), so it writes the picture reduced by an integer factor (a box-filter resize, close to what
DCT scaling gives) to the smallest size that still covers ``min_side`` on its short side, as a baseline JPEG.
The embedding stage then decodes that: ~7x faster per core on the sample photos
(benchmarks/bench_image_loading.py), and every later embedding run (another model, a cache miss) gains again —
the img2dataset practice of resizing once at ingestion, kept next to the originals, which stay what is served.

Content-addressed: ``<root>/<sha256[:2]>/<sha256>-<width>x<height>-<recipe>.jpg`` names the source file's content,
the thumbnail's size and how it was made, so a changed photo, another ``min_side`` or another recipe never reuses a
stale one, and a re-run writes none (a file cut short by a crash is written again). Pictures whose short side is
under twice ``min_side`` get none (the loader reads the original). The embedding cache key of an image embedded
from a thumbnail says so (``|thumb<w>x<h>-<recipe>``).
"""
from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

from .atomic import DIR_MODE, FILE_MODE, world_readable

THUMB_DIRNAME = "thumbs"
DEFAULT_MIN_SIDE = 224  # CLIP/SigLIP base inputs; a model needing more falls back to the original file
QUALITY = 95  # tiny-random (the most pixel-sensitive model here) min cosine 0.993 to full decoding; 90: 0.990
RECIPE = f"box-q{QUALITY}"  # how a thumbnail is made: in its name and its embeddings' cache key
_NAME_RE = re.compile(r"^([0-9a-f]{64})-(\d+)x(\d+)-" + re.escape(RECIPE) + r"\.jpg$")
_ANY_RECIPE_RE = re.compile(r"^[0-9a-f]{64}-\d+x\d+-[a-z0-9][a-z0-9-]*\.jpg$")  # this and earlier recipes
_SHARD_RE = re.compile(r"^[0-9a-f]{2}$")
_STALE_TMP_S = 3600.0
log = logging.getLogger(__name__)
_warned: set[str] = set()


def reduce_factor(width: int, height: int, min_side: int) -> int:
    return max(1, min(width, height) // max(1, min_side))


def reduced_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """The picture's size divided by ``factor``, rounded: the box resize maps the whole picture onto it, so the
    geometry stays exact whether or not the factor divides the size (Image.reduce rounds up and then counts a last
    row of 1-2 source pixels as a whole one: a 700-px photo's thumbnail was stretched, cosine 0.94)."""
    return max(1, round(width / factor)), max(1, round(height / factor))


def parse_name(path: str | Path) -> tuple[str, int, int] | None:
    """(source sha256, width, height) from a thumbnail's name; None for a path that is not one of this recipe's."""
    m = _NAME_RE.match(Path(path).name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def thumb_size(path: str | Path) -> tuple[int, int] | None:
    parsed = parse_name(path)
    return parsed[1:] if parsed else None


def _complete_jpeg(path: Path) -> bool:
    """Ends with the JPEG end-of-image marker: a file cut short (a crash before the data reached the disk) does not."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-2, os.SEEK_END)
            return fh.read(2) == b"\xff\xd9"
    except OSError:
        return False


@dataclass(frozen=True)
class Thumbnails:
    root: Path
    min_side: int = DEFAULT_MIN_SIDE

    def path(self, sha256: str, width: int, height: int) -> Path | None:
        """Where the thumbnail of a ``width`` x ``height`` picture goes; None when it would not be smaller by at least
        half (a re-encode at full size would be larger than the original and gain little)."""
        factor = reduce_factor(width, height, self.min_side)
        if factor < 2:
            return None
        w, h = reduced_size(width, height, factor)
        return self.root / sha256[:2] / f"{sha256}-{w}x{h}-{RECIPE}.jpg"

    def write(self, rgb: Image.Image, sha256: str) -> tuple[Path | None, bool]:
        """The thumbnail of ``rgb`` (the decoded picture of the file whose content hash is ``sha256``), and whether
        it was written now (False: it was there already, or none is made for a picture this small)."""
        dest = self.path(sha256, *rgb.size)
        if dest is None:
            return None, False
        if dest.is_file() and _complete_jpeg(dest):
            return dest, False
        factor = reduce_factor(*rgb.size, self.min_side)
        w, h = rgb.size
        # the same box average either way (within 1 grey level); reduce is 4x faster but exact only when f divides
        small = rgb.reduce(factor) if w % factor == 0 and h % factor == 0 else \
            rgb.resize(reduced_size(w, h, factor), Image.Resampling.BOX)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=QUALITY)  # baseline (Pillow's default), 4:2:0
        for d in (self.root, dest.parent):
            d.mkdir(parents=True, exist_ok=True)
            world_readable(d, DIR_MODE)
        # Written aside and renamed (a reader never sees half a file), not fsynced one by one: the cleaning stage
        # syncs once at its end if it wrote any (tens of thousands of fsyncs would cost more than the thumbnails).
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-thumb-", suffix=".jpg")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(buf.getvalue())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest, True

    def warn_once(self, message: str) -> None:
        """One warning per thumbnail folder and process (an unwritable folder must not log 85k lines)."""
        key = str(self.root)
        if key not in _warned:
            _warned.add(key)
            log.warning("%s (further thumbnail failures under %s are not logged)", message, self.root)

    def clean_stale_temp(self, older_than_s: float = _STALE_TMP_S) -> int:
        """Remove temp files of writers killed mid-write (a live writer's is seconds old)."""
        n = 0
        now = time.time()
        for tmp in self.root.glob("*/.tmp-thumb-*") if self.root.is_dir() else ():
            try:
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    n += 1
            except OSError:
                pass
        return n

    def prune(self, keep: Iterable[str | os.PathLike | None]) -> tuple[int, int]:
        """Delete the thumbnails that no row of the new clean table names: products gone from the sample, photos
        that changed, another ``min_side`` or an older recipe. Content addressing never overwrites them, so without
        this the folder only grows. Returns (files, bytes) removed. Only files named like thumbnails, in the
        two-hex-digit folders, are touched. Safe under the run lease: no embedding run reads the folder meanwhile, and
        a later one whose clean table still names a deleted file reads the original instead (image_sources)."""
        if not self.root.is_dir():
            return 0, 0
        wanted = {os.path.abspath(p) for p in keep if p}
        files = freed = 0
        with os.scandir(self.root) as shards:
            for shard in shards:
                if not (_SHARD_RE.match(shard.name) and shard.is_dir(follow_symlinks=False)):
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in entries:
                        if not _ANY_RECIPE_RE.match(entry.name) or os.path.abspath(entry.path) in wanted:
                            continue
                        try:
                            if not entry.is_file(follow_symlinks=False):
                                continue
                            size = entry.stat(follow_symlinks=False).st_size
                            os.unlink(entry.path)
                        except OSError as exc:  # a read-only or vanished file: leave it, say so once
                            self.warn_once(f"cannot remove stale thumbnail {entry.path}: {exc}")
                            continue
                        files += 1
                        freed += size
        return files, freed


def image_sources(image_paths: list[str], image_keys: list[str], thumb_paths: list[str | None] | None,
                  loader) -> tuple[list[str], list[str], int]:
    """Per row, the file the embedding stage decodes and its cache key: the thumbnail where the loader may use it
    (it decodes JPEGs at reduced size, the thumbnail is of this row's file — its name holds the file's sha256 — and
    it covers the model's input), else the original. Returns (paths, keys, rows that use a thumbnail)."""
    if not thumb_paths or getattr(loader, "decode", "full") != "reduced":
        return list(image_paths), list(image_keys), 0
    paths, keys, used = [], [], 0
    for path, key, thumb in zip(image_paths, image_keys, thumb_paths):
        parsed = parse_name(thumb) if thumb else None
        if parsed is not None and parsed[0] == key and loader.covers(*parsed[1:]) and os.path.isfile(thumb):
            paths.append(thumb)
            keys.append(f"{key}|thumb{parsed[1]}x{parsed[2]}-{RECIPE}")
            used += 1
        else:
            paths.append(path)
            keys.append(key)
    return paths, keys, used
