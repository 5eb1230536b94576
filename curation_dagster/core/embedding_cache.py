"""Persistent embedding cache, so that a re-materialization encodes only new or changed rows.

Keyed by (model identity, kind, content key): kind is "image" (key = the image file's sha256) or "text"
(key = sha256 of the exact string fed to the model). Layout under the root (the pipeline uses
`$CURATION_ARTIFACTS_DIR/embedding_cache`):

    <root>/<sha256(model_identity|dim)[:20]>/model.json          the identity, for humans
    <root>/<...>/<kind>/shard-<time>-<uuid>/keys.parquet           one column "key" (utf8)
    <root>/<...>/<kind>/shard-<time>-<uuid>/vectors.npy            float32 [len(keys), dim]

Shards are append-only and written atomically (temporary directory, fsync, rename), so concurrent
writers never see half a shard and never lose each other's shards. Vectors load with
allow_pickle=False. A shard that cannot be read is skipped (logged): the cache is only an optimisation.
Many small shards are compacted into one once they pass COMPACT_AT.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import polars as pl

from .atomic import atomic_write_text, fsync_dir, seal_dir, staging_dir

if TYPE_CHECKING:  # the encoder imports torch; the cache itself does not need it
    from .encoder import ClipEncoder

log = logging.getLogger(__name__)

KINDS = ("image", "text")
COMPACT_AT = 32


def text_key(text: str) -> str:
    """Content key of a text: sha256 of the exact UTF-8 string fed to the model."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Unit vectors of one model, by kind and content key, persisted as append-only shards."""

    def __init__(self, root: Path, model_identity: str, dim: int):
        if not model_identity:
            raise ValueError("model_identity must be a non-empty string")
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.root = Path(root)
        self.model_identity = model_identity
        self.dim = int(dim)
        digest = hashlib.sha256(f"{model_identity}|{self.dim}".encode()).hexdigest()[:20]
        self.dir = self.root / digest
        # per kind: key -> row in the concatenated vectors, the vector blocks, and which shards are loaded
        self._index: dict[str, dict[str, int]] = {k: {} for k in KINDS}
        self._blocks: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
        self._rows: dict[str, int] = {k: 0 for k in KINDS}
        self._loaded: dict[str, set[str]] = {k: set() for k in KINDS}

    # ------------------------------------------------------------------------------------------- internals
    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")

    def _kind_dir(self, kind: str) -> Path:
        return self.dir / kind

    def _shards(self, kind: str) -> list[Path]:
        d = self._kind_dir(kind)
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("shard-"))

    def _read_shard(self, shard: Path) -> tuple[list[str], np.ndarray] | None:
        try:
            keys = pl.read_parquet(shard / "keys.parquet", columns=["key"])["key"].to_list()
            vectors = np.load(shard / "vectors.npy", allow_pickle=False)
        except FileNotFoundError:
            return None  # removed by a concurrent compaction: its rows live in the merged shard
        except Exception as exc:
            log.warning("skipping unreadable embedding-cache shard %s: %s", shard, exc)
            return None
        if vectors.dtype != np.float32 or vectors.shape != (len(keys), self.dim):
            log.warning("skipping embedding-cache shard %s: vectors %s %s do not match %d keys x dim %d",
                        shard, vectors.dtype, vectors.shape, len(keys), self.dim)
            return None
        good = np.isfinite(vectors).all(axis=1) & (np.abs(vectors).sum(axis=1) > 0)
        if not good.all():  # damaged bytes in a valid .npy: those rows are encoded again, not served as hits
            log.warning("embedding-cache shard %s: %d damaged vector(s) (not finite or zero) ignored",
                        shard, int((~good).sum()))
            keys, vectors = [k for k, ok in zip(keys, good) if ok], vectors[good]
        return keys, vectors

    def _refresh(self, kind: str) -> None:
        """Load shards not seen yet (written by this or another process)."""
        for shard in self._shards(kind):
            if shard.name in self._loaded[kind]:
                continue
            got = self._read_shard(shard)
            self._loaded[kind].add(shard.name)
            if got is not None:
                self._append(kind, *got)

    def _append(self, kind: str, keys: list[str], vectors: np.ndarray) -> None:
        index = self._index[kind]
        base = self._rows[kind]
        for i, k in enumerate(keys):
            index.setdefault(k, base + i)
        self._blocks[kind].append(vectors)
        self._rows[kind] += len(keys)

    def _vectors(self, kind: str) -> np.ndarray:
        blocks = self._blocks[kind]
        if len(blocks) > 1:
            self._blocks[kind] = blocks = [np.concatenate(blocks)]
        return blocks[0] if blocks else np.zeros((0, self.dim), dtype=np.float32)

    def _write_shard(self, kind: str, keys: list[str], vectors: np.ndarray) -> Path:
        d = self._kind_dir(kind)
        d.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "model.json"
        if not meta.exists():
            atomic_write_text(meta, json.dumps({"model_identity": self.model_identity, "dim": self.dim}, indent=2))
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        final = d / name
        with staging_dir(d, prefix=name) as tmp:
            pl.DataFrame({"key": keys}, schema={"key": pl.Utf8}).write_parquet(tmp / "keys.parquet")
            with open(tmp / "vectors.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
            seal_dir(tmp)
            os.rename(tmp, final)
        fsync_dir(d)
        return final

    # ---------------------------------------------------------------------------------------------- public
    def lookup(self, kind: str, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found_mask bool[n], vectors float32[n, dim]) with zero rows where a key is missing."""
        self._check_kind(kind)
        self._refresh(kind)
        n = len(keys)
        out = np.zeros((n, self.dim), dtype=np.float32)
        index = self._index[kind]
        rows = np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=n)
        found = rows >= 0
        if found.any():
            out[found] = self._vectors(kind)[rows[found]]
        return found, out

    def add(self, kind: str, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Persist vectors for keys not cached yet (one new shard); existing keys are left as they are."""
        self._check_kind(kind)
        keys = list(keys)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape != (len(keys), self.dim):
            raise ValueError(f"vectors must have shape ({len(keys)}, {self.dim}); got {vectors.shape}")
        if not all(isinstance(k, str) and k for k in keys):
            raise ValueError("cache keys must be non-empty strings")
        if not np.isfinite(vectors).all():
            raise ValueError("refusing to cache non-finite embeddings")
        self._refresh(kind)
        index = self._index[kind]
        seen: set[str] = set()
        take = []
        for i, k in enumerate(keys):
            if k not in index and k not in seen:
                seen.add(k)
                take.append(i)
        if not take:
            return
        new_keys = [keys[i] for i in take]
        new_vecs = np.ascontiguousarray(vectors[take], dtype=np.float32)
        shard = self._write_shard(kind, new_keys, new_vecs)
        self._loaded[kind].add(shard.name)
        self._append(kind, new_keys, new_vecs)
        if len(self._loaded[kind]) > COMPACT_AT:
            self.compact(kind)

    def compact(self, kind: str) -> None:
        """Merge the shards into one: write the merged shard first, then remove the merged ones."""
        self._check_kind(kind)
        shards = self._shards(kind)
        if len(shards) <= 1:
            return
        keys: list[str] = []
        blocks: list[np.ndarray] = []
        seen: set[str] = set()
        for shard in shards:
            got = self._read_shard(shard)
            if got is None:
                continue
            k, v = got
            keep = [i for i, key in enumerate(k) if key not in seen]
            seen.update(k)
            keys.extend(k[i] for i in keep)
            blocks.append(v[keep])
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, self.dim), dtype=np.float32)
        merged = self._write_shard(kind, keys, vectors)
        for shard in shards:
            shutil.rmtree(shard, ignore_errors=True)
        self._loaded[kind] = {merged.name}
        self._index[kind] = {}
        self._blocks[kind] = []
        self._rows[kind] = 0
        self._append(kind, keys, vectors)

    def count(self, kind: str) -> int:
        self._check_kind(kind)
        self._refresh(kind)
        return len(self._index[kind])


def _encode_unique(keys: list[str], need: np.ndarray, encode: Callable[[list[int]], np.ndarray], out: np.ndarray
                   ) -> tuple[list[str], np.ndarray]:
    """Encode each distinct missing key once (first row that has it) and fill every row with that key."""
    first: dict[str, int] = {}
    for i in np.flatnonzero(need):
        first.setdefault(keys[i], int(i))
    rows = list(first.values())
    if not rows:
        return [], np.zeros((0, out.shape[1]), dtype=np.float32)
    vecs = encode(rows)
    by_key = {k: j for j, k in enumerate(first)}
    for i in np.flatnonzero(need):
        out[i] = vecs[by_key[keys[i]]]
    return list(first), vecs


def embed_with_cache(encoder: "ClipEncoder", cache: EmbeddingCache | None, image_paths: Sequence,
                     image_keys: Sequence[str], texts: Sequence[str], batch_size: int = 64,
                     progress: Callable[[int, int], None] | None = None,
                     plan: Callable[[dict], None] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Image and text embeddings for n rows, encoding only what the cache lacks (each distinct key once).

    Returns (image_emb float32[n, dim], text_emb float32[n, dim], stats) where stats has n,
    image_cache_hits, text_cache_hits (rows served from the cache), images_encoded, texts_encoded
    (distinct items run through the model), seconds (wall) and items_per_s (encoded items per second).
    ``plan`` is told the cache hits and what is left to encode before encoding starts; ``progress`` counts the
    encoded items (images first, then texts) against their total.
    """
    t0 = time.perf_counter()
    # Image vectors also depend on how the file was decoded (core/pixels.py): the encoder's suffix says how.
    suffix = str(getattr(encoder, "image_key_suffix", "") or "")
    image_paths, image_keys, texts = list(image_paths), [f"{k}{suffix}" for k in image_keys], list(texts)
    n = len(image_paths)
    if len(image_keys) != n or len(texts) != n:
        raise ValueError(f"image_paths ({n}), image_keys ({len(image_keys)}) and texts ({len(texts)}) must align")
    if cache is not None and cache.dim != encoder.dim:
        raise ValueError(f"cache dim {cache.dim} != encoder dim {encoder.dim}")
    text_keys = [text_key(t) for t in texts]
    dim = encoder.dim
    if cache is not None:
        img_hit, image_emb = cache.lookup("image", image_keys)
        txt_hit, text_emb = cache.lookup("text", text_keys)
    else:
        img_hit, image_emb = np.zeros(n, dtype=bool), np.zeros((n, dim), dtype=np.float32)
        txt_hit, text_emb = np.zeros(n, dtype=bool), np.zeros((n, dim), dtype=np.float32)

    n_img_todo = len({image_keys[i] for i in np.flatnonzero(~img_hit)})
    n_txt_todo = len({text_keys[i] for i in np.flatnonzero(~txt_hit)})
    total = n_img_todo + n_txt_todo
    if plan is not None:
        plan({"rows": n, "image_cache_hits": int(img_hit.sum()), "text_cache_hits": int(txt_hit.sum()),
              "images_to_encode": n_img_todo, "texts_to_encode": n_txt_todo})

    def img_progress(done: int, _total: int) -> None:
        if progress is not None:
            progress(done, total)

    def txt_progress(done: int, _total: int) -> None:
        if progress is not None:
            progress(n_img_todo + done, total)

    t_enc = time.perf_counter()
    new_img_keys, new_img = _encode_unique(
        image_keys, ~img_hit, lambda rows: encoder.encode_images([image_paths[i] for i in rows], batch_size=batch_size,
                                                                 progress=img_progress), image_emb)
    new_txt_keys, new_txt = _encode_unique(
        text_keys, ~txt_hit, lambda rows: encoder.encode_texts([texts[i] for i in rows], progress=txt_progress),
        text_emb)
    encode_s = time.perf_counter() - t_enc
    if cache is not None:
        if new_img_keys:
            cache.add("image", new_img_keys, new_img)
        if new_txt_keys:
            cache.add("text", new_txt_keys, new_txt)
    if progress is not None and total == 0:
        progress(0, 0)
    encoded = len(new_img_keys) + len(new_txt_keys)
    seconds = time.perf_counter() - t0
    stats = {
        "n": n,
        "image_cache_hits": int(img_hit.sum()),
        "text_cache_hits": int(txt_hit.sum()),
        "images_encoded": len(new_img_keys),
        "texts_encoded": len(new_txt_keys),
        "seconds": round(seconds, 3),
        "encode_seconds": round(encode_s, 3),
        "items_per_s": round(encoded / encode_s, 2) if encoded and encode_s > 0 else 0.0,
    }
    return image_emb, text_emb, stats
