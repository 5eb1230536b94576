"""The curated artifact contract: roundtrip, atomic publication, pruning, and rejection of bad inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import polars as pl
import pytest

from curation_dagster.core import artifacts as art
from curation_dagster.core.settings import REPO_ROOT
from curation_dagster.core.artifacts import (
    ArtifactError,
    NoArtifactError,
    list_versions,
    load_version,
    new_version_name,
    publish_curated_version,
    read_current_version_name,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_inputs(n: int = 6, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    pids = np.arange(1000, 1000 + n, dtype=np.int64) + seed * 100
    records = pl.DataFrame(
        {
            "record_id": pids,
            "productid": pids,
            "imageid": pids + 5_000_000,
            "designation": [f"produit {i} é" for i in range(n)],
            "description": [None if i % 2 else f"desc {i}" for i in range(n)],
            "prdtypecode": np.array([10, 40, 10, 2583, 40, 10][:n] + [10] * max(0, n - 6), dtype=np.int64),
            "category": [None, "Jeux", "Livres", "Piscine", "Jeux", "Livres"][:n] + ["Livres"] * max(0, n - 6),
            "image_file": [f"{p + 5_000_000}_{p}.jpg" for p in pids.tolist()],
            "alignment_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
            "dup_group": np.arange(n, dtype=np.int64),
        }
    )
    return records, _unit(rng, n, d), _unit(rng, n, d), {"model": "tiny-random", "counts": {"curated": n}}


def test_roundtrip(tmp_path):
    records, img, txt, manifest = make_inputs()
    info = publish_curated_version(tmp_path, records, img, txt, manifest, run_id="abc-123-def-456")
    assert info.count == 6 and info.dim == 8
    assert info.version.endswith("_abc123def456")
    assert read_current_version_name(tmp_path) == info.version
    assert list_versions(tmp_path) == [info.version]

    v = load_version(tmp_path)
    assert v.version == info.version
    assert v.records.columns == art.RECORD_COLUMNS
    assert dict(v.records.schema) == art.RECORD_SCHEMA
    assert v.records.equals(records)
    np.testing.assert_array_equal(v.image_emb, img)
    np.testing.assert_array_equal(v.text_emb, txt)
    assert v.manifest["model"] == "tiny-random" and v.model == "tiny-random"
    assert v.manifest["format_version"] == art.FORMAT_VERSION
    assert (v.manifest["dim"], v.manifest["count"], v.manifest["version"]) == (8, 6, info.version)
    assert v.manifest["run_id"] == "abc-123-def-456" and "created_at" in v.manifest
    assert v.manifest["counts"] == {"curated": 6}
    # The caller's manifest dict is not mutated.
    assert "format_version" not in manifest


def test_compatible_dtypes_are_widened_and_extra_columns_kept(tmp_path):
    records, img, txt, manifest = make_inputs()
    records = records.with_columns(
        pl.col("prdtypecode").cast(pl.Int32),
        pl.col("alignment_score").cast(pl.Float64),
        pl.lit(None).alias("category"),
        pl.lit("x").alias("extra_col"),
    )
    publish_curated_version(tmp_path, records, img, txt, manifest)
    v = load_version(tmp_path)
    assert v.records.schema["prdtypecode"] == pl.Int64
    assert v.records.schema["alignment_score"] == pl.Float32
    assert v.records.schema["category"] == pl.String
    assert v.records.columns[-1] == "extra_col"


def test_empty_corpus_roundtrip(tmp_path):
    records, img, txt, manifest = make_inputs()
    publish_curated_version(tmp_path, records.head(0), img[:0], txt[:0], manifest)
    v = load_version(tmp_path)
    assert v.count == 0 and v.dim == 8 and v.records.height == 0


def test_version_names_sortable_and_unique():
    names = [new_version_name("run") for _ in range(200)]
    assert len(set(names)) > 1  # microsecond resolution
    assert names == sorted(names)
    assert all(art.is_valid_version_name(n) for n in names)
    assert new_version_name(None) != new_version_name(None)
    assert art.is_valid_version_name(new_version_name("../../etc/passwd"))  # sanitised
    assert "/" not in new_version_name("../../etc/passwd")


def test_current_replaced_old_untouched_and_pruned(tmp_path):
    infos = []
    for i in range(4):
        records, img, txt, manifest = make_inputs(seed=i)
        infos.append(publish_curated_version(tmp_path, records, img, txt, manifest, keep_versions=3))
    names = [i.version for i in infos]
    assert names == sorted(names)
    assert read_current_version_name(tmp_path) == names[-1]
    assert list_versions(tmp_path) == names[1:]  # oldest pruned, 3 kept
    assert infos[-1].pruned == (names[0],)
    # Old versions are still complete and unchanged.
    old = load_version(tmp_path, names[1])
    r1, img1, _, _ = make_inputs(seed=1)
    assert old.records.equals(r1)
    np.testing.assert_array_equal(old.image_emb, img1)
    # Nothing but the published versions, CURRENT, the publishers' lock and the (now empty) staging area is left..
    assert sorted(p.name for p in (tmp_path / "curated").iterdir()) == sorted(names[1:] + [".publish.lock", "CURRENT", "_staged"])
    assert list((tmp_path / "curated" / "_staged").iterdir()) == []


def test_prune_never_removes_current(tmp_path):
    infos = [publish_curated_version(tmp_path, *make_inputs(seed=i), keep_versions=5) for i in range(3)]
    # Roll back CURRENT to the oldest version, then publish with keep_versions=1.
    (tmp_path / "curated" / "CURRENT").write_text(infos[0].version + "\n")
    art._prune(tmp_path / "curated", 1, protect=infos[2].version)
    assert list_versions(tmp_path) == [infos[0].version, infos[2].version]


def test_no_artifact(tmp_path):
    assert read_current_version_name(tmp_path) is None
    assert list_versions(tmp_path) == []
    with pytest.raises(NoArtifactError, match="dagster job execute -m curation_dagster.definitions -j curation_job"):
        load_version(tmp_path)


def test_crash_mid_write_leaves_current_on_old_version(tmp_path, monkeypatch):
    first = publish_curated_version(tmp_path, *make_inputs(seed=0))
    calls = {"n": 0}
    real_save = np.save

    def failing_save(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the text embeddings: records and image embeddings already written
            raise OSError("disk full (injected)")
        return real_save(*a, **kw)

    monkeypatch.setattr(art.np, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        publish_curated_version(tmp_path, *make_inputs(seed=1))
    assert read_current_version_name(tmp_path) == first.version
    assert list_versions(tmp_path) == [first.version]
    assert [p.name for p in (tmp_path / "curated" / "_staged").iterdir()] == []  # temp dir removed
    assert load_version(tmp_path).version == first.version


def test_hard_kill_mid_write_is_invisible_to_readers(tmp_path):
    """A writer process killed (os._exit, no cleanup) after writing part of a version leaves CURRENT intact."""
    first = publish_curated_version(tmp_path, *make_inputs(seed=0))
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(art.Path(__file__).parent)!r})
        import numpy as np
        from test_artifacts import make_inputs
        from curation_dagster.core import artifacts as art, atomic
        real = atomic.fsync_file
        def die(path):
            if path.name == "manifest.json":
                os._exit(9)   # everything written, nothing renamed
            real(path)
        atomic.fsync_file = die
        art.publish_curated_version({str(tmp_path)!r}, *make_inputs(seed=1))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert proc.returncode == 9, proc.stderr
    leftovers = [p for p in (tmp_path / "curated" / "_staged").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "manifest.json").exists()  # the crash really happened mid-publish
    assert read_current_version_name(tmp_path) == first.version
    assert list_versions(tmp_path) == [first.version]
    assert load_version(tmp_path).version == first.version
    # The next publish works and ignores the leftover.
    second = publish_curated_version(tmp_path, *make_inputs(seed=2))
    assert load_version(tmp_path).version == second.version


def test_concurrent_reader_never_sees_partial_version(tmp_path):
    publish_curated_version(tmp_path, *make_inputs(n=50, d=16, seed=0))
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                v = load_version(tmp_path)
                assert v.count == 50
                seen.add(v.version)
            except BaseException as exc:  # noqa: BLE001 - any failure is a test failure
                errors.append(exc)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 15):
            publish_curated_version(tmp_path, *make_inputs(n=50, d=16, seed=i), keep_versions=3)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert len(seen) >= 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r, i, t, m: (r.drop("dup_group"), i, t, m), "missing required columns"),
        (lambda r, i, t, m: (r.with_columns(pl.col("record_id").cast(pl.String)), i, t, m), "'record_id' has dtype"),
        (lambda r, i, t, m: (r, i[:-1], t, m), "has 5 rows but records has 6"),
        (lambda r, i, t, m: (r, i, t[:, :4].copy(), m), "dimension 4, expected 8"),
        (lambda r, i, t, m: (r, i.astype(np.float64), t, m), "must be float32"),
        (lambda r, i, t, m: (r, i * 2, t, m), "not L2-normalised"),
        (lambda r, i, t, m: (r, np.where(np.eye(6, 8, dtype=bool), np.nan, i).astype(np.float32), t, m), "non-finite"),
        (lambda r, i, t, m: (r, i, t, {}), "must name the embedding model"),
        (lambda r, i, t, m: (r, i, t, {"model": "x", "bad": object()}), "not JSON-serialisable"),
        (lambda r, i, t, m: (r, i, t, {"model": "x", "nan": float("nan")}), "not JSON-serialisable"),
        (lambda r, i, t, m: (pl.concat([r.head(1), r.tail(5)]).with_columns(pl.lit(1000, pl.Int64).alias("record_id"),
                                                                        pl.lit(1000, pl.Int64).alias("productid")), i, t, m),
         "duplicate record_id"),
        (lambda r, i, t, m: (r.with_columns(pl.col("record_id") + 1), i, t, m), "record_id must equal productid"),
        (lambda r, i, t, m: (r.with_columns(pl.lit("../x.jpg").alias("image_file")), i, t, m), "plain file name"),
        (lambda r, i, t, m: (r.with_columns(pl.lit(None, pl.String).alias("designation")), i, t, m), "'designation' has 6 nulls"),
        (lambda r, i, t, m: (r.to_dicts(), i, t, m), "polars DataFrame"),
        (lambda r, i, t, m: (r, i.tolist(), t, m), "numpy array"),
    ],
)
def test_bad_inputs_rejected_and_nothing_published(tmp_path, mutate, message):
    args = mutate(*make_inputs())
    with pytest.raises(ArtifactError, match=message):
        publish_curated_version(tmp_path, *args)
    assert read_current_version_name(tmp_path) is None
    assert list_versions(tmp_path) == []


def test_keep_versions_must_be_positive(tmp_path):
    with pytest.raises(ArtifactError, match="keep_versions"):
        publish_curated_version(tmp_path, *make_inputs(), keep_versions=0)


def _published(tmp_path):
    info = publish_curated_version(tmp_path, *make_inputs())
    return info.path


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "text_embeddings.npy").unlink(), r"incomplete: missing \['text_embeddings.npy'\]"),
        (lambda p: np.save(p / "image_embeddings.npy", np.ones((6, 4), np.float32) / 2), "dimension 4, expected 8"),
        (lambda p: np.save(p / "image_embeddings.npy", np.full((5, 8), 8**-0.5, np.float32)), "5 rows but records has 6"),
        (lambda p: np.save(p / "image_embeddings.npy", np.array([{"a": 1}], dtype=object)), "cannot read"),
        (lambda p: (p / "image_embeddings.npy").write_bytes(b"garbage"), "cannot read"),
        (lambda p: (p / "records.parquet").write_bytes(b"garbage"), "cannot read records.parquet"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "cannot read manifest.json"),
        (lambda p: _edit_manifest(p, model=""), "does not name the embedding model"),
        (lambda p: _edit_manifest(p, format_version=99), "format_version 99 is not supported"),
        (lambda p: _edit_manifest(p, dim=16), "dimension 8, expected 16"),
        (lambda p: _edit_manifest(p, count=7), "records.parquet has 6 rows, manifest count is 7"),
    ],
)
def test_damaged_version_rejected_with_clear_message(tmp_path, damage, message):
    vdir = _published(tmp_path)
    damage(vdir)
    with pytest.raises(ArtifactError, match=message):
        load_version(tmp_path)


def _edit_manifest(vdir, **changes):
    m = json.loads((vdir / "manifest.json").read_text())
    m.update(changes)
    (vdir / "manifest.json").write_text(json.dumps(m))


def test_current_pointing_to_missing_or_bad_name(tmp_path):
    _published(tmp_path)
    cur = tmp_path / "curated" / "CURRENT"
    cur.write_text(new_version_name("gone") + "\n")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_version(tmp_path)
    cur.write_text("../../etc\n")
    with pytest.raises(ArtifactError, match="invalid curated version name"):
        load_version(tmp_path)


def test_alignment_stats():
    s = art.alignment_stats(np.arange(11, dtype=np.float32))
    assert s == {"min": 0.0, "max": 10.0, "mean": 5.0, "p10": 1.0, "p50": 5.0, "p90": 9.0}
    assert art.alignment_stats(np.array([], np.float32))["p50"] is None


def test_current_never_goes_back_to_an_older_version(tmp_path):
    """Two runs at once: B staged after A but published first. Before the fix A then took CURRENT back."""
    a = art.write_staged_version(tmp_path, *make_inputs(), run_id="runA")
    b = art.write_staged_version(tmp_path, *make_inputs(seed=1), run_id="runB")
    assert a.version < b.version
    art.publish_version(tmp_path, b.version)
    with pytest.raises(art.PublishRefused, match="newer version .* is CURRENT already"):
        art.publish_version(tmp_path, a.version)
    assert read_current_version_name(tmp_path) == b.version
    assert art.load_staged_version(tmp_path, a.version).count == 6  # kept staged, for inspection


def test_concurrent_publishers_never_leave_current_dangling(tmp_path, monkeypatch):
    """A's CURRENT write is slowed; B publishes meanwhile with keep_versions=1. Before the fix B's prune deleted
    A's version after A had renamed it, and A then pointed CURRENT at a version that no longer existed."""
    a = art.write_staged_version(tmp_path, *make_inputs(), run_id="runA")
    b = art.write_staged_version(tmp_path, *make_inputs(seed=1), run_id="runB")
    real_write = art._write_current
    a_renamed = threading.Event()

    def slow_write(cdir, version):
        if version == a.version:
            a_renamed.set()
            time.sleep(0.5)
        real_write(cdir, version)

    monkeypatch.setattr(art, "_write_current", slow_write)
    errors = []
    ta = threading.Thread(target=lambda: art.publish_version(tmp_path, a.version, keep_versions=1))
    ta.start()
    assert a_renamed.wait(10)
    try:
        art.publish_version(tmp_path, b.version, keep_versions=1)
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)
    ta.join()
    assert not errors
    assert read_current_version_name(tmp_path) == b.version
    assert load_version(tmp_path).version == b.version


def test_a_version_pins_its_images(tmp_path):
    records, img, txt, manifest = make_inputs()
    shared = tmp_path / "images"
    shared.mkdir()
    for i, name in enumerate(records["image_file"].to_list()):
        (shared / name).write_bytes(b"photo %d" % i)
    info = art.write_staged_version(tmp_path, records, img, txt, manifest, images_from=shared)
    first = records["image_file"][0]
    (shared / "new").write_bytes(b"another photo")
    os.replace(shared / "new", shared / first)  # how a later run replaces a collected image
    assert (info.path / "images" / first).read_bytes() == b"photo 0"
    assert (info.path / "images").stat().st_mode & 0o755 == 0o755
    (shared / records["image_file"][1]).unlink()
    with pytest.raises(art.ArtifactError, match="missing"):
        art.write_staged_version(tmp_path, records, img, txt, manifest, images_from=shared)
    with pytest.raises(art.ArtifactError, match="plain file name"):
        art.write_staged_version(tmp_path, records.with_columns(pl.lit("../x.jpg").alias("image_file")), img, txt,
                                 manifest, images_from=shared)


def test_a_publish_that_failed_after_the_move_is_finished_by_a_retry(tmp_path, monkeypatch):
    """Disk full (or a kill) between moving the version out of _staged/ and writing CURRENT. Before the fix a retry
    failed ("does not exist in _staged") and a re-execution found nothing to publish: the version was stranded."""
    import errno
    from types import SimpleNamespace

    from curation_dagster.assets._run_version import moved_version_name, staged_version_name

    a = art.publish_curated_version(tmp_path, *make_inputs(), run_id="runA")
    b = art.write_staged_version(tmp_path, *make_inputs(seed=1), run_id="runB")
    real_write = art._write_current

    def disk_full(cdir, version):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(art, "_write_current", disk_full)
    with pytest.raises(OSError, match="No space"):
        art.publish_version(tmp_path, b.version)
    assert read_current_version_name(tmp_path) == a.version  # still serving A
    monkeypatch.setattr(art, "_write_current", real_write)
    run = SimpleNamespace(run_id="runB", parent_run_id=None, root_run_id=None)
    assert staged_version_name(run, tmp_path) is None  # what the publish step looks for first...
    assert moved_version_name(run, tmp_path) == b.version  # ...then this: the re-execution finds it
    info = art.publish_version(tmp_path, b.version)
    assert info.version == b.version and read_current_version_name(tmp_path) == b.version
    assert load_version(tmp_path).count == 6
    art.publish_version(tmp_path, b.version)  # once more: nothing to do, still B
    assert read_current_version_name(tmp_path) == b.version and list_versions(tmp_path) == [a.version, b.version]


def test_a_clock_set_back_still_names_a_new_version_after_the_served_one(tmp_path, monkeypatch):
    """Before the fix the name came from the clock alone: after the clock went back an hour, every new version
    sorted below the served one and publication refused it as older until the clock caught up."""
    from datetime import datetime, timedelta, timezone

    a = art.publish_curated_version(tmp_path, *make_inputs(), run_id="runA")

    class OneHourAgo(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz or timezone.utc) - timedelta(hours=1)

    monkeypatch.setattr(art, "datetime", OneHourAgo)
    b = art.write_staged_version(tmp_path, *make_inputs(seed=1), run_id="runB")
    c = art.write_staged_version(tmp_path, *make_inputs(seed=2), run_id="runC")
    assert a.version < b.version < c.version  # staging order, whatever the clock says
    art.publish_version(tmp_path, c.version)
    assert read_current_version_name(tmp_path) == c.version
    with pytest.raises(art.PublishRefused, match="newer version"):  # b was staged before c: still refused
        art.publish_version(tmp_path, b.version)
