"""The artifacts tree's run lease (core.tree_lease): who may run at once, and when a holder stops counting."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import dagster as dg

from curation_dagster.core.tree_lease import (
    LEASE_FILE, STALE_UNKNOWN_S, LeaseHolder, LeaseWaitTimeout, TreeLease, process_start,
)
from curation_dagster.resources import _only_shards

ACTIVE: set[str] = set()  # runs the instance says are running; FINISHED: said finished; any other: unknown to it
FINISHED: set[str] = set()


def _status(run_id: str) -> bool | None:
    return True if run_id in ACTIVE else False if run_id in FINISHED else None


def _lease(tmp_path) -> TreeLease:
    ACTIVE.clear()
    FINISHED.clear()
    return TreeLease(tmp_path, _status)


def _run(run_id: str, mode: str, bound: str = "run") -> LeaseHolder:
    return LeaseHolder(run_id=run_id, mode=mode, bound=bound)


def test_shard_runs_share_the_tree_and_exclusive_runs_do_not(tmp_path):
    lease = _lease(tmp_path)
    ACTIVE.update({"s1", "s2", "x"})
    try:
        assert lease.try_acquire(_run("s1", "shared")) == []
        assert lease.try_acquire(_run("s2", "shared")) == []  # shard runs side by side
        blockers = lease.try_acquire(_run("x", "exclusive"))
        assert {b.run_id for b in blockers} == {"s1", "s2"}  # the curate run waits for both shards
        lease.release("s1")
        lease.release("s2")
        assert lease.try_acquire(_run("x", "exclusive")) == []
        assert [b.run_id for b in lease.try_acquire(_run("s3", "shared"))] == ["x"]  # a shard waits for ingest
        assert [b.run_id for b in lease.try_acquire(_run("y", "exclusive"))] == ["x"]
        assert lease.try_acquire(_run("x", "exclusive")) == []  # a run's next step (another process) re-enters
    finally:
        ACTIVE.clear()


def test_a_finished_run_and_a_dead_process_stop_holding_the_tree(tmp_path):
    lease = _lease(tmp_path)
    ACTIVE.add("crashed-run")
    assert lease.try_acquire(_run("crashed-run", "exclusive")) == []
    assert [b.run_id for b in lease.try_acquire(_run("next", "exclusive"))] == ["crashed-run"]
    ACTIVE.discard("crashed-run")  # run monitoring marked it failed: the tree is free without anyone releasing it
    FINISHED.add("crashed-run")
    assert lease.try_acquire(_run("next", "exclusive")) == []
    lease.release("next")

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = LeaseHolder(run_id="in-process-run", mode="exclusive", bound="process", pid=worker.pid)
        assert lease.try_acquire(dead) == []
        assert [b.run_id for b in lease.try_acquire(_run("after", "exclusive"))] == ["in-process-run"]
    finally:
        worker.kill()
        worker.wait()
    # its run may still be STARTED in the instance (nobody marked it): the process is gone, so the tree is free
    assert lease.try_acquire(_run("after", "exclusive")) == []


def test_a_waiting_run_says_whom_it_waits_for_and_starts_when_that_run_ends(tmp_path):
    lease = _lease(tmp_path)
    ACTIVE.update({"a", "b"})
    said: list[str] = []
    try:
        assert lease.try_acquire(_run("a", "exclusive")) == []
        timer = threading.Timer(1.0, lambda: (FINISHED.add("a"), ACTIVE.discard("a")))
        timer.start()
        t0 = time.monotonic()
        waited = lease.acquire(_run("b", "exclusive"), poll_s=0.05, say=said.append)
        assert waited >= 0.9 and time.monotonic() - t0 >= 0.9
        assert "waits" in said[0] and "run a" in said[0]
        assert [h.run_id for h in lease.holders()] == ["b"]
    finally:
        ACTIVE.clear()


def test_a_damaged_lease_table_is_replaced_not_fatal(tmp_path, caplog):
    lease = _lease(tmp_path)
    (tmp_path / LEASE_FILE).write_text("{not json")
    ACTIVE.add("r")
    try:
        assert lease.try_acquire(_run("r", "exclusive")) == []
        assert "unreadable" in caplog.text
        assert [h.run_id for h in lease.holders()] == ["r"]
    finally:
        ACTIVE.clear()


def test_an_instance_that_cannot_answer_keeps_the_holder(tmp_path):
    def broken(run_id):
        raise ConnectionError("run storage down")

    lease = TreeLease(tmp_path, broken)
    assert lease.try_acquire(_run("a", "exclusive")) == []
    assert [b.run_id for b in lease.try_acquire(_run("b", "exclusive"))] == ["a"]


def test_only_runs_of_the_shard_asset_share_the_tree():
    import curation_dagster.definitions_sharded as ds

    shards = {dg.AssetKey("clip_embedding_shards")}
    assert _only_shards("__ASSET_JOB", shards)  # a partition materialized from the asset's page / a backfill
    assert not _only_shards("__ASSET_JOB", shards | {dg.AssetKey("clean_products")})
    assert _only_shards(ds.embedding_shards_job.name, None)  # `dagster job execute -j embedding_shards_job`
    assert not _only_shards(ds.ingest_job.name, None)  # a whole job without an asset selection is exclusive
    assert not _only_shards(ds.curate_from_shards_job.name, set())


def test_a_table_that_cannot_be_read_this_once_is_not_taken_for_an_empty_one(tmp_path, monkeypatch):
    """Before: any OSError reading the table (EMFILE, EIO) counted as damage; the table was rewritten with only
    the newcomer in it, and two runs mixed their tables."""
    import errno
    from pathlib import Path

    lease = _lease(tmp_path)
    ACTIVE.update({"a", "b"})
    assert lease.try_acquire(_run("a", "exclusive")) == []
    real = Path.read_text
    failures = [1]

    def flaky(self, *args, **kwargs):
        if self.name == LEASE_FILE and failures:
            failures.pop()
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", flaky)
    try:
        lease.try_acquire(_run("b", "exclusive"))
        raise AssertionError("expected OSError")
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    assert [h.run_id for h in lease.holders()] == ["a"]  # a is still on file
    failures.append(1)
    with_timeout = None
    try:
        lease.acquire(_run("b", "exclusive"), poll_s=0.01, max_wait_s=0.2)
    except LeaseWaitTimeout as exc:
        with_timeout = str(exc)
    assert with_timeout and "run a" in with_timeout  # it waited (through the failed read) and then gave up


def test_a_reused_pid_or_an_unknown_run_does_not_hold_the_tree_for_ever(tmp_path):
    """Before: a process-bound holder was judged by its pid alone: after a container restart its pid could be the
    code server's, and the tree stayed blocked."""
    import os

    lease = _lease(tmp_path)
    me = os.getpid()
    assert process_start(me)  # Linux: /proc tells when a process started
    reused = LeaseHolder(run_id="old", mode="exclusive", bound="process", pid=me, pid_start="another-boot:1")
    assert not lease.is_live(reused)
    assert lease.is_live(LeaseHolder(run_id="old", mode="exclusive", bound="process", pid=me,
                                     pid_start=process_start(me)))
    FINISHED.add("done")  # the instance says its run finished: not live, even if the pid is still there
    assert not lease.is_live(LeaseHolder(run_id="done", mode="exclusive", bound="process", pid=me,
                                         pid_start=process_start(me)))
    # a many-process run this instance does not know: live for a while, then gone
    assert lease.is_live(LeaseHolder(run_id="elsewhere", mode="exclusive", bound="run"))
    old = time.time() - STALE_UNKNOWN_S - 1
    assert not lease.is_live(LeaseHolder(run_id="elsewhere", mode="exclusive", bound="run", since=old))
