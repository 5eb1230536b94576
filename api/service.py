"""The serving state: which curated version and encoder answer queries, and how a new version is swapped in.

A request takes one snapshot (corpus + encoder) and uses it to the end, so a swap never changes data under
a request in flight; the old corpus is freed when its last request finishes. A background watcher polls
``curated/CURRENT``; a new version is loaded completely, checked with a canary query and only then swapped
in under a lock. A broken version is reported (``/readyz``, ``/stats``) and the old one keeps serving.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import queue
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from api.index import Corpus
from api.onnx_text import choose_text_backend
from api.settings import ApiSettings
from curation_dagster.core.artifacts import (
    CURRENT_FILENAME,
    IMAGES_DIRNAME,
    ArtifactError,
    NoArtifactError,
    curated_dir,
    images_dir,
    is_valid_version_name,
    load_version,
    read_current_version_name,
    verify_probe,
)

log = logging.getLogger("api")

_ABS_PATH = re.compile(r"(?<![\w.~/>-])/(?:[^\s'\"()\[\],;:/]+/)+")  # (a URL's "//host/" is not matched)


_TRANSIENT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY,
                     errno.ETIMEDOUT, errno.ESTALE, errno.ENOBUFS}


def _is_transient(exc: BaseException) -> bool:
    """A failure of the machine, not of the version (out of file handles, an I/O hiccup, a stale NFS handle):
    worth loading again on the next poll, where a bad version is only retried when its files change. Not a
    MemoryError: numpy raises one for a corrupt .npy header (an absurd shape), and a version too big for this
    machine would be loaded again every poll."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def redact_paths(text: str, artifacts_dir: Path | str) -> str:
    """A failure reason as clients see it: the artifacts tree is ``<artifacts>``, other absolute paths keep only
    their last part (the log has them whole). Paths tell an attacker the deployment's layout and user names."""
    for root in sorted({str(artifacts_dir).rstrip("/"), str(Path(artifacts_dir).resolve())}, key=len, reverse=True):
        if len(root) > 1:  # the whole root only: /srv/artifacts2 is not <artifacts>2
            text = re.sub(re.escape(root) + r"(?=/|$|[\s'\"(),;:\]])", "<artifacts>", text)
    return _ABS_PATH.sub(".../", text)

CANARY_QUERY = "lampe torche étanche camping"


class Encoder(Protocol):  # the part of curation_dagster.core.encoder.ClipEncoder the API uses
    model_name: str
    meaningless: bool
    dim: int
    device: str

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_pil(self, images: Sequence[Any]) -> np.ndarray: ...


EncoderLoader = Callable[[str, str], Encoder]


class ModelMismatchError(RuntimeError):
    """The artifact was embedded with a different model than the one configured or already served."""


class NotReadyError(RuntimeError):
    """No corpus is being served yet (503)."""


class BusyError(RuntimeError):
    """The query encoder is overloaded: too many queries waiting, or one waited past its deadline (503, retry)."""


class CurrentUnreadableError(RuntimeError):
    """curated/CURRENT exists but cannot be read (a directory, not UTF-8, a symlink loop, no permission...)."""


def default_encoder_loader(model: str, device: str, precision: str | None = None) -> Encoder:
    from curation_dagster.core.encoder import ClipEncoder  # heavy import (torch, transformers): only when needed

    return ClipEncoder.load(model, device, precision=precision)


def _model_load_errors() -> tuple[type[BaseException], ...]:
    try:
        from curation_dagster.core.encoder import ModelLoadError
    except ImportError:
        return ()
    return (ModelLoadError,)


def same_model(a: str, b: str) -> bool:
    """Model names match; two spellings of the same local directory match too."""
    if a.strip() == b.strip():
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


class TextBatcher:
    """Encodes concurrent text queries together on a fixed number of worker threads.

    On CPU a batch of short queries costs less per query than single forwards (full-size ViT-B/32 text tower,
    static int8 ORT, 2 cores: 6.3 ms alone, 5.2 ms/query in pairs, ~4.6 from 3 up), and a fixed number of
    forwards at a time (workers x threads <= cores) keeps the cores from being oversubscribed, which with
    OpenMP's spin-waiting costs 10x on a busy 2-core machine. No waiting window: a query arriving while the
    workers are busy joins the next batch, so an idle service adds no latency. (Taking only a share of the
    queue per worker, to spread a burst, was measured: ~0.6 ms more CPU per request, the tail no better.)
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_batch: int = 32, workers: int = 1,
                 max_pending: int = 0, timeout: float = 60.0):
        self._encode = encode
        self._timeout = timeout  # how long a caller waits for its vector by default
        self._counts = {"encoded": 0, "shed": 0, "timed_out": 0}  # for /stats (query_queue)
        self._counts_lock = threading.Lock()
        self._max_batch = max(1, max_batch)
        # Load shedding: past this many queued queries a new one is refused at once (BusyError) instead of
        # joining a queue it would wait seconds in; 0 = unbounded. Approximate by design (qsize, no lock): batches
        # being encoded are not counted, withdrawn queries are until a worker skips them.
        self._max_pending = max(0, int(max_pending))
        self._closed = False
        self._queue: queue.SimpleQueue[tuple[str, Future] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"text-encoder-{i}", daemon=True) for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    def submit(self, text: str) -> Future:
        if self._max_pending and not self._closed and self._queue.qsize() >= self._max_pending:
            self._count("shed")
            raise BusyError(f"{self._max_pending} queries are already waiting for the text encoder; retry shortly")
        fut: Future = Future()
        self._queue.put((text, fut))
        if self._closed:  # closed meanwhile (a request racing shutdown): no worker will take it
            self._drain()
        return fut

    def encode(self, text: str, timeout: float | None = None) -> np.ndarray:
        """The query's vector; waits at most ``timeout`` seconds (None: the batcher's default), then BusyError."""
        timeout = self._timeout if timeout is None else timeout
        fut = self.submit(text)
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            return self._late(fut, timeout)

    async def encode_async(self, text: str, timeout: float | None = None) -> np.ndarray:
        timeout = self._timeout if timeout is None else timeout
        if self._closed:  # answered on the submitting thread (see close): never a forward on the event loop
            return await asyncio.to_thread(self.encode, text, timeout)
        fut = self.submit(text)
        try:
            # On a timeout (or a cancelled request) wrap_future cancels fut, which withdraws it only while queued.
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            return self._late(fut, timeout)

    def _count(self, what: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[what] += n

    def stats(self) -> dict[str, Any]:
        """What /stats reports as ``query_queue``."""
        with self._counts_lock:
            counts = dict(self._counts)
        return {"pending": self._queue.qsize(), "max_pending": self._max_pending, "timeout_s": self._timeout, **counts}

    def _late(self, fut: Future, timeout: float) -> np.ndarray:
        """After the wait timed out: the vector if the batch finished meanwhile (or the encode's own error, a
        TimeoutError included), else the query is withdrawn (its batch skips it) and the caller gets BusyError."""
        if fut.cancel() or not fut.done():  # cancel() succeeds only while still queued; running: not waited for
            self._count("timed_out")
            raise BusyError(f"the query was not encoded within {timeout:g} s (server overloaded); retry shortly")
        return fut.result()

    def close(self) -> None:
        """Stop the workers; queries still queued (or submitted from now on) are answered on the caller's thread.

        Closed at shutdown, or when a new encoder replaces it before anything is served (a served snapshot
        never changes model: see _encoder_for). A request that raced the close gets this model's answer, not a
        wait until the deadline for a worker that is gone."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)  # one stop signal per worker
        for t in self._threads:
            t.join(timeout=10)
        self._drain()

    def _drain(self) -> None:
        items, stops = [], 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stops += 1
            else:
                items.append(item)
        for _ in range(stops):
            self._queue.put(None)  # a worker that has not reached its stop signal yet still needs it
        for i in range(0, len(items), self._max_batch):
            self._answer(items[i:i + self._max_batch])

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._answer(batch)

    def _answer(self, batch: list[tuple[str, Future]]) -> None:
        # A caller that gave up (an async request whose wait timed out or was cancelled by the server) cancelled
        # its future while it was queued: skip it. The others are marked running: they can no longer be cancelled,
        # so setting their results below cannot fail.
        batch = [(t, fut) for t, fut in batch if fut.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            vecs = self._encode([t for t, _ in batch])
            for (_, fut), vec in zip(batch, vecs):
                fut.set_result(vec)
            self._count("encoded", len(batch))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)


def normalize_query(text: str) -> str:
    """NFC, whitespace runs collapsed, stripped: what is encoded, and the query cache's key."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class QueryCache:
    """Bounded LRU of query embeddings keyed by (served version, normalised text); thread-safe.

    The version is part of the key, so a new version never hits the old version's entries (they age out).
    Vectors are stored read-only and returned as they are (identical arrays for identical keys)."""

    def __init__(self, max_entries: int):
        self.max_entries = max(0, int(max_entries))
        self._data: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, version: str, text: str) -> np.ndarray | None:
        key = (version, text)
        with self._lock:
            vec = self._data.get(key)
            if vec is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return vec

    def put(self, version: str, text: str, vec: np.ndarray) -> np.ndarray:
        vec = np.array(vec, dtype=np.float32, copy=True)
        vec.setflags(write=False)
        with self._lock:
            self._data[(version, text)] = vec
            self._data.move_to_end((version, text))
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return vec


@dataclass(frozen=True)
class Snapshot:
    corpus: Corpus
    encoder: Encoder
    batcher: TextBatcher
    cache: QueryCache | None = None  # None or size 0: every query is encoded

    def _cached(self, text: str) -> tuple[str, np.ndarray | None]:
        """The normalised text and its cached vector (None: encode it, then ``_remember``)."""
        text = normalize_query(text)
        cache = self.cache
        if cache is None or cache.max_entries == 0:
            return text, None
        return text, cache.get(self.corpus.name, text)

    def _remember(self, text: str, vec: np.ndarray) -> np.ndarray:
        cache = self.cache
        return vec if cache is None or cache.max_entries == 0 else cache.put(self.corpus.name, text, vec)

    def encode_text(self, text: str) -> np.ndarray:
        text, vec = self._cached(text)
        return vec if vec is not None else self._remember(text, self.batcher.encode(text))

    async def encode_text_async(self, text: str) -> np.ndarray:
        text, vec = self._cached(text)
        return vec if vec is not None else self._remember(text, await self.batcher.encode_async(text))

    def encode_image(self, image: Any) -> np.ndarray:
        return self.encoder.encode_pil([image])[0]

    @property
    def image_size(self) -> int:
        """Side of the square the image tower sees (images are shrunk towards it before preprocessing)."""
        return int(getattr(self.encoder, "image_size", 224) or 224)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class SearchService:
    def __init__(self, settings: ApiSettings, encoder_loader: EncoderLoader | None = None):
        self.settings = settings
        self._load_encoder = encoder_loader or functools.partial(default_encoder_loader, precision=settings.precision)
        self._snapshot: Snapshot | None = None
        self._encoder: Encoder | None = None
        self._batcher: TextBatcher | None = None
        self._text_encode: Callable[[list[str]], np.ndarray] | None = None  # the served query path (ORT or torch)
        self._query_cache = QueryCache(settings.query_cache_size)
        self._lock = threading.Lock()  # guards the fields below and the swap
        self._load_lock = threading.Lock()  # one load at a time (watcher and explicit calls)
        self.text_precision: str | None = None
        self._error: dict[str, Any] | None = None  # last failed load: {"version", "error", "at"}
        self._failed_version: tuple[str, tuple] | None = None  # (name, files' sizes and mtimes) of a bad version
        self._last_check: str | None = None
        self._previous_images: frozenset[str] = frozenset()  # image files of the version served before this one
        self._previous_dir: Path | None = None  # and its directory
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load CURRENT (if any) and start the watcher.

        Raises ModelMismatchError when CURATION_CLIP_MODEL names another model than the artifact's, and the
        encoder's load error when the model cannot be loaded: a misconfigured service refuses to start.
        A missing or broken artifact does not stop it: it answers 503 and picks up the next good version.
        """
        self._bound_threads()
        self.check_for_update(initial=True)
        if self._encoder is None and self.settings.clip_model:
            # No usable artifact yet: still load the configured model now, so that a wrong model fails at startup.
            self._set_encoder(self._load_encoder(self.settings.clip_model, self.settings.device))
        if self.settings.reload_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="curated-watcher", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        if self._batcher is not None:
            self._batcher.close()

    def _bound_threads(self) -> None:
        """torch's intra-op thread count is process-wide (faiss's is per thread: see api.index)."""
        try:
            import torch
        except ImportError:  # encoder stubs in tests
            return
        torch.set_num_threads(self.settings.torch_threads)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.reload_interval_s):
            try:
                self.check_for_update()
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("curated-artifact watcher: unexpected error")

    # ------------------------------------------------------------------ state

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None:
            raise NotReadyError(self.not_ready_reason())
        return snap

    def not_ready_reason(self) -> str:
        """Why nothing is served (a 503's detail): said to any client, so without file-system paths."""
        with self._lock:
            error = self._public_error()
        if error is not None:
            if error["version"] is None:
                return f"no curated version could be loaded: {error['error']}"
            return f"curated version {error['version']} could not be loaded: {error['error']}"
        return redact_paths(str(NoArtifactError(self.settings.artifacts_dir)), self.settings.artifacts_dir)

    def _public_error(self) -> dict[str, Any] | None:
        if self._error is None:
            return None
        return {**self._error, "error": redact_paths(self._error["error"], self.settings.artifacts_dir)}

    def image_dirs(self, file_name: str) -> list[Path]:
        """Where /images may look for ``file_name``, in order; empty when it may not be served.

        Allowed: the images of the served version's records, of the version served before it (a client that got a
        hit just before a swap can still fetch it), and of the served version's removed rows (removals.parquet:
        the curation browser); nothing else under images/. A version's own pinned copy comes first (a later run may
        have replaced images/<name> with another photo; the embeddings were made from the pinned one), then the
        shared images/ (versions written before pinning)."""
        snap = self.snapshot()
        dirs = []
        if file_name in snap.corpus.image_files or file_name in snap.corpus.removal_images:
            dirs.append(snap.corpus.version.path / IMAGES_DIRNAME)
        if file_name in self._previous_images and self._previous_dir is not None:
            dirs.append(self._previous_dir / IMAGES_DIRNAME)
        return dirs + [images_dir(self.settings.artifacts_dir)] if dirs else []

    def status(self) -> dict[str, Any]:
        with self._lock:
            snap = self._snapshot
            info: dict[str, Any] = {
                "ready": snap is not None,
                "version": snap.corpus.name if snap else None,
                "model": snap.corpus.model if snap else None,
                "reload_error": self._public_error(),
                "hot_reload": self.settings.reload_interval_s > 0,
                "last_check": self._last_check,
            }
        if snap is not None:
            info["meaningless"] = bool(getattr(snap.encoder, "meaningless", False))
            info["device"] = getattr(snap.encoder, "device", None)
            info["text_encoder"] = self.text_precision
            if info["meaningless"]:
                info["note"] = "tiny-random model: scores and rankings are meaningless (smoke-test artifact)"
        return info

    # ------------------------------------------------------------------ loading

    def _set_encoder(self, encoder: Encoder) -> None:
        old = self._batcher
        self._bound_threads()  # model loading may have changed the thread count
        # ONNX Runtime (int8 / fp32) when the export and the fidelity probe pass, else torch (api/onnx_text.py)
        backend = choose_text_backend(encoder, self.settings.text_backend, self.settings.text_int8,
                                      self.settings.torch_threads)
        self.text_precision = backend.description
        # int8 activation scales are per batch: batching would make a query's embedding depend on its neighbours.
        max_batch = self.settings.max_batch if backend.batchable else 1
        self._encoder = encoder
        self._text_encode = backend.encode
        self._batcher = TextBatcher(backend.encode, max_batch, self.settings.encode_workers,
                                    max_pending=self.settings.max_pending_queries,
                                    timeout=self.settings.query_timeout_s)
        if old is not None:
            old.close()

    def _encoder_for(self, model: str, version: str) -> Encoder:
        configured = self.settings.clip_model
        if configured and not same_model(configured, model):
            raise ModelMismatchError(
                f"curated version {version} was embedded with model {model!r} but CURATION_CLIP_MODEL={configured!r}: "
                "queries must be embedded by the corpus's model. Unset CURATION_CLIP_MODEL (the API then uses the "
                "artifact's model) or re-run the pipeline with that model."
            )
        if self._encoder is not None:
            if same_model(self._encoder.model_name, model):
                return self._encoder
            if self._snapshot is not None:
                raise ModelMismatchError(
                    f"curated version {version} was embedded with model {model!r}, the service is serving "
                    f"{self._encoder.model_name!r}; restart the API to switch models"
                )
        self._set_encoder(self._load_encoder(model, self.settings.device))
        assert self._encoder is not None
        return self._encoder

    def _current_name(self) -> str | None:
        """CURRENT's version name (None: nothing published); CurrentUnreadableError with the reason otherwise."""
        try:
            return read_current_version_name(self.settings.artifacts_dir)
        except NoArtifactError:
            return None
        except (ArtifactError, OSError, UnicodeError, ValueError) as exc:
            where = curated_dir(self.settings.artifacts_dir) / CURRENT_FILENAME
            reason = str(exc) if isinstance(exc, ArtifactError) else f"cannot read {where}: {type(exc).__name__}: {exc}"
            raise CurrentUnreadableError(reason) from exc

    def _record_error(self, version: str | None, error: str, *, failed: bool, files: tuple = ()) -> None:
        """Remember why nothing new was swapped in (shown in /readyz and /stats). ``failed``: the version itself is
        bad and is not retried until CURRENT names another one or its files change (a version caught while still
        being copied in by hand is loaded once the copy completes); otherwise it is retried on every poll."""
        snap = self._snapshot
        with self._lock:
            same = self._error is not None and self._error["version"] == version and self._error["error"] == error
            if not same:
                self._error = {"version": version, "error": error, "at": _now()}
            self._failed_version = (version, files) if failed and version else None
        if not same:  # a condition that persists is logged once, not on every poll
            log.error("curated version %s not loaded, %s: %s", version or "(CURRENT unreadable)",
                      "keeping " + snap.corpus.name if snap else "nothing served yet", error)

    def _version_files(self, name: str) -> tuple:
        """What a failed version's directory holds (names, sizes, mtimes): a stat per file, cheap at poll rate."""
        try:
            vdir = curated_dir(self.settings.artifacts_dir) / name
            return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in vdir.iterdir()
                                for st in [f.stat()]))
        except OSError:
            return ()

    def _clear_error(self) -> None:
        with self._lock:
            self._error = None
            self._failed_version = None

    def check_for_update(self, *, initial: bool = False) -> bool:
        """Load CURRENT if it names a version not yet served (or failed); True when a new version was swapped in.

        Never raises for bad data (only, at start-up, for a misconfigured model): an unreadable CURRENT, a
        version that does not exist yet, an empty or broken version are recorded in ``reload_error`` and the
        served version (if any) keeps serving.
        """
        with self._load_lock:
            self._last_check = _now()
            snap = self._snapshot
            try:
                name = self._current_name()
            except CurrentUnreadableError as exc:
                self._record_error(None, str(exc), failed=False)
                return False
            if name is None:
                if self._error is not None and self._error["version"] is None:
                    self._clear_error()  # CURRENT was unreadable, now absent: nothing to report any more
                return False
            if snap is not None and snap.corpus.name == name:
                if self._error is not None:
                    self._clear_error()  # rolled back to the served version / CURRENT readable again
                return False
            if self._failed_version is not None and self._failed_version == (name, self._version_files(name)):
                return False
            if is_valid_version_name(name):
                vdir = curated_dir(self.settings.artifacts_dir) / name
                try:
                    exists = vdir.is_dir()
                except OSError:
                    exists = False
                if not exists:  # e.g. CURRENT copied before the version directory: retried on the next poll
                    self._record_error(name, f"CURRENT names curated version {name!r} but its directory does not "
                                             "exist (yet); retried on the next poll", failed=False)
                    return False
            t0 = time.perf_counter()
            files = self._version_files(name)  # before loading: a copy completing during the load is a change
            try:
                version = load_version(self.settings.artifacts_dir, name)
                if version.count == 0:
                    raise ArtifactError(f"curated version {name!r} is empty (0 records): an empty version is never "
                                        "served")
                encoder = self._encoder_for(version.model, name)
                if int(encoder.dim) != version.dim:
                    raise ValueError(f"model {version.model!r} embeds to dimension {encoder.dim}, the artifact has {version.dim}")
                corpus = Corpus.build(version, self.settings.index)
                served = self._text_encode or encoder.encode_texts  # the query path actually served
                corpus.canary(np.asarray(served([CANARY_QUERY]))[0])
                # Vectors of the right shape and norm can still be garbage: re-embed the probe texts.
                probe_cos = verify_probe(version, encoder.encode_texts)
            except Exception as exc:
                if initial and isinstance(exc, (ModelMismatchError, *_model_load_errors())):
                    raise
                transient = _is_transient(exc)
                self._record_error(name, str(exc) + ("; retried on the next poll" if transient else ""),
                                   failed=not transient, files=files)
                return False
            assert self._batcher is not None
            new = Snapshot(corpus=corpus, encoder=encoder, batcher=self._batcher, cache=self._query_cache)
            with self._lock:
                self._previous_images = snap.corpus.image_files if snap is not None else frozenset()
                self._previous_dir = snap.corpus.version.path if snap is not None else None
                self._snapshot = new
                self._error = None
                self._failed_version = None
            log.info("serving curated version %s (%d records, model %s, %s index, probe cosine %.4f) loaded in %.2fs",
                     name, corpus.count, corpus.model, corpus.index.kind, probe_cos, time.perf_counter() - t0)
            if getattr(encoder, "meaningless", False):
                log.warning("model %s is tiny-random: search scores are meaningless", corpus.model)
            return True
