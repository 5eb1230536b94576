"""EmbeddingCache + embed_with_cache: re-materialization encodes only new or changed rows."""
from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation_dagster.core import embedding_cache as ec
from curation_dagster.core.embedding_cache import EmbeddingCache, embed_with_cache, text_key

SAMPLE_IMAGES = sorted((Path(__file__).resolve().parents[1] / "data" / "sample" / "images" / "image_train").glob("*.jpg"))
DIM = 8


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def unit(seed_text: str, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(int(hashlib.sha256(seed_text.encode()).hexdigest()[:8], 16))
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder:
    """Deterministic content-derived vectors; records what it was asked to encode."""

    def __init__(self, identity: str = "fake@1", dim: int = DIM):
        self.model_identity, self.dim = identity, dim
        self.images_seen: list[str] = []
        self.texts_seen: list[str] = []

    def encode_images(self, paths, batch_size=64, progress=None):
        self.images_seen += [str(p) for p in paths]
        out = np.stack([unit(sha256_file(Path(p)), self.dim) for p in paths])
        if progress:
            progress(len(paths), len(paths))
        return out

    def encode_texts(self, texts, progress=None):
        self.texts_seen += list(texts)
        out = np.stack([unit("t:" + t, self.dim) for t in texts])
        if progress:
            progress(len(texts), len(texts))
        return out


@pytest.fixture
def images(tmp_path) -> list[Path]:
    out = []
    for i, src in enumerate(SAMPLE_IMAGES[:5]):
        dst = tmp_path / "imgs" / f"{i}.jpg"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(src, dst)
        out.append(dst)
    return out


# --------------------------------------------------------------------------------------------- the cache itself
def test_lookup_add_roundtrip_and_persistence(tmp_path):
    cache = EmbeddingCache(tmp_path, "m@1", DIM)
    keys = ["a", "b", "c"]
    vecs = np.stack([unit(k) for k in keys])
    found, got = cache.lookup("image", keys)
    assert not found.any() and got.shape == (3, DIM) and not got.any()
    cache.add("image", keys, vecs)
    found, got = cache.lookup("image", ["c", "zz", "a"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(got[[0, 2]], vecs[[2, 0]])
    assert not got[1].any() and got.dtype == np.float32
    # kinds are separate namespaces
    assert not cache.lookup("text", keys)[0].any()
    # a new instance (another process, a later run) reads the shards back
    again = EmbeddingCache(tmp_path, "m@1", DIM)
    np.testing.assert_array_equal(again.lookup("image", keys)[1], vecs)
    # adding known keys writes nothing new; a partly new batch writes only the new key
    n_shards = len(again._shards("image"))
    again.add("image", ["a"], vecs[:1])
    assert len(again._shards("image")) == n_shards
    again.add("image", ["a", "d", "d"], np.stack([vecs[0], unit("d"), unit("d")]))
    assert len(again._shards("image")) == n_shards + 1 and again.count("image") == 4


def test_other_model_or_dim_does_not_hit(tmp_path):
    EmbeddingCache(tmp_path, "m@1", DIM).add("text", ["k"], unit("k")[None])
    assert EmbeddingCache(tmp_path, "m@1", DIM).lookup("text", ["k"])[0].all()
    assert not EmbeddingCache(tmp_path, "m@2", DIM).lookup("text", ["k"])[0].any()
    assert not EmbeddingCache(tmp_path, "m@1", 4).lookup("text", ["k"])[0].any()


def test_bad_input_is_rejected(tmp_path):
    cache = EmbeddingCache(tmp_path, "m@1", DIM)
    with pytest.raises(ValueError, match="kind"):
        cache.lookup("audio", ["k"])
    with pytest.raises(ValueError, match="shape"):
        cache.add("image", ["a", "b"], np.zeros((2, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        cache.add("image", ["a"], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        cache.add("image", [""], np.zeros((1, DIM), np.float32))
    with pytest.raises(ValueError):
        EmbeddingCache(tmp_path, "", DIM)


def test_partial_and_corrupt_shards_are_ignored(tmp_path):
    cache = EmbeddingCache(tmp_path, "m@1", DIM)
    cache.add("image", ["good"], unit("good")[None])
    kind_dir = cache._kind_dir("image")
    # a crashed writer's temp dir, a shard with a pickled object array, a shard with the wrong shape
    (kind_dir / ".tmp-shard-crashed").mkdir()
    for name, arr in (("shard-0-pickled", np.array([{"x": 1}], dtype=object)),
                      ("shard-0-shape", np.zeros((3, DIM + 2), np.float32))):
        d = kind_dir / name
        d.mkdir()
        import polars as pl
        pl.DataFrame({"key": ["evil"]}).write_parquet(d / "keys.parquet")
        np.save(d / "vectors.npy", arr, allow_pickle=True)
    fresh = EmbeddingCache(tmp_path, "m@1", DIM)
    found, got = fresh.lookup("image", ["good", "evil"])
    assert found.tolist() == [True, False]
    np.testing.assert_array_equal(got[0], unit("good"))


def test_many_shards_are_compacted_without_losing_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(ec, "COMPACT_AT", 4)
    cache = EmbeddingCache(tmp_path, "m@1", DIM)
    for i in range(7):
        cache.add("text", [f"k{i}"], unit(f"k{i}")[None])
    assert len(cache._shards("text")) < 4
    fresh = EmbeddingCache(tmp_path, "m@1", DIM)
    keys = [f"k{i}" for i in range(7)]
    found, got = fresh.lookup("text", keys)
    assert found.all()
    np.testing.assert_array_equal(got, np.stack([unit(k) for k in keys]))


# ---------------------------------------------------------------------------------------------- embed_with_cache
def test_second_call_hits_the_cache_and_returns_identical_arrays(tmp_path, images):
    enc = FakeEncoder()
    keys = [sha256_file(p) for p in images]
    texts = [f"produit {i}" for i in range(len(images))]
    cache = EmbeddingCache(tmp_path / "cache", enc.model_identity, enc.dim)
    progress = []
    img1, txt1, s1 = embed_with_cache(enc, cache, images, keys, texts, progress=lambda d, n: progress.append((d, n)))
    assert s1["images_encoded"] == 5 and s1["texts_encoded"] == 5
    assert s1["image_cache_hits"] == 0 and s1["text_cache_hits"] == 0 and s1["n"] == 5
    assert progress[-1] == (10, 10)
    np.testing.assert_array_equal(img1, np.stack([unit(k) for k in keys]))

    enc2 = FakeEncoder()
    cache2 = EmbeddingCache(tmp_path / "cache", enc2.model_identity, enc2.dim)  # a later run
    img2, txt2, s2 = embed_with_cache(enc2, cache2, images, keys, texts)
    assert enc2.images_seen == [] and enc2.texts_seen == []
    assert s2["image_cache_hits"] == 5 and s2["text_cache_hits"] == 5
    assert s2["images_encoded"] == 0 and s2["texts_encoded"] == 0 and s2["items_per_s"] == 0.0
    np.testing.assert_array_equal(img2, img1)
    np.testing.assert_array_equal(txt2, txt1)


def test_changed_rows_are_re_encoded_and_duplicates_encoded_once(tmp_path, images):
    enc = FakeEncoder()
    texts = [f"produit {i}" for i in range(5)]
    embed_with_cache(enc, EmbeddingCache(tmp_path / "c", "fake@1", DIM), images, [sha256_file(p) for p in images],
                     texts)
    # row 2's image is replaced by a re-encoded JPEG (new bytes -> new sha256), row 4's text is edited,
    # and a new row 5 repeats row 0's image and text (same keys: served from the cache, nothing to encode)
    with Image.open(images[2]) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=50)
    images[2].write_bytes(buf.getvalue())
    paths = images + [images[0]]
    texts2 = texts[:4] + ["produit 4 (modifié)", texts[0]]
    enc2 = FakeEncoder()
    img, txt, stats = embed_with_cache(enc2, EmbeddingCache(tmp_path / "c", "fake@1", DIM), paths,
                                       [sha256_file(p) for p in paths], texts2)
    assert enc2.images_seen == [str(images[2])] and enc2.texts_seen == ["produit 4 (modifié)"]
    assert stats["images_encoded"] == 1 and stats["image_cache_hits"] == 5
    assert stats["texts_encoded"] == 1 and stats["text_cache_hits"] == 5
    np.testing.assert_array_equal(img[2], unit(sha256_file(images[2])))
    np.testing.assert_array_equal(img[5], img[0])

    # without a cache, identical keys within one call are still encoded once
    enc3 = FakeEncoder()
    img3, txt3, s3 = embed_with_cache(enc3, None, paths, [sha256_file(p) for p in paths], texts2)
    assert len(enc3.images_seen) == 5 and len(enc3.texts_seen) == 5 and s3["images_encoded"] == 5
    np.testing.assert_array_equal(img3, img)
    np.testing.assert_array_equal(txt3, txt)


def test_different_model_identity_does_not_hit(tmp_path, images):
    keys = [sha256_file(p) for p in images]
    texts = ["a", "b", "c", "d", "e"]
    embed_with_cache(FakeEncoder("fake@1"), EmbeddingCache(tmp_path, "fake@1", DIM), images, keys, texts)
    other = FakeEncoder("fake@2")
    _, _, stats = embed_with_cache(other, EmbeddingCache(tmp_path, "fake@2", DIM), images, keys, texts)
    assert stats["image_cache_hits"] == 0 and stats["images_encoded"] == 5 and len(other.texts_seen) == 5


def test_misaligned_inputs_are_rejected(tmp_path, images):
    with pytest.raises(ValueError, match="align"):
        embed_with_cache(FakeEncoder(), None, images, ["k"] * 4, ["t"] * 5)
    with pytest.raises(ValueError, match="dim"):
        embed_with_cache(FakeEncoder(), EmbeddingCache(tmp_path, "fake@1", DIM + 1), images,
                         ["k"] * 5, ["t"] * 5)


def test_text_key_is_sha256_of_the_exact_string():
    assert text_key("Lampe") == hashlib.sha256("Lampe".encode()).hexdigest()
    assert text_key("Lampe") != text_key("lampe") != text_key("Lampe ")


def test_with_the_real_tiny_encoder(tmp_path, images):
    """The same contract through ClipEncoder (tiny-random): cached vectors equal freshly encoded ones."""
    from curation_dagster.core.encoder import ClipEncoder

    enc = ClipEncoder.load("tiny-random", "cpu")
    keys = [sha256_file(p) for p in images]
    texts = [f"Lampe torche {i}" for i in range(5)]
    cache_root = tmp_path / "cache"
    img1, txt1, s1 = embed_with_cache(enc, EmbeddingCache(cache_root, enc.model_identity, enc.dim), images, keys,
                                      texts, batch_size=2)
    assert s1["images_encoded"] == 5 and s1["items_per_s"] > 0
    np.testing.assert_allclose(img1, enc.encode_images(images), atol=1e-6)
    np.testing.assert_allclose(txt1, enc.encode_texts(texts), atol=1e-6)
    img2, txt2, s2 = embed_with_cache(enc, EmbeddingCache(cache_root, enc.model_identity, enc.dim), images, keys,
                                      texts)
    assert s2["image_cache_hits"] == 5 and s2["text_cache_hits"] == 5 and s2["images_encoded"] == 0
    np.testing.assert_array_equal(img2, img1)
    np.testing.assert_array_equal(txt2, txt1)


def test_run_log_says_what_came_from_the_cache_and_what_was_encoded(tmp_path, images):
    """The stage's log: the plan (cache hits, images + texts to encode), progress with a rate, and the outcome."""
    import polars as pl

    from curation_dagster.assets.embeddings import EmbeddingConfig, embed_clean_rows

    clean = pl.DataFrame({"record_id": list(range(5)), "image_path": [str(p) for p in images],
                          "image_sha256": [sha256_file(p) for p in images],
                          "designation": [f"produit {i}" for i in range(5)], "description": [""] * 5})

    class Paths:
        artifacts = tmp_path / "artifacts"

    enc = FakeEncoder()
    enc.model_name, enc.meaningless, enc.device = "fake", True, "cpu"
    first: list[str] = []
    embed_clean_rows(clean, enc, Paths, EmbeddingConfig(), log=first.append)
    assert "5 rows: 0 images and 0 texts from the cache; encoding 5 images + 5 texts = 10 items" in first[0]
    assert any(line.startswith("encoded 10/10 items (images + texts) (100%)") for line in first)
    second: list[str] = []
    embed_clean_rows(clean, enc, Paths, EmbeddingConfig(), log=second.append)
    assert "5 images and 5 texts from the cache; encoding 0 images + 0 texts = 0 items (nothing to encode)" in second[0]
    assert "5 images and 5 texts from the cache, 0 images and 0 texts encoded" in second[-1]


def test_progress_line_has_rate_and_eta():
    from curation_dagster.core.progress import ProgressLog

    now = [100.0]
    lines: list[str] = []
    p = ProgressLog(lines.append, "encoded", "items", every_s=5, clock=lambda: now[0])
    now[0] = 110.0
    p(250, 1000)
    now[0] = 111.0
    p(260, 1000)  # within 5 s of the last line: not logged
    now[0] = 150.0
    p(1000, 1000)
    assert lines == ["encoded 250/1000 items (25%) — 25.0 items/s, ETA 0:30",
                     "encoded 1000/1000 items (100%) — 20.0 items/s, took 0:50"]


# (from an ops review, 2026-11-29: row b was served as a NaN hit before)
def test_a_shard_with_damaged_vectors_is_not_served_as_hits(tmp_path):
    cache = EmbeddingCache(tmp_path, "m@1", 8)
    v = np.eye(8, dtype=np.float32)[:2]
    cache.add("image", ["a", "b"], v)
    shard = cache._shards("image")[0]
    raw = bytearray((shard / "vectors.npy").read_bytes())
    raw[-4 * 8:] = b"\xff" * (4 * 8)  # bit rot / torn write in the payload of row "b": NaNs
    (shard / "vectors.npy").write_bytes(bytes(raw))

    found, got = EmbeddingCache(tmp_path, "m@1", 8).lookup("image", ["a", "b"])
    # add() refuses non-finite vectors; lookup must not hand them out either (they would fail the blocking
    # embeddings_valid check on every run until someone deletes the cache by hand)
    assert not (found[1] and not np.isfinite(got[1]).all()), f"found={found.tolist()} row b={got[1]}"
    assert found.tolist() == [True, False] and np.array_equal(got[0], v[0])  # the good row still serves
