"""The inbox (products added through the API): durable entries, tombstones, and the next pipeline run reads them."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dagster as dg
import polars as pl

from curation_dagster.core.artifacts import load_version
from curation_dagster.core.inbox import ALLOCATED_ID_BASE, Inbox
from curation_dagster.core.rakuten import read_source
from pipeline_helpers import REPO, SAMPLE_DIR, materialize_all, up_to_publication

IMAGE = next((SAMPLE_DIR / "images" / "image_train").glob("*.jpg"))


def _record(rid: int, title: str = "Lampe torche LED étanche pour le camping", code: int | None = 2583) -> dict:
    return {"record_id": rid, "productid": rid, "imageid": rid, "designation": title, "description": "",
            "prdtypecode": code}


def test_entries_tombstones_and_supersession(tmp_path):
    inbox = Inbox(tmp_path)
    a = inbox.add(_record(101), IMAGE.read_bytes())
    inbox.add(_record(102), IMAGE.read_bytes())
    assert [e.record_id for e in inbox.entries()] == [101, 102]
    assert a.image_path.read_bytes() == IMAGE.read_bytes() and (a.image_path.stat().st_mode & 0o777) == 0o644
    inbox.add(_record(101, title="Lampe frontale rechargeable"), IMAGE.read_bytes())  # a later entry supersedes
    assert {e.record_id: e.record["designation"] for e in inbox.entries()}[101] == "Lampe frontale rechargeable"
    assert inbox.delete(102) and not inbox.delete(999)
    assert [e.record_id for e in inbox.entries()] == [101] and inbox.tombstoned() == {102}
    before = inbox.fingerprint()
    inbox.add(_record(103), IMAGE.read_bytes())
    assert inbox.fingerprint() != before


def _add_many(args):
    root, n = args
    inbox = Inbox(root)
    ids = []
    for _ in range(n):
        with inbox.reserve():
            rid = inbox.allocate_id()
            inbox.add(_record(rid), b"\xff\xd8 not checked here")
        ids.append(rid)
    return ids


def test_concurrent_writers_get_distinct_ids_and_a_consistent_inbox(tmp_path):
    # ProcessPoolExecutor shuts its workers down with sentinels; multiprocessing.Pool's __exit__ terminates them
    # with SIGTERM, which hangs for ever where SIGTERM is ignored (inherited from a nohup'ed CI shell, say).
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = list(pool.map(_add_many, [(str(tmp_path), 5)] * 4))
    ids = [i for chunk in got for i in chunk]
    assert len(ids) == 20 and len(set(ids)) == 20 and min(ids) > ALLOCATED_ID_BASE
    entries = Inbox(tmp_path).entries()
    assert sorted(e.record_id for e in entries) == sorted(ids)
    assert all(json.loads((e.path / "record.json").read_text())["record_id"] == e.record_id for e in entries)


def test_a_writer_killed_mid_write_leaves_no_half_entry(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from curation_dagster.core import inbox as ib
        real = ib.seal_dir
        def die(tmp):
            os._exit(9)  # image and record written, nothing renamed
        ib.seal_dir = die
        ib.Inbox({str(tmp_path)!r}).add({{"record_id": 7, "designation": "x"}}, b"img")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    inbox = Inbox(tmp_path)
    assert inbox.entries() == []
    assert len(list((tmp_path / "inbox" / "entries").glob(".tmp-*"))) == 1  # the leftover, ignored
    os.utime(next((tmp_path / "inbox" / "entries").glob(".tmp-*")), (0, 0))
    assert inbox.clean_stale_temp() == 1


def test_next_run_reads_the_inbox_with_provenance(tmp_path, source_builder):
    b = source_builder(6)
    b.write()
    artifacts = tmp_path / "artifacts"
    inbox = Inbox(artifacts)
    inbox.add(_record(ALLOCATED_ID_BASE + 1), IMAGE.read_bytes())
    inbox.add(_record(ALLOCATED_ID_BASE + 2, code=None), IMAGE.read_bytes())  # unlabelled, and a byte copy
    inbox.add(_record(ALLOCATED_ID_BASE + 3), IMAGE.read_bytes())
    inbox.delete(ALLOCATED_ID_BASE + 3)
    read = read_source(b.root, inbox_root=artifacts / "inbox")
    api = read.products.filter(pl.col("source") == "api")
    assert sorted(api["record_id"].to_list()) == [ALLOCATED_ID_BASE + 1, ALLOCATED_ID_BASE + 2]
    assert set(read.products.filter(pl.col("source") == "dataset")["record_id"]) == {int(r["productid"]) for r in b.rows}
    assert all(Path(p).is_file() and "inbox" in p for p in api["source_image_path"])


def test_the_published_version_contains_an_api_product(tmp_path, source_builder):
    b = source_builder(12)
    b.write()
    artifacts = tmp_path / "artifacts"
    src = b.image_path(b.rows[0])
    # a new image (not a byte copy of a dataset one, or dedup would rightly remove it): row 0's image rotated
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(src).rotate(90).save(buf, "JPEG", quality=90)
    Inbox(artifacts).add(_record(ALLOCATED_ID_BASE + 1, title="Tente de camping quatre places imperméable"),
                         buf.getvalue())
    result = materialize_all(b.root, artifacts, selection=up_to_publication(),
                             run_config={"ops": {"curated_products": {"config": {"drop_fraction": 0.0}}}})
    assert result.success
    version = load_version(artifacts)
    assert ALLOCATED_ID_BASE + 1 in set(version.records["record_id"].to_list())
    raw = result.output_for_node("raw_products", "raw_products")
    assert raw.filter(pl.col("source") == "api").height == 1


def test_source_sensor_notices_new_inbox_entries(tmp_path, sample_dir):
    import shutil

    from curation_dagster import automation
    from curation_dagster.resources import CurationPaths

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data, ignore=shutil.ignore_patterns("images"))
    (data / "images" / "image_train").mkdir(parents=True)
    paths = CurationPaths(data_dir=str(data), artifacts_dir=str(tmp_path / "artifacts"))
    ctx = dg.build_sensor_context(cursor=None, resources={"paths": paths})
    assert isinstance(automation.source_files_sensor(ctx), dg.RunRequest)
    cursor = ctx.cursor
    ctx = dg.build_sensor_context(cursor=cursor, resources={"paths": paths})
    assert isinstance(automation.source_files_sensor(ctx), dg.SkipReason)
    Inbox(tmp_path / "artifacts").add(_record(5), IMAGE.read_bytes())
    ctx = dg.build_sensor_context(cursor=cursor, resources={"paths": paths})
    req = automation.source_files_sensor(ctx)
    assert isinstance(req, dg.RunRequest) and "API inbox" in req.tags["curation/change"]


def test_the_inbox_is_readable_by_another_user_whatever_the_writers_umask(tmp_path):
    """The API (writer) and the pipeline (reader) may run as different users. Before the fix, under umask 077 the
    inbox, entries/ and tombstones/ folders were 0700 and the pipeline's read failed with PermissionError."""
    old = os.umask(0o077)
    try:
        inbox = Inbox(tmp_path / "artifacts")
        with inbox.reserve():
            entry = inbox.add(_record(301), IMAGE.read_bytes())
        assert inbox.delete(301)
    finally:
        os.umask(old)
    for d in (inbox.root, inbox.root / "entries", inbox.root / "tombstones", entry.path):
        assert d.stat().st_mode & 0o755 == 0o755, (d, oct(d.stat().st_mode))
    for f in (entry.image_path, *(inbox.root / "tombstones").iterdir()):
        assert f.stat().st_mode & 0o644 == 0o644, (f, oct(f.stat().st_mode))
