"""The inbox: products added through the API, durable before they are acknowledged, folded into the next run.

Layout (under ``$CURATION_ARTIFACTS_DIR/inbox/``)::

    entries/<added_at>_<record_id>_<nonce>/   one product: record.json + image.jpg (+ embeddings.npz), never rewritten
    tombstones/<record_id>.json               a deletion; the next run and the API honour it
    .lock                                     serialises id allocation across processes (uvicorn --workers N)

Why this shape: an entry is written whole in a hidden temp directory, fsynced, and renamed into ``entries/`` in one
step, so after a crash an entry is either complete or absent (a half-written temp dir is ignored and cleaned up).
Entries are append-only; a deletion is a tombstone, never an edit. Readers (the API's delta index, ``raw_products``)
list ``entries/`` and drop tombstoned ids; a later entry for the same record id supersedes an earlier one.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .atomic import DIR_MODE, atomic_write_text, fsync_dir, seal_dir, staging_dir, world_readable

INBOX_DIRNAME = "inbox"
ENTRIES, TOMBSTONES = "entries", "tombstones"
RECORD_FILE, IMAGE_FILE, EMBEDDINGS_FILE = "record.json", "image.jpg", "embeddings.npz"
# Ids allocated to API products that bring none: far above the catalogue's productids (< 10^10), below 2^63.
ALLOCATED_ID_BASE = 10**15
_ENTRY_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z_[0-9]+_[0-9a-f]{8}$")
MAX_RECORD_ID = 2**63 - 1  # record ids are int64 in every table
# A directory changed this recently may change again within the same file-system clock tick (its mtime would not
# move): until it is older, ``state`` reports "unsettled" and readers rescan.
_SETTLE_NS = 2_000_000_000

log = logging.getLogger(__name__)


class InboxError(RuntimeError):
    """The inbox cannot take or give an entry (disk full, permissions, a corrupt entry)."""


@dataclass(frozen=True)
class InboxEntry:
    path: Path
    record: dict[str, Any]

    @property
    def record_id(self) -> int:
        return int(self.record["record_id"])

    @property
    def image_path(self) -> Path:
        return self.path / IMAGE_FILE

    def embeddings(self, model_identity: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The image and text vectors stored with the entry, if they were made by this model."""
        f = self.path / EMBEDDINGS_FILE
        if not f.is_file() or self.record.get("model_identity") != model_identity:
            return None
        with np.load(f, allow_pickle=False) as z:
            return z["image"].astype(np.float32), z["text"].astype(np.float32)


def inbox_dir(artifacts_dir: Path | str) -> Path:
    return Path(artifacts_dir) / INBOX_DIRNAME


def _valid_record(record: Any) -> bool:
    rid = record.get("record_id") if isinstance(record, dict) else None
    return isinstance(rid, int) and not isinstance(rid, bool) and 1 <= rid <= MAX_RECORD_ID


class Inbox:
    def __init__(self, artifacts_dir: Path | str):
        self.root = inbox_dir(artifacts_dir)
        # Entries are never rewritten, so a parsed one is good for ever (None: not a usable entry, logged once).
        self._parsed: dict[str, InboxEntry | None] = {}

    # ------------------------------------------------------------------------------------------------ writing
    def _ensure_dirs(self) -> None:
        """The folders exist and are readable by everyone before anything is written in them: the pipeline that
        reads the inbox may run as another user than the API that writes it, whatever the API's umask (under 077
        they were 0700 and the pipeline's read failed)."""
        for d in (self.root, self.root / ENTRIES, self.root / TOMBSTONES):
            d.mkdir(parents=True, exist_ok=True)
            world_readable(d, DIR_MODE)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_dirs()
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def allocate_id(self, taken: set[int] | frozenset[int] = frozenset()) -> int:
        """A record id no entry (live or deleted) and no id in ``taken`` uses; call under :meth:`reserve`."""
        used = {e.record_id for e in self._all_entries()} | set(self._tombstoned()) | set(taken)
        candidates = [i for i in used if i >= ALLOCATED_ID_BASE]
        rid = (max(candidates) + 1) if candidates else ALLOCATED_ID_BASE + 1
        if rid > MAX_RECORD_ID:
            raise InboxError("no record id is left to allocate")
        return rid

    @contextmanager
    def reserve(self) -> Iterator["Inbox"]:
        """Hold the inbox lock: allocate an id and write its entry without another writer doing the same."""
        with self._locked():
            yield self

    def add(self, record: dict[str, Any], image_bytes: bytes, *, image_emb: np.ndarray | None = None,
            text_emb: np.ndarray | None = None) -> InboxEntry:
        """Write one entry durably (returns only once it is on disk, complete, under ``entries/``)."""
        if "record_id" not in record:
            raise InboxError("an inbox record needs a record_id")
        record = dict(record)
        stamp = datetime.now(timezone.utc)
        record.setdefault("added_at", stamp.isoformat())
        name = f"{stamp.strftime('%Y%m%dT%H%M%S.%fZ')}_{int(record['record_id'])}_{uuid.uuid4().hex[:8]}"
        entries = self.root / ENTRIES
        try:
            self._ensure_dirs()
            with staging_dir(entries, prefix=name) as tmp:
                (tmp / IMAGE_FILE).write_bytes(image_bytes)
                if image_emb is not None and text_emb is not None:
                    with open(tmp / EMBEDDINGS_FILE, "wb") as fh:
                        np.savez(fh, image=np.asarray(image_emb, np.float32), text=np.asarray(text_emb, np.float32))
                (tmp / RECORD_FILE).write_text(json.dumps(record, ensure_ascii=False, sort_keys=True), "utf-8")
                seal_dir(tmp)
                os.rename(tmp, entries / name)
            fsync_dir(entries)
        except OSError as exc:
            raise InboxError(f"the product could not be stored durably: {exc.strerror or exc}") from None
        return InboxEntry(entries / name, record)

    def delete(self, record_id: int) -> bool:
        """Tombstone a record id; False when no live entry has it."""
        live = {e.record_id for e in self.entries()}
        if int(record_id) not in live:
            return False
        self._ensure_dirs()
        atomic_write_text(self.root / TOMBSTONES / f"{int(record_id)}.json",
                          json.dumps({"record_id": int(record_id), "deleted_at": datetime.now(timezone.utc).isoformat()}))
        return True

    # ------------------------------------------------------------------------------------------------ reading
    def _tombstoned(self) -> list[int]:
        d = self.root / TOMBSTONES
        if not d.is_dir():
            return []
        return [int(p.stem) for p in d.glob("*.json") if p.stem.isdigit()]

    def _all_entries(self) -> list[InboxEntry]:
        d = self.root / ENTRIES
        if not d.is_dir():
            return []
        out = []
        for p in sorted(d.iterdir()):
            if not _ENTRY_RE.match(p.name):
                continue  # temp dirs of writers in progress or killed mid-write
            if p.name in self._parsed:
                entry = self._parsed[p.name]
            else:
                try:
                    entry = self._parsed[p.name] = self._parse(p)
                except OSError:  # unreadable now (permissions, too many open files): try again next time
                    continue
            if entry is not None:
                out.append(entry)
        return out

    @staticmethod
    def _parse(p: Path) -> InboxEntry | None:
        if not p.is_dir():
            return None
        try:
            record = json.loads((p / RECORD_FILE).read_text("utf-8"))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None  # not an entry this code wrote; never half of one (entries appear by rename)
        if not _valid_record(record):  # hand-made or from a foreign writer: one bad entry must not stop readers
            log.warning("inbox entry %s skipped: its record has no record_id in 1..2^63-1", p.name)
            return None
        return InboxEntry(p, record)

    def entries(self) -> list[InboxEntry]:
        """Live entries, oldest first; the latest entry of a record id supersedes earlier ones."""
        dead = set(self._tombstoned())
        latest: dict[int, InboxEntry] = {}
        for e in self._all_entries():
            if e.record_id not in dead:
                latest[e.record_id] = e
        return sorted(latest.values(), key=lambda e: e.path.name)

    def tombstoned(self) -> set[int]:
        return set(self._tombstoned())

    def state(self) -> tuple[int, int] | None:
        """Changes whenever an entry or a tombstone appears (a stat of two directories: cheap enough for every
        request); None while either changed too recently for its mtime to be trusted (see _SETTLE_NS). A folder
        that is missing or cannot be read counts as a fixed state (readers then report what they cannot read);
        an mtime ahead of this clock (shared storage, clock skew) counts as settled."""
        out = []
        for d in (ENTRIES, TOMBSTONES):
            try:
                out.append((self.root / d).stat().st_mtime_ns)
            except FileNotFoundError:
                out.append(0)
            except OSError:
                out.append(-1)
        return None if 0 <= time.time_ns() - max(out) < _SETTLE_NS else (out[0], out[1])

    def listing(self) -> tuple[frozenset[str], frozenset[str]]:
        """The names in entries/ and tombstones/: what ``state`` cannot tell apart while it is unsettled (a listing
        of a few thousand names costs well under a millisecond; a rebuild costs tens). Raises OSError for a folder
        that cannot be read."""
        out = []
        for d in (ENTRIES, TOMBSTONES):
            try:
                out.append(frozenset(os.listdir(self.root / d)))
            except FileNotFoundError:
                out.append(frozenset())
        return out[0], out[1]

    def fingerprint(self) -> str:
        """Changes whenever an entry or a tombstone appears (for the source sensor)."""
        import hashlib

        names = [f"{d}/{p.name}" for d in (ENTRIES, TOMBSTONES) if (self.root / d).is_dir()
                 for p in sorted((self.root / d).iterdir()) if not p.name.startswith(".")]
        return f"{len(names)}:{hashlib.sha256(chr(10).join(names).encode()).hexdigest()[:16]}"

    def clean_stale_temp(self, older_than_s: float = 3600) -> int:
        """Remove temp dirs of writers killed mid-write (a live writer's is younger than this)."""
        import shutil

        n = 0
        d = self.root / ENTRIES
        for p in d.glob(".tmp-*") if d.is_dir() else ():
            try:
                if time.time() - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
                    n += 1
            except OSError:
                pass
        return n
