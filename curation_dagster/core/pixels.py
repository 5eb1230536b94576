"""Image files → the image tower's input tensors, fast on a CPU.

Why: with a small model (and on a GPU with any model) the embedding stage waits on image loading, not on the
model. On the bundled Rakuten images (500x500 progressive JPEGs) one core decoded ~600 images/s and the model's
own image processor (the PIL backend: resize, crop, rescale, normalise, one numpy pass each per image, then a
stack) managed ~270 images/s on top of that. Two savings, both checked:

* Reduced-size JPEG decoding (``CURATION_IMAGE_DECODE=reduced``, the default): libjpeg's DCT scaling through
  Pillow's ``draft`` decodes at 1/2, 1/4 or 1/8 scale when the result still covers the processor's resize target
  in both directions (a 500x500 product image decodes at 250x250 for a 224 input). The pixels change a little (a
  DCT-domain downscale before the processor's bicubic resize): image embeddings stay within cosine 0.99 of full
  decoding (tests/test_pixels.py on the sample images; benchmarks/bench_image_loading.py with a full-size
  ViT-B/32). ``full`` decodes every pixel. The mode is part of the embedding cache identity.
* One vectorised rescale + normalise for the batch (torch) instead of per-image numpy passes, for processors that
  are a plain resize → centre crop → rescale → normalise (CLIP, SigLIP). The processor stays the reference: the
  fast path is used only if it reproduces the processor's output on probe images of several shapes (max abs
  difference <= ``FAST_TOLERANCE``) when the loader is built; otherwise (SigLIP 2's patch packing, padding, a
  torchvision-backed processor that resizes differently) every batch goes through the processor itself.
* The resize itself (bicubic or bilinear, antialiased) runs in torch on the uint8 batch: torch's uint8 antialiased
  kernels use Pillow's filter (support, coefficients, two passes rounding to 8 bits), at 6x its speed (250→224
  bicubic: 1.2 → 0.2 ms per image, one core; Pillow's resize had become the largest cost after the decode). The
  two libraries do not always run the two passes in the same order (Pillow 13 sometimes resizes vertically first;
  then the 8-bit intermediate rounds differently, up to ~25 grey levels on noise when upscaling). So torch resizes
  a given (input size → output size) only after it matched Pillow on a noise image of that size to within
  ``RESIZE_LEVELS`` grey levels (checked once per size pair, cached); other sizes, other filters and inputs over
  ``TORCH_RESIZE_MAX_PIXELS`` go through Pillow. Part of the embedding cache key (``resize_key``): the pixels can
  differ, if barely (the bundled photos: 250x250 → 224x224 within 2 levels).
* Extreme aspect ratios are cut down before any resize (``centre_window``): a processor that resizes the shortest
  edge to 224 and then keeps the centre 224x224 would first blow a 2x40,000 banner (a few KB as PNG) up to
  224x4,480,000 pixels — gigabytes, for a crop that uses 0.005% of it (measured: a 2x4000 image cost 2 GB and
  11 s). Past ``MAX_ASPECT`` the long side is first cut to its centre ``MAX_ASPECT`` short sides, so the centre
  crop keeps the same content.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .color import to_rgb
from .models.base import ImageInputs, ModelAdapter

FAST_TOLERANCE = 1e-4
RESIZE_LEVELS = 2  # most a torch resize may differ from Pillow's, in 8-bit grey levels, for the fast path to use it
TORCH_RESIZE_MAX_PIXELS = 1 << 20  # larger inputs resize in Pillow (the per-size check would cost a large resize)
_RESIZE_CHECKS_MAX = 4096  # size pairs checked at most; past that, new sizes resize in Pillow
_STACK_PIXELS = 8 << 20  # input pixels stacked for one torch resize call (24 MB as RGB bytes)
# PIL filters torch reproduces on uint8 with antialiasing (torch.nn.functional.interpolate mode names)
_TORCH_MODES = {int(Image.Resampling.BICUBIC): "bicubic", int(Image.Resampling.BILINEAR): "bilinear"}
# Probe shapes (width, height): square product photos, landscape, portrait, and one smaller than the input.
_PROBE_SHAPES = ((500, 500), (640, 480), (300, 700), (120, 90))
# A longer side than this many short sides is cut to its centre before a shortest-edge resize. 16: the largest
# intermediate is then 224x3584 (2.4 MB as bytes); ordinary photos are never touched, so their pixels stay exactly
# the processor's (cutting changes the rounded resize size, so the kept centre can move by a fraction of a pixel).
MAX_ASPECT = 16


class ImageReadError(ValueError):
    """An image file could not be read or decoded (cleaning upstream should have removed it)."""


def _field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def centre_window(width: int, height: int, max_aspect: int = MAX_ASPECT) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the centre part of a width x height image whose long side is ``max_aspect``
    short sides, or None when the image is within that already. The centre crop needs one short side; the rest
    (7.5 short sides each way at 16) is margin, far more than the resize filter reaches."""
    short, long = min(width, height), max(width, height)
    keep = max_aspect * short
    if long <= keep:
        return None
    start = (long - keep) // 2
    return (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)


def cut_to_centre(images: Sequence[Any]) -> list[Any]:
    """Each image (PIL, or a [3, h, w] tensor from the GPU decoder) cut to its ``centre_window`` where it has one."""
    out = []
    for im in images:
        pil = isinstance(im, Image.Image)
        box = centre_window(*(im.size if pil else (int(im.shape[-1]), int(im.shape[-2]))))
        out.append(im if box is None else im.crop(box) if pil else im[..., box[1]:box[3], box[0]:box[2]])
    return out


def crops_shortest_edge(processor: Any) -> bool:
    """Whether the processor resizes the shortest edge and then centre-crops (CLIP-style): the case where an
    extreme aspect ratio would make the intermediate image huge while the crop keeps only its centre."""
    size = getattr(processor, "size", None)
    return bool(getattr(processor, "do_resize", False) and _field(size, "shortest_edge")
                and getattr(processor, "do_center_crop", False))


@dataclass(frozen=True)
class PlainRecipe:
    """resize (shortest edge, or to a fixed height x width) → optional centre crop → rescale → normalise."""

    shortest_edge: int | None
    height: int | None
    width: int | None
    resample: int
    crop: tuple[int, int] | None  # (height, width)
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize, computed by the processor library's own helper."""
        if self.shortest_edge is None:
            return int(self.width), int(self.height)  # type: ignore[arg-type]
        from transformers.image_transforms import get_resize_output_image_size
        from transformers.image_utils import ChannelDimension

        shape_only = np.broadcast_to(np.uint8(0), (3, height, width))  # no memory: only the shape is read
        new_h, new_w = get_resize_output_image_size(shape_only, size=self.shortest_edge, default_to_square=False,
                                                    input_data_format=ChannelDimension.FIRST)
        return int(new_w), int(new_h)

    def level_step(self) -> float:
        """How much one 8-bit grey level moves an output value (rescale / std, the largest channel)."""
        scale = 1.0 if self.rescale is None else self.rescale
        return scale / min(abs(v) for v in self.std) if self.std else scale

    def draft_request(self) -> tuple[int, int]:
        """The (width, height) a reduced JPEG decode must still cover: the resize target in both directions."""
        if self.shortest_edge is not None:
            return self.shortest_edge, self.shortest_edge
        return int(self.width), int(self.height)  # type: ignore[arg-type]


def plain_recipe(processor: Any) -> PlainRecipe | None:
    """The processor's steps as a PlainRecipe, or None when it does anything else."""
    if getattr(processor, "do_pad", None) or getattr(processor, "do_convert_rgb", True) is False:
        return None
    if not getattr(processor, "do_resize", False):
        return None
    size = getattr(processor, "size", None)
    shortest, height, width = _field(size, "shortest_edge"), _field(size, "height"), _field(size, "width")
    if any(_field(size, k) for k in ("longest_edge", "max_height", "max_width")):
        return None
    if not shortest and not (height and width):
        return None
    crop = None
    if getattr(processor, "do_center_crop", False):
        cs = getattr(processor, "crop_size", None)
        ch, cw = _field(cs, "height"), _field(cs, "width")
        if not (ch and cw):
            return None
        crop = (ch, cw)
    resample = getattr(processor, "resample", None)
    resample = int(resample) if resample is not None else int(Image.Resampling.BILINEAR)
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
    mean = std = None
    if getattr(processor, "do_normalize", False):
        mean, std = (tuple(float(v) for v in np.broadcast_to(np.asarray(getattr(processor, k), np.float64), (3,)))
                     for k in ("image_mean", "image_std"))
    return PlainRecipe(shortest_edge=shortest, height=None if shortest else height, width=None if shortest else width,
                       resample=resample, crop=crop, rescale=rescale, mean=mean, std=std)


def _probe_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for w, h in _PROBE_SHAPES:  # smooth gradients + noise: resampling differences would show
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), ((xx + yy) * 127 // max(1, w + h))], -1)
        noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(noisy, "RGB"))
    return out


class ImageLoader:
    """Decodes image files and turns PIL images into the image tower's inputs, as configured (see module doc).

    Picklable (DataLoader worker processes get a copy)."""

    def __init__(self, image_processor: Any, adapter: ModelAdapter, *, decode: str = "reduced",
                 fallback_side: int = 224, vectorise: bool = True, torch_resize: bool = True):
        if decode not in ("reduced", "full"):
            raise ValueError(f"decode must be 'reduced' or 'full'; got {decode!r}")
        self.image_processor = image_processor
        self.adapter = adapter
        self.decode = decode
        # Only adapters whose preprocessing is the processor's pixel_values alone can use the vectorised path.
        plain_adapter = type(adapter).preprocess is ModelAdapter.preprocess
        recipe = plain_recipe(image_processor) if plain_adapter and vectorise else None
        self.recipe = recipe
        self._draft = recipe.draft_request() if recipe else (fallback_side, fallback_side)
        self.bound_aspect = crops_shortest_edge(image_processor)  # see centre_window
        self.fast_max_diff: float | None = None
        self.fast = False
        # The fast path may resize in torch (see module doc); which size pairs it may: _torch_resize_agrees. The
        # recipe is held to the processor strictly (Pillow resizing, torch_resize still off while it is verified).
        self.torch_resize = False
        self._resize_checked: dict[tuple[int, int, int, int], bool] = {}
        if recipe is not None:
            self.fast_max_diff = self._verify()
            self.fast = self.fast_max_diff is not None and self.fast_max_diff <= FAST_TOLERANCE
            self.torch_resize = torch_resize and self.fast and recipe.resample in _TORCH_MODES

    def covers(self, width: int, height: int) -> bool:
        """Whether a picture of this size still covers the model's input in both directions, as a reduced decode
        must (core/thumbs.py: may a thumbnail stand in for the original)."""
        return width >= self._draft[0] and height >= self._draft[1]

    @property
    def resize_key(self) -> str:
        """Suffix for the embedding cache key: '' when the pixels are the processor's (to FAST_TOLERANCE).

        Says what the loader may do, not what each image got: with torch resizing on, some size pairs still go
        through Pillow, and the opt-in nvJPEG path preprocesses on the GPU (as with ``|jpeg-reduced``). Banner
        cutting (centre_window) is not in the key: it changes only images that could not be embedded sanely
        before."""
        return "|resize-torch" if self.torch_resize else ""

    # ------------------------------------------------------------------------------------------ describing
    def describe(self) -> dict:
        decode = (f"reduced (JPEG DCT scaling, covering {self._draft[0]}x{self._draft[1]})" if self.decode == "reduced"
                  else "full")
        name = type(self.image_processor).__name__
        if self.torch_resize:
            pre = (f"vectorised (reproduces {name}: max abs difference {self.fast_max_diff:.1e}), resized in torch "
                   f"where it matches Pillow within {RESIZE_LEVELS} grey levels")
        elif self.fast:
            pre = f"vectorised (reproduces {name}: max abs difference {self.fast_max_diff:.1e})"
        elif self.recipe is None:
            pre = name
        elif self.fast_max_diff is None:
            pre = f"{name} (the vectorised path could not reproduce it on the probe images)"
        else:
            pre = f"{name} (the vectorised path differed by {self.fast_max_diff:.1e})"
        return {"image_decode": decode, "image_preprocess": pre}

    # ------------------------------------------------------------------------------------------ decoding
    def open(self, path: str | os.PathLike) -> Image.Image:
        """A fully decoded RGB image (reduced in size where the mode allows); ImageReadError names a bad file."""
        try:
            with Image.open(path) as im:
                if self.decode == "reduced" and im.format == "JPEG":
                    im.draft(None, self._draft)  # no-op when a smaller scale would not cover the target
                im.load()  # the whole decode inside the try: a truncated file fails here, naming the file
                return to_rgb(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageReadError(f"cannot read image file {os.fspath(path)!r}: {type(exc).__name__}: {exc}") from exc

    def load(self, paths: Sequence[str | os.PathLike]) -> ImageInputs:
        return self.preprocess([self.open(p) for p in paths])

    # ------------------------------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[Image.Image]) -> ImageInputs:
        if self.bound_aspect:
            images = cut_to_centre(images)
        rgb = [to_rgb(im) for im in images]
        if self.fast:
            pixels = self._vectorised(rgb)
            if pixels is not None:
                return {"pixel_values": pixels}
        return self.adapter.preprocess(self.image_processor, rgb)

    def _vectorised(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        """The recipe as batch operations: resize (torch, or the same Pillow call the processor's PIL backend
        makes), crop, one rescale/normalise; None when a case needs the processor (a crop larger than the image)."""
        r = self.recipe
        assert r is not None
        planes: list[torch.Tensor | None] = [None] * len(images)  # each [3, h, w] uint8, after resize and crop
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        for (w, h), idx in by_size.items():
            size = r.output_size(w, h)
            if size != (w, h) and not self._torch_resize_agrees(w, h, *size):
                group = torch.from_numpy(np.stack([np.asarray(images[i].resize(size, resample=r.resample))
                                                   for i in idx])).permute(0, 3, 1, 2)
            else:  # [n, 3, h, w] views of the group's bytes (channels last in memory, as torch's kernels like),
                # stacked a few megapixels at a time: the inputs can be up to TORCH_RESIZE_MAX_PIXELS each
                step = max(1, _STACK_PIXELS // (w * h))
                parts = []
                for k in range(0, len(idx), step):
                    part = torch.from_numpy(np.stack([np.asarray(images[i]) for i in idx[k:k + step]]))
                    part = part.permute(0, 3, 1, 2)
                    if size != (w, h):
                        part = F.interpolate(part, size=(size[1], size[0]), mode=_TORCH_MODES[r.resample],
                                             antialias=True, align_corners=False)
                    parts.append(part)
                group = parts[0] if len(parts) == 1 else torch.cat(parts)
            if r.crop is not None:
                ch, cw = r.crop
                top, left = (size[1] - ch) // 2, (size[0] - cw) // 2
                if top < 0 or left < 0:
                    return None  # the processor pads here
                group = group[:, :, top:top + ch, left:left + cw]
            for j, i in enumerate(idx):
                planes[i] = group[j]
        if len({tuple(p.shape) for p in planes if p is not None}) > 1:
            return None
        # [n, 3, h, w] contiguous while still 1 byte a value, then one float copy and an in-place multiply and add
        # per channel: (x * rescale - mean) / std == x * scale + shift. Two passes over the float batch fewer than
        # rescale, subtract, divide, permute (measured 0.9-1.0 -> 0.4 ms per 224x224 image, one thread; the
        # result differs by float rounding only, < 1e-6).
        x = torch.stack(planes).to(torch.float32)  # type: ignore[arg-type]
        scale = torch.full((3,), 1.0 if r.rescale is None else r.rescale, dtype=torch.float64)
        shift = torch.zeros(3, dtype=torch.float64)
        if r.mean is not None and r.std is not None:
            std = torch.tensor(r.std, dtype=torch.float64)
            scale, shift = scale / std, -torch.tensor(r.mean, dtype=torch.float64) / std
        if r.rescale is None and r.mean is None:
            return x
        return x.mul_(scale.float().view(1, 3, 1, 1)).add_(shift.float().view(1, 3, 1, 1))

    def _torch_resize_agrees(self, w: int, h: int, out_w: int, out_h: int) -> bool:
        """Whether torch resizes (w, h) → (out_w, out_h) within RESIZE_LEVELS of Pillow: checked on seeded uniform
        noise (the worst case for rounding and clipping between the passes), once per size pair."""
        if not self.torch_resize or w * h > TORCH_RESIZE_MAX_PIXELS:
            return False
        key = (w, h, out_w, out_h)
        ok = self._resize_checked.get(key)
        if ok is None and len(self._resize_checked) >= _RESIZE_CHECKS_MAX:
            return False  # a corpus of thousands of sizes: Pillow for the new ones, no check per image
        if ok is None:
            r = self.recipe
            assert r is not None
            noise = np.random.default_rng(w * 65537 + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
            ref = np.asarray(Image.fromarray(noise).resize((out_w, out_h), resample=r.resample), dtype=np.int16)
            got = F.interpolate(torch.from_numpy(noise).permute(2, 0, 1)[None], size=(out_h, out_w),
                                mode=_TORCH_MODES[r.resample], antialias=True, align_corners=False)
            ok = int(np.abs(got[0].permute(1, 2, 0).numpy().astype(np.int16) - ref).max()) <= RESIZE_LEVELS
            self._resize_checked[key] = ok
        return ok

    def _verify(self) -> float | None:
        """Max abs difference between the vectorised path and the processor on the probe images (None: unusable)."""
        try:
            probes = _probe_images()
            diffs = []
            for im in probes:  # one at a time: the processor needs equal shapes only within a batch it returns
                ref = self.adapter.preprocess(self.image_processor, [im])["pixel_values"]
                got = self._vectorised([im])
                if got is None or tuple(got.shape) != tuple(ref.shape):
                    return None
                diffs.append(float((got - ref.to(torch.float32)).abs().max()))
            return max(diffs)
        except Exception:  # noqa: BLE001 - any surprise means: use the processor
            return None
