"""Products added through the API: checked by the pipeline's rules, durable before 201, searchable at once.

An accepted product goes to the inbox (curation_dagster/core/inbox.py: one entry per product, fsynced and renamed
into place before the response) and to the *delta*: an in-memory exact index of the inbox products that the served
version does not contain yet. Search, record lookup and stats merge the delta with the served version. When a new
version is served, the products it contains leave the delta (no double hits); on start-up the inbox is replayed.
The next pipeline run reads the inbox (raw_products, ``source`` = api) and publishes those products like any other.

The inbox on disk is the truth, shared by every process of the service (uvicorn --workers N): the delta is rebuilt
from it whenever it changes (two directory stats a request tell), when the served version changes (a rollback
brings products back into the delta) and, under the inbox lock, before each add decides on ids and duplicates.
A deleted product that a served version already contains is hidden from results until a version without it.
"""
from __future__ import annotations

import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import HTTPException
from PIL import Image

from api.service import Snapshot, redact_paths
from api.settings import ApiSettings
from curation_dagster.core.artifacts import image_file_name
from curation_dagster.core.atomic import staging_dir
from curation_dagster.core.categories import official_codes
from curation_dagster.core.color import to_rgb
from curation_dagster.core.dedup import DedupConfig
from curation_dagster.core.images import decode_fully
from curation_dagster.core.inbox import Inbox, InboxEntry, InboxError
from curation_dagster.core.text import clean_text, clip_text, text_problem

log = logging.getLogger("api")

WRITE_TOKEN_ENV = "CURATION_API_WRITE_TOKEN"
_IMAGE_STATUS = {"image_too_large": 413, "image_unreadable": 415, "image_corrupt": 422}


def require_writer(settings: ApiSettings, token: str | None) -> None:
    """403 while writes are disabled (no token configured), 401 without the right bearer token (compared in
    constant time)."""
    if not settings.write_token:
        raise HTTPException(403, f"adding products is disabled: set {WRITE_TOKEN_ENV} to a secret token and send it "
                                 "as 'Authorization: Bearer <token>'")
    if token is None or not hmac.compare_digest(token.strip().encode(), settings.write_token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


@dataclass
class DeltaItem:
    record: dict[str, Any]
    image_emb: np.ndarray
    text_emb: np.ndarray
    entry: str  # the inbox entry's directory name (entries are never rewritten: same name, same product)
    model: str  # the model identity that made the vectors
    image: Path  # the entry's own image file (served by /images; never copied into the pipeline's images/)


@dataclass
class NewProduct:
    image: bytes
    designation: str
    description: str | None = None
    prdtypecode: int | None = None
    productid: int | None = None
    imageid: int | None = None


class InboxDelta:
    """The inbox products not yet in the served version, searchable exactly (they are few: a day's additions)."""

    def __init__(self, settings: ApiSettings):
        self.settings = settings
        self.inbox = Inbox(settings.artifacts_dir)
        self._images: dict[str, Path] = {}  # image file name -> the inbox entry's image, for the delta's products
        self._items: dict[int, DeltaItem] = {}
        self._hidden: frozenset[int] = frozenset()  # deleted, but in the served version until the next one
        self._hidden_images: frozenset[str] = frozenset()  # and their image files
        self._version: str | None = None
        self._state: tuple[int, int] | None = None  # the inbox's state when the delta was last rebuilt
        self._listing: tuple[frozenset[str], frozenset[str]] | None = None  # its names then
        self._read_error: str | None = None  # why the inbox could not be read, logged once
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------ state
    def synced(self, snap: Snapshot) -> bool:
        """Whether ``sync`` has nothing to do (an async caller runs it in a thread otherwise: a rebuild may embed).

        Two directory stats; while the folders changed too recently to trust their mtimes (2 s after a write), their
        listings are compared instead, so a product another worker added is seen by the next request here, and
        a request pays a rebuild only when something did change."""
        if snap.corpus.name != self._version:
            return False
        state = self.inbox.state()
        if state is None:
            try:
                return self.inbox.listing() == self._listing
            except OSError:
                return False
        return state == self._state

    def sync(self, snap: Snapshot) -> None:
        """Rebuild the delta if the inbox or the served version changed since the last time. An inbox that cannot
        be read leaves the delta as it was (logged once): search must not fail because of it."""
        if self.synced(snap):
            return
        with self._lock:
            if self.synced(snap):  # rebuilt by the request this one waited for
                return
            try:
                if -1 in (self.inbox.state() or ()):
                    raise OSError(f"{self.inbox.root} is not a readable folder")
                self._rebuild(snap)
                self._read_error = None
            except OSError as exc:
                if self._read_error != str(exc):
                    log.error("inbox not readable, the delta index keeps its %d products: %s", len(self._items), exc)
                    self._read_error = str(exc)
                self._version, self._state, self._listing = snap.corpus.name, self.inbox.state(), None

    def _rebuild(self, snap: Snapshot) -> None:
        """The delta = the live inbox entries the served version does not contain (call holding self._lock)."""
        state, listing = self.inbox.state(), self.inbox.listing()  # before reading: a change made meanwhile is seen
        model = getattr(snap.encoder, "model_identity", "")
        items: dict[int, DeltaItem] = {}
        for entry in self.inbox.entries():
            rid = entry.record_id
            if snap.corpus.row_of(rid) is not None:
                continue
            old = self._items.get(rid)
            if old is not None and old.entry == entry.path.name and old.model == model:
                items[rid] = old
                continue
            try:
                items[rid] = self._item_from_entry(entry, snap.encoder)
            except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the service
                log.error("inbox entry %s not loaded: %s", entry.path.name, exc)
        if len(items) != len(self._items) or self._version != snap.corpus.name:
            log.info("delta index: %d inbox products not in version %s", len(items), snap.corpus.name)
        self._items = items
        self._images = {it.record["image_file"]: it.image for it in items.values()}
        rows = {r: snap.corpus.row_of(r) for r in self.inbox.tombstoned()}
        self._hidden = frozenset(r for r, row in rows.items() if row is not None)
        self._hidden_images = frozenset(rec["image_file"] for rec in snap.corpus.hit_fields(
            [row for row in rows.values() if row is not None]))
        self._version, self._state, self._listing = snap.corpus.name, state, listing

    def _item_from_entry(self, entry: InboxEntry, encoder) -> DeltaItem:
        model = getattr(encoder, "model_identity", "")
        stored = entry.embeddings(model)
        if stored is None:  # another model served now: embed again with this one
            with Image.open(entry.image_path) as im:
                img = encoder.encode_pil([to_rgb(im)])[0]
            txt = encoder.encode_texts([entry.record["clip_text"]])[0]
        else:
            img, txt = stored
        return DeltaItem(self._public(entry.record), img, txt, entry.path.name, model, entry.image_path)

    @staticmethod
    def _public(record: dict[str, Any]) -> dict[str, Any]:
        keys = ("record_id", "productid", "imageid", "designation", "description", "prdtypecode", "category",
                "image_file", "alignment_score", "dup_group", "source", "added_at", "decisions")
        return {k: record.get(k) for k in keys}

    def count(self) -> int:
        return len(self._items)

    def hidden(self) -> frozenset[int]:
        """Record ids of the served version that were deleted since (results leave them out)."""
        return self._hidden

    def hidden_images(self) -> frozenset[str]:
        """Their image files (/images does not serve them either)."""
        return self._hidden_images

    def labels(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for it in list(self._items.values()):
            code = it.record["prdtypecode"]
            key = "unlabelled" if code is None else str(code)
            out[key] = out.get(key, 0) + 1
        return out

    def image_path(self, file_name: str) -> Path | None:
        """The image of a product in the delta, from its inbox entry. Why not a copy under images/: that folder is
        the pipeline's (a copy overwrote a dataset photo of the same name), and a failed copy made the API answer
        507 for a product it had stored."""
        return self._images.get(file_name)

    def get(self, record_id: int) -> dict[str, Any] | None:
        it = self._items.get(int(record_id))
        return dict(it.record) if it else None

    def search(self, query: np.ndarray, k: int, category: int | str | None) -> list[tuple[float, dict[str, Any]]]:
        items = list(self._items.values())
        if category is not None:
            want = None if category == "unlabelled" else int(category)
            items = [it for it in items if it.record["prdtypecode"] == want]
        if not items:
            return []
        scores = np.stack([it.image_emb for it in items]) @ np.asarray(query, np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(float(scores[i]), dict(items[i].record)) for i in order]

    # ------------------------------------------------------------------------------------------ writes
    def add(self, snap: Snapshot, product: NewProduct, *, allow_duplicate: bool, allow_misaligned: bool,
            decode: Callable[[bytes], Image.Image], gate: threading.Semaphore | None) -> dict[str, Any]:
        """Check ``product`` like the pipeline would and store it; returns the 201 body or raises HTTPException."""
        corpus = snap.corpus
        code = product.prdtypecode
        known = official_codes() | {int(c) for c in corpus.index.by_category if int(c) > 0}
        if code is not None and code not in known:
            raise HTTPException(422, f"prdtypecode {code} is not a known product type code (see /stats categories)")
        designation, description = clean_text(product.designation), clean_text(product.description)
        problem = text_problem(designation)
        if problem:
            raise HTTPException(422, f"designation is unusable after cleaning ({problem}): HTML, control characters "
                                     "and whitespace are removed, and at least one word must remain")
        query_image = decode(product.image)  # format allowlist, pixel cap, bounded memory (as /search/image)
        try:
            return self._check_and_store(snap, product, code, designation, description, query_image,
                                         allow_duplicate=allow_duplicate, allow_misaligned=allow_misaligned, gate=gate)
        except OSError as exc:  # the inbox's disk: full, read-only, a file where its folder should be
            log.error("inbox write failed: %s", exc)
            raise HTTPException(507, f"the product could not be stored durably: {exc.strerror or type(exc).__name__}")

    def _check_and_store(self, snap: Snapshot, product: NewProduct, code: int | None, designation: str,
                         description: str | None, query_image: Image.Image, *, allow_duplicate: bool,
                         allow_misaligned: bool, gate: threading.Semaphore | None) -> dict[str, Any]:
        corpus, encoder = snap.corpus, snap.encoder
        with staging_dir(self.inbox.root, prefix="upload") as tmp:
            path = tmp / "image.jpg"
            path.write_bytes(product.image)
            if gate is not None:
                gate.acquire()
            try:
                # The pipeline's own full decode: truncated files fail, non-RGB images are rewritten as RGB JPEG.
                checked = decode_fully(path, max_pixels=self.settings.max_upload_pixels)
            finally:
                if gate is not None:
                    gate.release()
            if not checked.ok:
                raise HTTPException(_IMAGE_STATUS.get(checked.reason, 422), f"{checked.reason}: the image did not "
                                    f"decode completely ({redact_paths(checked.detail or '', self.settings.artifacts_dir)})")
            stored_image = path.read_bytes()
        include_description = bool(corpus.version.manifest.get("text_fields", "").endswith("description"))
        text = clip_text(designation, description, include_description)
        img = encoder.encode_pil([query_image])[0]
        txt = encoder.encode_texts([text])[0]
        served = self._served_candidates(corpus, img, txt)  # the expensive part, outside the lock
        with self.inbox.reserve(), self._lock:
            # Under the inbox lock, from the inbox on disk: what this or another process added or deleted meanwhile
            # counts for the duplicate check and the ids (two identical uploads at once: one 201, one 409).
            self._rebuild(snap)
            decisions = {"duplicate": self._duplicate_decision(corpus, served + self._delta_candidates(img, txt)),
                         "alignment": self._alignment_decision(corpus, code, float(img @ txt))}
            dup, align = decisions["duplicate"], decisions["alignment"]
            if dup["is_duplicate"] and not allow_duplicate:
                raise HTTPException(409, {"message": "a near-duplicate of this product is already searchable "
                                                     "(add ?allow_duplicate=true to add it anyway)", **dup})
            if align["below_threshold"] and not allow_misaligned:
                raise HTTPException(422, {"message": "image and text do not match well enough for this class (add "
                                                     "?allow_misaligned=true to add it anyway)", **align})
            if product.productid is not None:
                rid = int(product.productid)
                if corpus.row_of(rid) is not None or rid in {e.record_id for e in self.inbox.entries()}:
                    raise HTTPException(409, {"message": f"a product with productid {rid} already exists",
                                              "duplicate_of": rid, "similarity": None, "evidence": "productid"})
                if rid in self.inbox.tombstoned():  # a tombstone is final: a new entry under it would be dropped
                    raise HTTPException(409, {"message": f"productid {rid} was deleted; a deleted id is not reused",
                                              "duplicate_of": rid, "similarity": None, "evidence": "productid"})
            else:
                rid = self.inbox.allocate_id(set(self._items))
            imageid = int(product.imageid) if product.imageid is not None else rid
            record = {
                "record_id": rid, "productid": rid, "imageid": imageid, "designation": designation,
                "description": description or None, "prdtypecode": code, "category": corpus.stats["categories"].get(
                    str(code)) if code is not None else None, "image_file": image_file_name(imageid, rid),
                "alignment_score": float(img @ txt), "dup_group": rid, "source": "api", "clip_text": text,
                "model_identity": getattr(encoder, "model_identity", ""), "decisions": decisions,
                "designation_raw": product.designation,
            }
            try:
                entry = self.inbox.add(record, stored_image, image_emb=img, text_emb=txt)
            except InboxError as exc:
                raise HTTPException(507, str(exc)) from None
            self._items[rid] = DeltaItem(self._public(entry.record), img, txt, entry.path.name,
                                         getattr(encoder, "model_identity", ""), entry.image_path)
            self._images = {**self._images, entry.record["image_file"]: entry.image_path}
        return {**self._public(entry.record)}

    def delete(self, snap: Snapshot, record_id: int) -> bool:
        try:
            with self.inbox.reserve(), self._lock:
                if not self.inbox.delete(record_id):
                    return False
                self._rebuild(snap)  # out of the delta; hidden if the served version has it
                return True
        except OSError as exc:
            log.error("inbox write failed: %s", exc)
            raise HTTPException(507, f"the deletion could not be stored durably: {exc.strerror or type(exc).__name__}")

    # ------------------------------------------------------------------------------------------ the rules
    @staticmethod
    def _served_candidates(corpus, img: np.ndarray, txt: np.ndarray) -> list[tuple[float, int, str]]:
        """The served version's nearest image and nearest text (similarity, record id, evidence)."""
        candidates: list[tuple[float, int, str]] = []
        if corpus.count:
            top = corpus.index.search(img, 1)
            if top:
                candidates.append((top[0][1], int(corpus.version.records["record_id"][top[0][0]]), "image"))
            sims = corpus.version.text_emb @ txt
            j = int(np.argmax(sims))
            candidates.append((float(sims[j]), int(corpus.version.records["record_id"][j]), "text"))
        return candidates

    def _delta_candidates(self, img: np.ndarray, txt: np.ndarray) -> list[tuple[float, int, str]]:
        out: list[tuple[float, int, str]] = []
        for it in list(self._items.values()):
            out.append((float(it.image_emb @ img), it.record["record_id"], "image"))
            out.append((float(it.text_emb @ txt), it.record["record_id"], "text"))
        return out

    @staticmethod
    def _duplicate_decision(corpus, candidates: list[tuple[float, int, str]]) -> dict[str, Any]:
        d = (corpus.version.manifest.get("thresholds") or {}).get("dedup") or {}
        defaults = DedupConfig()
        img_thr = d.get("image_threshold", defaults.image_threshold)
        txt_thr = d.get("text_threshold", defaults.text_threshold)
        best = {"is_duplicate": False, "duplicate_of": None, "similarity": None, "evidence": None,
                "image_threshold": img_thr, "text_threshold": txt_thr}
        for sim, rid, kind in sorted(candidates, reverse=True):
            thr = img_thr if kind == "image" else txt_thr
            if thr is not None and sim >= thr:
                return {**best, "is_duplicate": True, "duplicate_of": rid, "similarity": round(sim, 6), "evidence": kind}
        if candidates:
            sim, rid, kind = max(candidates)
            best.update(nearest=rid, nearest_similarity=round(sim, 6))
        return best

    @staticmethod
    def _alignment_decision(corpus, code: int | None, score: float) -> dict[str, Any]:
        used = ((corpus.version.manifest.get("thresholds") or {}).get("alignment") or {}).get("used") or {}
        key = str(code) if code is not None and str(code) in used else ("unlabelled" if "unlabelled" in used else
                                                                         "global" if "global" in used else None)
        thr = used.get(key) if key else None
        return {"alignment_score": round(score, 6), "threshold": thr, "threshold_of": key,
                "below_threshold": thr is not None and score < thr}


__all__ = ["InboxDelta", "NewProduct", "require_writer", "WRITE_TOKEN_ENV"]
