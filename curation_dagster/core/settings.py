"""Environment-variable configuration shared by the pipeline, the API and the tests.

Defaults resolve relative to the repository root, so commands work from any working directory.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
TINY_RANDOM = "tiny-random"  # tiny random-weight CLIP built locally (offline smoke runs; meaningless scores)
TINY_RANDOM_SIGLIP = "tiny-random-siglip"  # the same for the SigLIP architecture (multilingual-style tokenizer)
TINY_RANDOM_MODELS = (TINY_RANDOM, TINY_RANDOM_SIGLIP)


def _path_from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var, "").strip()
    if not value:
        return default
    p = Path(value).expanduser()
    return p if p.is_absolute() else (Path.cwd() / p).resolve()


def dagster_home() -> Path:
    return _path_from_env("DAGSTER_HOME", REPO_ROOT / "dagster_home")


def data_dir() -> Path:
    return _path_from_env("CURATION_DATA_DIR", REPO_ROOT / "data" / "sample")


def artifacts_dir() -> Path:
    return _path_from_env("CURATION_ARTIFACTS_DIR", dagster_home() / "artifacts")


def device() -> str:
    value = os.environ.get("CURATION_DEVICE", "").strip().lower() or "auto"
    if value not in {"auto", "cpu", "cuda", "mps"}:
        raise ValueError(f"CURATION_DEVICE must be one of auto, cpu, cuda, mps; got {value!r}")
    return value


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision() -> str:
    """CURATION_PRECISION: auto (by the device's capability), fp32, bf16 (CPU autocast), fp16 (GPU)."""
    value = os.environ.get("CURATION_PRECISION", "").strip().lower() or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"CURATION_PRECISION must be one of {', '.join(PRECISIONS)}; got {value!r}")
    return value


IMAGE_DECODES = ("reduced", "full")


def image_decode() -> str:
    """CURATION_IMAGE_DECODE: reduced (JPEGs decoded at the smallest DCT scale that still covers the model's input;
    the default) or full (every pixel decoded, then resized)."""
    value = os.environ.get("CURATION_IMAGE_DECODE", "").strip().lower() or "reduced"
    if value not in IMAGE_DECODES:
        raise ValueError(f"CURATION_IMAGE_DECODE must be one of {', '.join(IMAGE_DECODES)}; got {value!r}")
    return value


def model_cache_dir() -> Path:
    """Where locally built models (tiny-random) are cached; not committed."""
    return _path_from_env(
        "CURATION_MODEL_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "curation_dagster"
    )
