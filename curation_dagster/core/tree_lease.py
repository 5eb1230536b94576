"""Which runs may write an artifacts tree's intermediate tables now: one *exclusive* run, or any number of *shared* ones.

The tables under ``tables/`` and ``embeddings/`` are one copy per asset, so two pipeline runs at once would read each
other's inputs. A single process-wide lock cannot express the sharded code location, whose run is many processes
(one per step, on other machines with celery or Kubernetes) and whose embedding-shard runs are meant to run side by
side. So the tree holds a small lease table, ``<tree>/.run.lease.json``: one entry per holding run, updated under a
short ``flock`` on ``.run.lease.guard``. A run enters when no live holder conflicts (an exclusive run conflicts with
everyone, a shared one only with an exclusive one) and waits otherwise.

A holder is *live* while
- ``bound="process"`` (a run whose steps all run in one process, the in-process executor): that very process still
  runs on this host (its pid *and* its start time: a pid reused after a container restart is another process) and
  the Dagster instance does not say the run has finished; a killed run worker frees the tree at once;
- ``bound="run"`` (a run whose steps run in many processes): the Dagster instance says the run has not finished. A
  run worker that dies is marked failed by run monitoring (dagster_home/dagster.yaml), which frees the tree.
A run the judging instance does not know (another instance, an ephemeral one, a deleted run) counts as live for
``STALE_UNKNOWN_S`` after it entered (dagster.yaml's ``max_runtime_seconds``), then as gone.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

from .atomic import atomic_write_text

LEASE_FILE = ".run.lease.json"
GUARD_FILE = ".run.lease.guard"
STALE_UNKNOWN_S = 12 * 3600.0
log = logging.getLogger(__name__)


class LeaseWaitTimeout(RuntimeError):
    """A run waited longer than it may for the tree (see TreeLease.acquire's ``max_wait_s``)."""


@dataclass(frozen=True)
class LeaseHolder:
    run_id: str
    mode: str  # "exclusive" | "shared"
    bound: str  # "process" | "run"
    job: str = ""
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    pid_start: str = ""  # the process's start time (Linux: /proc/<pid>/stat), so a reused pid is not taken for it
    since: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.mode not in ("exclusive", "shared") or self.bound not in ("process", "run"):
            raise ValueError(f"lease holder: mode {self.mode!r} / bound {self.bound!r}")

    def conflicts_with(self, other: LeaseHolder) -> bool:
        return other.run_id != self.run_id and "exclusive" in (self.mode, other.mode)

    def describe(self) -> str:
        return f"run {self.run_id}" + (f" ({self.job})" if self.job else "") + f", pid {self.pid} on {self.host}"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, plus the boot id), '' where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError):
        return ""
    return f"{boot}:{ticks}"


def this_process_start() -> str:
    return process_start(os.getpid())


class TreeLease:
    """The lease table of one tree. ``run_active(run_id)`` answers for run-bound holders (the Dagster instance)."""

    def __init__(self, root: Path, run_active: Callable[[str], bool | None]):
        self.root = Path(root)
        self.run_active = run_active

    @contextmanager
    def _guard(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / GUARD_FILE, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # held for a read-modify-write, never while a run works
            yield

    def _read(self) -> list[LeaseHolder]:
        """The holders on file. OSError other than a missing file propagates: a table that could not be read
        this once (EMFILE, EIO) is not an empty one."""
        path = self.root / LEASE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        try:
            return [LeaseHolder(**r) for r in json.loads(text)]
        except (ValueError, TypeError) as exc:
            # Every writer goes through atomic_write_text, so this is damage from outside: the holders it named
            # cannot be known. Refusing every run forever would be worse; say so loudly and start a new table.
            log.error("lease table %s is unreadable (%s): it is replaced; runs it listed are no longer waited for",
                      path, exc)
            return []

    def _write(self, holders: list[LeaseHolder]) -> None:
        atomic_write_text(self.root / LEASE_FILE, json.dumps([asdict(h) for h in holders], indent=1))

    def is_live(self, h: LeaseHolder) -> bool:
        try:
            active = self.run_active(h.run_id)  # True / False (finished) / None (this instance does not know it)
        except Exception as exc:  # noqa: BLE001 -- an instance that cannot answer: keep waiting rather than mix two runs' tables
            log.warning("cannot tell whether run %s is still active (%s): treated as active", h.run_id, exc)
            active = None if h.bound == "process" else True
        if active is False:
            return False
        if h.bound == "process" and h.host == socket.gethostname():
            if not _pid_exists(h.pid):
                return False
            started = process_start(h.pid)
            return not (h.pid_start and started and started != h.pid_start)  # a reused pid is another process
        if active is None:
            return time.time() - h.since < STALE_UNKNOWN_S
        return True

    def try_acquire(self, me: LeaseHolder) -> list[LeaseHolder]:
        """Enter the lease, or return the live holders that keep ``me`` out (then nothing changed)."""
        with self._guard():
            holders = [h for h in self._read() if h.run_id != me.run_id and self.is_live(h)]
            blockers = [h for h in holders if me.conflicts_with(h)]
            if not blockers:
                self._write(holders + [me])
            return blockers

    def acquire(self, me: LeaseHolder, *, poll_s: float = 0.5, say: Callable[[str], None] = log.warning,
                max_wait_s: float | None = None) -> float:
        """Wait until ``me`` holds the lease; returns the seconds waited. Says once whom it waits for, then every
        minute (a holder that never ends is a run Dagster still thinks is running: terminate it in the UI).
        ``max_wait_s``: give up with LeaseWaitTimeout (a step that holds a concurrency-pool slot while it waits
        must not wait for ever: the holder may be waiting for that slot)."""
        t0 = time.monotonic()
        next_say = t0
        while True:
            try:
                blockers = self.try_acquire(me)
            except PermissionError:
                raise
            except OSError as exc:  # the table could not be read this time: wait as if held, try again
                log.warning("lease table of %s unreadable now (%s): retrying", self.root, exc)
                blockers = None
            if blockers == []:
                break
            waited = time.monotonic() - t0
            who = "; ".join(b.describe() for b in blockers or ()) or "(lease table unreadable)"
            if max_wait_s is not None and waited >= max_wait_s:
                raise LeaseWaitTimeout(f"run {me.run_id} gave up after waiting {waited:.0f} s for {self.root}: {who} "
                                       "is materializing into it. Re-run once it has finished")
            if time.monotonic() >= next_say:
                say(f"run {me.run_id} waits for {self.root} ({waited:.0f} s so far): {who} is "
                    "materializing into it, and runs at once would mix their intermediate tables")
                next_say = time.monotonic() + 60.0
            time.sleep(poll_s)
        waited = time.monotonic() - t0
        if waited > poll_s:
            say(f"run {me.run_id} starts after waiting {waited:.0f} s")
        return waited

    def release(self, run_id: str) -> None:
        with self._guard():
            holders = self._read()
            kept = [h for h in holders if h.run_id != run_id]
            if len(kept) != len(holders):
                self._write(kept)

    def holders(self) -> list[LeaseHolder]:
        with self._guard():
            return [h for h in self._read() if self.is_live(h)]
