"""Dual-encoder batch encoder: any Hugging Face image-text dual encoder (Hub id or local directory) through
`transformers` — CLIP, SigLIP, SigLIP 2 (multilingual checkpoints included).

* Families: the checkpoint's config.json `model_type` picks one adapter (core/models/: clip.py, siglip.py) that
  owns everything architecture-specific — the model class, image preprocessing (CLIP: crop + CLIP mean/std;
  SigLIP: its own square size, mean = std = 0.5; SigLIP 2: patches + attention mask + spatial shapes), text
  padding (CLIP: to the longest in the batch; SigLIP: `padding="max_length"` as trained), feature extraction,
  embedding dim, max text length, score scale and the text-tower modules. This module keeps what is common.
  `DualEncoder` is the class; `ClipEncoder` is the same class under its historical name.
* Loading: the family's model class + `AutoTokenizer` + `AutoImageProcessor`, all via `from_pretrained`, the same
  path for a real checkpoint and for the locally built `tiny-random` / `tiny-random-siglip` (tiny_clip.py,
  tiny_siglip.py). A model that cannot be loaded
  raises `ModelLoadError` at once, naming the model and how to point at a local copy. Without network,
  huggingface_hub retries for ~25 s before giving up, so a Hub id is first probed with one short request:
  unreachable Hub -> the local HF cache is tried (what HF itself would do after its retries), else fail fast.
* Device: auto = cuda, then mps, then cpu. Precision (`CURATION_PRECISION`: auto, fp32, bf16, fp16) is chosen by
  the device's capability and the setting, never by a timing probe (timings vary with machine load, and the
  embeddings must not): auto = fp16 weights on GPU, bf16 autocast on a CPU with native bf16 matmul (AVX512-BF16
  / AMX), fp32 elsewhere. A reduced precision is kept only if a fixed probe stays faithful (cosine >= 0.999 to
  fp32), which is deterministic; the probe's timings are only logged. `precision` and `dtype_used` say what
  was chosen and why; the cache identity includes it.
* Throughput: the model, not the JPEG decoding, should set the pace. On CPU, decoding a real CLIP's batch
  costs ~10% of the model's time and runs inline: the model's intra-op threads already use every core, and
  a loader thread competing with them measured slower than no overlap at all. With a cheap model
  (tiny-random) a prefetching thread pool decodes ahead of it. On GPU, a torch DataLoader with worker
  processes decodes (scaling past the GIL), or opt-in nvJPEG on the device (loader="gpu", needs
  torchvision); there the decoding, not the model, is the limit (benchmarks/bench_embedding.py).
  On a CUDA out-of-memory error the batch is halved and retried (later batches stay at the smaller size).
* Output: float32 numpy arrays, L2-normalised, one row per input, input order.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import settings, tiny_clip
from .system import available_cpus
from .models import ModelAdapter, UnsupportedModelError, adapter_for_model_type, detect_adapter
from .models.base import ImageInputs, features as _features, slice_inputs  # noqa: F401 (_features: re-exported)
from .pixels import ImageLoader, ImageReadError, cut_to_centre

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

PRECISIONS = settings.PRECISIONS
FIDELITY_MIN_COSINE = 0.999
HUB_PROBE_TIMEOUT_S = 10.0
_OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") \
    else (torch.cuda.OutOfMemoryError,)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_HASH_CONTENT_BELOW = 64 * 2**20  # hash small weight files by content, large ones by size + mtime


class ModelLoadError(RuntimeError):
    """The model could not be loaded (no network, wrong id, missing or broken directory)."""


def _how_to_fix(model: str) -> str:
    download = "" if _looks_like_path(model) or Path(model).expanduser().exists() else \
        f" (e.g. fetched on a connected machine with `hf download {model} --local-dir /path/to/clip-dir`)"
    return (f"Point CURATION_CLIP_MODEL at a local copy of the checkpoint, a directory saved with "
            f"save_pretrained{download}: CURATION_CLIP_MODEL=/path/to/clip-dir; or use "
            f"CURATION_CLIP_MODEL={settings.TINY_RANDOM} for an offline smoke run (random weights, meaningless "
            f"scores).")


def resolve_device(device: str = "auto") -> str:
    device = (device or "auto").strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available (set CURATION_DEVICE=auto or cpu)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was requested but MPS is not available (set CURATION_DEVICE=auto or cpu)")
    if device not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"device must be auto, cpu, cuda or mps; got {device!r}")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (otherwise PyTorch emulates them, far slower than fp32)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _looks_like_path(name: str) -> bool:
    """A name that can only be a filesystem path (Hub ids are 'name' or 'org/name')."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


def _local_identity(path: Path) -> str:
    """Hash of a local checkpoint: config + tokenizer/processor files by content, weights by content or size+mtime."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        st = f.stat()
        if f.suffix in _WEIGHT_SUFFIXES and st.st_size >= _HASH_CONTENT_BELOW:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def _probe_hub(model: str) -> str:
    """One short request to the Hub: 'ok', 'unreachable', or raises ModelLoadError for an unknown repo."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=HUB_PROBE_TIMEOUT_S)
        return "ok"
    except GatedRepoError:
        raise ModelLoadError(f"cannot load model {model!r}: the Hub repository is gated; log in "
                             f"(`hf auth login` / HF_TOKEN) or download it. {_how_to_fix(model)}") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"cannot load model {model!r}: no such model on the Hugging Face Hub (or it is "
                             f"private) and no local directory of that name. {_how_to_fix(model)}") from None
    except HfHubHTTPError:
        return "ok"  # e.g. a 5xx or rate limit: let from_pretrained decide (it retries, then uses the cache)
    except Exception:  # connection refused / DNS / timeout: no network
        return "unreachable"


class _BatchDataset(Dataset):
    """One item per batch of paths, so each worker runs the image processor once per batch."""

    def __init__(self, batches: list[list], images: ImageLoader):
        self.batches = batches
        self.images = images

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> ImageInputs:
        return self.images.load(self.batches[i])


def _pin(inputs: ImageInputs) -> ImageInputs:
    return {k: v.pin_memory() for k, v in inputs.items()}


class DualEncoder:
    """A loaded image-text dual encoder that batch-encodes image files, PIL images and texts into unit vectors."""

    def __init__(self, model, tokenizer, image_processor, *, model_name: str, source: str, model_identity: str,
                 meaningless: bool, device: str, adapter: ModelAdapter | None = None, meaningless_note: str = "",
                 image_decode: str | None = None):
        self.adapter = adapter or adapter_for_model_type(getattr(model.config, "model_type", None))
        self.family = self.adapter.family
        self.meaningless_note = meaningless_note or (tiny_clip.MEANINGLESS_NOTE if meaningless else "")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_name = model_name
        self.source = source
        self.model_identity = model_identity
        self.meaningless = meaningless
        self.device = device
        self.dim = self.adapter.dim(model)
        self.max_text_length = self.adapter.max_text_length(model, tokenizer)
        self.image_size = self.adapter.image_size(model, image_processor)
        # File decoding + preprocessing (core/pixels.py): reduced-size JPEG decoding by default. Image vectors are
        # cached under a key that says how the file was decoded (text vectors do not depend on it).
        self.images = ImageLoader(image_processor, self.adapter, fallback_side=self.image_size,
                                  decode=settings.image_decode() if image_decode is None else image_decode)
        self._text_mask = self.adapter.uses_attention_mask(tokenizer)
        self.dtype_used = "float32"
        self.precision = "fp32"  # what the forwards run in: fp32 | bf16 (CPU autocast) | fp16 (GPU weights)
        self._autocast_dtype: torch.dtype | None = None
        self._max_image_batch: int | None = None  # lowered after an out-of-memory error
        self._max_text_batch: int | None = None
        self.last_loader = ""  # which loader the last encode_images used (for logs and benchmarks)
        # A Hugging Face *fast* tokenizer is not thread-safe: each call with padding/truncation arguments first
        # sets that state on the shared Rust backend, so a concurrent call can undo it between the set and the
        # encode (ragged batches: "expected sequence of length 7 ... (got 10)"). Only tokenization is
        # serialised (microseconds per batch); model forwards still run concurrently.
        self._tokenizer_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str, device: str = "auto", *, precision: str | None = None,
             image_decode: str | None = None) -> "DualEncoder":
        """Load a dual-encoder checkpoint by Hub id, local directory, 'tiny-random' or 'tiny-random-siglip' (the
        family comes from its config); fail fast with ModelLoadError.

        ``precision`` None → CURATION_PRECISION (default auto); ``image_decode`` None → CURATION_IMAGE_DECODE."""
        precision = settings.precision() if precision is None else precision
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
        name = (model or "").strip()
        if not name:
            raise ModelLoadError(f"no model configured. {_how_to_fix('openai/clip-vit-base-patch32')}")
        dev = resolve_device(device)
        try:
            source, meaningless = tiny_clip.resolve_model_source(name)
        except Exception as exc:  # building tiny-random failed (disk full, read-only cache dir...)
            raise ModelLoadError(f"cannot build the {name!r} model under {settings.model_cache_dir()}: {exc}. "
                                 "Set CURATION_MODEL_CACHE to a writable directory.") from exc
        local = Path(source).expanduser()
        kwargs: dict = {}
        if local.is_dir():
            source = str(local.resolve())
            meaningless = meaningless or tiny_clip.is_tiny_random_dir(local)  # e.g. a copied tiny-random
        elif _looks_like_path(name) or local.exists():
            raise ModelLoadError(f"cannot load model {name!r}: {local} is not a directory. {_how_to_fix(name)}")
        elif not _hub_offline():
            if _probe_hub(source) == "unreachable":
                kwargs["local_files_only"] = True  # what HF does after its retries, without the ~25 s of retries
        try:
            adapter = detect_adapter(source, **kwargs)  # config.json only: model_type -> family
            clip, tokenizer, image_processor = adapter.load(source, **kwargs)
        except UnsupportedModelError as exc:
            raise ModelLoadError(f"cannot load model {name!r}: {exc}") from None
        except Exception as exc:
            why = ("the Hugging Face Hub is unreachable (no network?) and no cached copy was found"
                   if kwargs.get("local_files_only") else f"{type(exc).__name__}: {exc}")
            if "sentencepiece" in str(exc).lower():
                why += " (this checkpoint's tokenizer needs `pip install sentencepiece`)"
            # from None: the message already says why; the chained traceback would repeat it inside ~150 lines
            raise ModelLoadError(f"cannot load model {name!r}: {why}. {_how_to_fix(name)}") from None
        identity = cls._identity(name, source, clip, adapter.family)  # + the precision below, once chosen
        clip.eval().to(dev)
        if dev == "cpu":
            cpus = available_cpus()
            if torch.get_num_threads() > cpus:
                torch.set_num_threads(cpus)  # containers: torch may see the host's cores
        note = tiny_clip.meaningless_note(local) if meaningless else ""
        enc = cls(clip, tokenizer, image_processor, model_name=name, source=source, model_identity=identity,
                  meaningless=meaningless, device=dev, adapter=adapter, meaningless_note=note, image_decode=image_decode)
        enc._choose_precision(precision)
        if enc.precision != "fp32":  # reduced-precision embeddings are cached apart from fp32 ones
            enc.model_identity = f"{identity}|{enc.precision}"
        if meaningless:
            log.warning("%s (model %r)", enc.meaningless_note, name)
        log.info("loaded %s %s on %s (%s), dim %d", adapter.display, name, dev, enc.dtype_used, enc.dim)
        return enc

    @staticmethod
    def _identity(name: str, source: str, clip, family: str = "clip") -> str:
        """Stable id for cache keys: local dirs by file contents, Hub models by snapshot commit + config; the
        family is part of it ('#clip', '#siglip', ...), the precision is appended later ('|bf16')."""
        if Path(source).is_dir():
            return f"{name}@local:{_local_identity(Path(source))}#{family}"
        config_hash = hashlib.sha256(clip.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
        commit = getattr(clip.config, "_commit_hash", None)
        if not commit:
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(source, "config.json")
                if isinstance(cached, str):
                    commit = Path(cached).parent.name  # .../snapshots/<commit>/config.json
            except Exception:
                commit = None
        return f"{name}@{commit or 'unknown-revision'}:{config_hash}#{family}"

    # ---------------------------------------------------------------------------------------------- precision
    def _choose_precision(self, precision: str) -> None:
        if precision == "fp32":
            self.dtype_used = "float32 (requested)"
            return
        if self.device == "cpu":
            if precision == "fp16":
                raise ValueError("precision 'fp16' is for GPUs; on CPU use 'auto', 'bf16' or 'fp32'")
            native = cpu_has_native_bf16()
            if precision == "auto" and not native:
                self.dtype_used = ("float32 (bf16 not used: this CPU has no native bf16 matmul "
                                   "(AVX512-BF16/AMX), and emulated bf16 is far slower than fp32)")
                return
            if not native:
                log.warning("CURATION_PRECISION=bf16 on a CPU without native bf16 matmul: emulated, far slower than fp32")
            self._try_reduced("bf16", autocast=True)
        else:
            target = "fp16" if precision == "auto" else precision
            self._try_reduced(target, autocast=False)

    def _try_reduced(self, target: str, *, autocast: bool) -> None:
        """Switch to reduced precision if its probe embeddings stay within FIDELITY_MIN_COSINE of fp32."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[target]
        ref, t_ref = self._timed_probe()
        if autocast:
            self._autocast_dtype = dtype
        else:
            self.model.to(dtype)
        try:
            got, t_got = self._timed_probe()
            cos = self._probe_cosine(ref, got)
        except Exception as exc:  # e.g. an op without a kernel for this dtype on this device
            cos, t_got, failure = float("nan"), float("inf"), f"{type(exc).__name__}: {exc}"
        else:
            failure = None
        name = str(dtype).replace("torch.", "")
        why = None
        if failure is not None:
            why = f"{name} failed on the probe batch ({failure})"
        elif not cos >= FIDELITY_MIN_COSINE:
            why = f"{name} embeddings drifted from fp32 (min cosine {cos:.5f} < {FIDELITY_MIN_COSINE})"
        if why is None:
            mode = "autocast" if autocast else "weights"
            self.precision = target
            self.dtype_used = f"{name} ({mode}; probe min cosine to fp32 {cos:.5f})"
            # Timings only advise (they depend on the machine's load); they never pick the numerics.
            log.info("precision %s chosen by capability; probe took %.3fs vs %.3fs in fp32%s", name, t_got, t_ref,
                     " (CURATION_PRECISION=fp32 may be faster here)" if t_got > t_ref * 1.1 else "")
            return
        self._autocast_dtype = None
        self.model.to(torch.float32)
        self.dtype_used = f"float32 (fallback: {why})"
        log.warning("%s encoder uses float32: %s", self.adapter.display, why)

    @property
    def image_key_suffix(self) -> str:
        """Part of the image embedding cache key: how the pixels were made (reduced decode, torch resize)."""
        return ("|jpeg-reduced" if self.images.decode == "reduced" else "") + self.images.resize_key

    def _probe_inputs(self) -> tuple[ImageInputs, list[str]]:
        """Fixed synthetic inputs (smooth colour fields through the family's own image processor)."""
        gen = torch.Generator().manual_seed(0)
        low = torch.rand(4, 3, 7, 7, generator=gen)
        arrays = (F.interpolate(low, size=self.image_size, mode="bilinear", align_corners=False) * 255).round()
        images = [Image.fromarray(a.permute(1, 2, 0).to(torch.uint8).numpy()) for a in arrays]
        pixels = self.images.preprocess(images)
        texts = ["a photo of a red bicycle", "Lot de 3 coussins décoratifs en coton",
                 "Jeu vidéo pour console, édition collector", "x"]
        return pixels, texts

    def _timed_probe(self) -> tuple[np.ndarray, float]:
        pixels, texts = self._probe_inputs()
        self._encode_pixel_batch(slice_inputs(pixels, 0, 1))  # warm-up (first call allocates / selects kernels)
        t0 = time.perf_counter()
        emb = np.concatenate([self._encode_pixel_batch(pixels), self._encode_text_batch(texts)])
        return emb, time.perf_counter() - t0

    @staticmethod
    def _probe_cosine(ref: np.ndarray, got: np.ndarray) -> float:
        """Smallest row-wise cosine between reduced-precision and fp32 probe embeddings (both unit norm)."""
        return float(np.min(np.sum(ref * got, axis=1)))

    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self._autocast_dtype)

    def _tokenize(self, texts: list[str], **kwargs):
        """The tokenizer call, serialised across threads (see ``_tokenizer_lock``)."""
        with self._tokenizer_lock:
            return self.tokenizer(texts, **kwargs)

    # ------------------------------------------------------------------------------------------------ forward
    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _image_forward(self, pixels: torch.Tensor, **extra) -> torch.Tensor:
        """Projected image features; ``extra`` = the family's other image inputs (SigLIP 2: mask, shapes)."""
        return self.adapter.image_features(self.model, pixels, **extra)

    def _text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.adapter.text_features(self.model, input_ids, attention_mask)

    def _finish(self, feats: torch.Tensor) -> np.ndarray:
        if feats.shape[-1] != self.dim:
            raise RuntimeError(f"model returned {feats.shape[-1]}-d features, expected projection dim {self.dim}")
        return F.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)

    def _run_halving(self, n: int, limit_attr: str, run: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """Run `run(start, stop)` over [0, n) in chunks; on out-of-memory halve the chunk size and retry."""
        out: list[np.ndarray] = []
        start = 0
        while start < n:
            size = min(n - start, getattr(self, limit_attr) or n)
            try:
                out.append(run(start, start + size))
            except _OOM_ERRORS:
                if size <= 1:
                    raise
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                new = max(1, size // 2)
                log.warning("out of memory on a batch of %d: retrying with batches of %d", size, new)
                setattr(self, limit_attr, new)
                continue
            start += size
        return np.concatenate(out) if len(out) != 1 else out[0]

    def _encode_pixel_batch(self, inputs: ImageInputs | torch.Tensor) -> np.ndarray:
        """Encode one preprocessed batch: the family's image inputs (a dict) or a bare pixel_values tensor."""
        if isinstance(inputs, torch.Tensor):
            inputs = {"pixel_values": inputs}
        dtype = self._param_dtype()
        inputs = {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
                  for k, v in inputs.items()}
        pixels = inputs.pop("pixel_values")

        def run(a: int, b: int) -> np.ndarray:
            with torch.inference_mode(), self._autocast():
                return self._finish(self._image_forward(pixels[a:b], **slice_inputs(inputs, a, b)))

        return self._run_halving(len(pixels), "_max_image_batch", run)

    def _encode_text_batch(self, texts: Sequence[str]) -> np.ndarray:
        enc = self._tokenize(list(texts), return_tensors="pt", **self.adapter.text_kwargs(self.max_text_length))
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device) if self._text_mask and "attention_mask" in enc else None

        def run(a: int, b: int) -> np.ndarray:
            with torch.inference_mode(), self._autocast():
                return self._finish(self._text_forward(ids[a:b], None if mask is None else mask[a:b]))

        return self._run_halving(len(ids), "_max_text_batch", run)

    # ------------------------------------------------------------------------------------------------- public
    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim), dtype=np.float32)

    def _preprocess(self, images: Sequence[Image.Image]) -> ImageInputs:
        return self.images.preprocess(images)

    def default_num_workers(self, loader: str = "thread") -> int:
        """Loader workers for an explicit loader choice: on GPU most of the cores, on CPU all of them."""
        cpus = available_cpus()
        if loader == "gpu":
            return 4  # threads only read files; decoding runs on the GPU
        if self.device == "cpu":
            return cpus
        return max(1, min(16 if loader == "process" else 8, cpus - 1))

    def encode_images(self, paths: Sequence[str | os.PathLike], batch_size: int = 64, num_workers: int | None = None,
                      progress: Progress | None = None, loader: str = "auto") -> np.ndarray:
        """Embed image files: float32 [n, dim], L2-normalised, in input order. Raises ImageReadError on a bad file.

        loader: "thread" (a prefetching thread pool; num_workers=0 decodes in the calling thread), "process"
        (a torch DataLoader with worker processes, to scale decoding past the GIL), "gpu" (nvJPEG decoding
        and preprocessing on the GPU; needs torchvision) or "auto":
        * GPU: "process" (on a 16-core H200 host: 895 images/s from JPEG files with 15 processes vs 787
          with "gpu" and 585 with 8 threads; the model alone ran 26,000 images/s in fp16).
        * CPU: the first batch is decoded in the calling thread and timed against the model. If the model
          is slower (any real CLIP), the rest is decoded inline too: the model's intra-op threads already
          use every core, and a loader thread competing with them stalls the OpenMP workers at their
          barriers whenever the OS preempts one (ViT-B/32 on 2 quiet cores, best of 5: model alone 21.2,
          inline 20.9, one overlapping loader thread 17.5 images/s). If decoding is slower (a tiny model),
          the rest is decoded by a pool of one thread per core, prefetching ahead of the model.
        """
        paths = list(paths)
        n = len(paths)
        if n == 0:
            return self._empty()
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if loader not in {"auto", "thread", "process", "gpu"}:
            raise ValueError(f"loader must be auto, thread, process or gpu; got {loader!r}")
        if loader == "gpu" and not self.gpu_decode_available():
            raise ValueError("loader 'gpu' needs a CUDA device and torchvision (nvJPEG decoding)")
        batches = [paths[i:i + batch_size] for i in range(0, n, batch_size)]
        out: list[np.ndarray] = []
        done = 0

        def consume(pixels: ImageInputs) -> None:
            nonlocal done
            out.append(self._encode_pixel_batch(pixels))
            done += len(pixels["pixel_values"])
            if progress is not None:
                progress(done, n)

        if loader == "auto" and self.device == "cpu" and num_workers is None:
            t0 = time.perf_counter()
            pixels = self.images.load(batches[0])
            t1 = time.perf_counter()
            consume(pixels)
            loader_bound = (t1 - t0) > (time.perf_counter() - t1)
            self.last_loader = "thread" if loader_bound else "inline"
            rest = batches[1:]
            source = self._thread_batches(rest, available_cpus()) if loader_bound else self._inline_batches(rest)
        else:
            if loader == "auto":
                loader = "thread" if self.device == "cpu" else "process"
            workers = self.default_num_workers(loader) if num_workers is None else max(0, int(num_workers))
            if loader == "gpu":
                source = self._gpu_batches(batches, workers)
            elif workers == 0:
                source = self._inline_batches(batches)
            else:
                source = (self._thread_batches if loader == "thread" else self._process_batches)(batches, workers)
            self.last_loader = loader if workers or loader == "gpu" else "inline"
        for pixels in source:
            consume(pixels)
        return np.concatenate(out)

    def _inline_batches(self, batches: list[list], workers: int = 0):
        """Yield preprocessed batches decoded in the calling thread (no overlap, no extra thread)."""
        for batch in batches:
            yield self.images.load(batch)

    def _thread_batches(self, batches: list[list], workers: int, load: Callable | None = None):
        """Yield load(batch) in order; up to workers+1 batches are prepared ahead in threads."""
        if load is None:
            pin = self.device == "cuda"

            def load(batch):
                pixels = self.images.load(batch)
                return _pin(pixels) if pin else pixels

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip-loader")
        try:
            pending: deque = deque()
            for batch in batches[: workers + 1]:
                pending.append(pool.submit(load, batch))
            next_batch = len(pending)
            while pending:
                item = pending.popleft().result()
                if next_batch < len(batches):
                    pending.append(pool.submit(load, batches[next_batch]))
                    next_batch += 1
                yield item
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def gpu_decode_available(self) -> bool:
        """JPEG decoding on the GPU (nvJPEG via torchvision) + the torchvision image-processor backend."""
        if self.device != "cuda":
            return False
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
        except Exception:
            return False
        return "Pil" not in type(self.image_processor).__name__

    def _gpu_batches(self, batches: list[list], workers: int):
        """Files are read in threads; JPEGs are decoded and preprocessed on the GPU. A batch that nvJPEG cannot
        decode (PNG, CMYK, a damaged file) goes through the PIL path, which names an unreadable file."""
        from torchvision.io import ImageReadMode, decode_jpeg

        def read(batch):
            return batch, [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in batch]

        for batch, data in self._thread_batches(batches, max(1, workers), load=read):
            try:
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                if self.images.bound_aspect:  # no giant intermediate for a banner (pixels.centre_window)
                    images = cut_to_centre(images)
                yield self.adapter.preprocess(self.image_processor, images, device=self.device)
            except Exception as exc:
                log.debug("GPU decode failed for a batch (%s); using PIL for it", exc)
                yield self.images.load(batch)

    def _process_batches(self, batches: list[list], workers: int):
        """Yield preprocessed batches in order from a torch DataLoader with worker processes."""
        loader = DataLoader(_BatchDataset(batches, self.images), batch_size=None, num_workers=workers,
                            pin_memory=self.device == "cuda", prefetch_factor=4 if workers else None)
        yield from loader

    def encode_pil(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Embed in-memory PIL images (e.g. an API image query): same preprocessing as encode_images."""
        images = list(images)
        if not images:
            return self._empty()
        return np.concatenate([self._encode_pixel_batch(self._preprocess(images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: Progress | None = None) -> np.ndarray:
        """Embed texts (truncated to the model's maximum length): float32 [n, dim], L2-normalised, input order.

        Texts are batched by token length (less padding where the family allows it): CLIP pools the first
        end-of-text token under a causal mask, so padding never changes a text's embedding; SigLIP pools the last
        position, so every text is padded to the maximum length as trained (the adapter's text_kwargs).
        """
        texts = [t if isinstance(t, str) else "" if t is None else str(t) for t in texts]
        n = len(texts)
        if n == 0:
            return self._empty()
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        lengths = [len(ids) for ids in self._tokenize(texts, truncation=True, max_length=self.max_text_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        result = np.empty((n, self.dim), dtype=np.float32)
        done = 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            result[idx] = self._encode_text_batch([texts[j] for j in idx])
            done += len(idx)
            if progress is not None:
                progress(done, n)
        return result

    def describe(self) -> dict:
        """What reports and manifests should record about the encoder."""
        info = {"model": self.model_name, "family": self.family, "model_identity": self.model_identity,
                "dim": self.dim, "image_size": self.image_size, "max_text_length": self.max_text_length,
                "score_scale": self.adapter.score_scale(self.model), "device": self.device,
                "precision": self.precision, "dtype": self.dtype_used, "meaningless": self.meaningless,
                **self.images.describe()}
        if self.meaningless:
            info["note"] = self.meaningless_note
        return info

    def text_tower_modules(self) -> list[tuple[object, str]]:
        """(owner, attribute) slots of the text tower's modules, projection included (api/quantize.py swaps them)."""
        return self.adapter.text_tower(self.model)


ClipEncoder = DualEncoder  # the historical name, used across the repo


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).strip().lower() in {
        "1", "true", "yes", "on"}


__all__ = ["ClipEncoder", "DualEncoder", "ImageReadError", "ModelLoadError", "resolve_device", "cpu_has_native_bf16"]
