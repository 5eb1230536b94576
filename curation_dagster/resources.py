"""Dagster resources and IO managers: configuration read from the environment variables of README "Configuration".

A variable that is set is bound with ``EnvVar`` (the UI shows where the value came from); an unset one falls back
to the documented default, so a fresh clone runs with no environment at all.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field
from upath import UPath

from .core import settings
from .core.atomic import atomic_file
from .core.embedding_set import EmbeddingSet


def env_or_default(var: str, default: str) -> Any:
    return dg.EnvVar(var) if os.environ.get(var, "").strip() else default


RUN_LOCK_FILE = ".run.lock"
log = logging.getLogger(__name__)
_held: dict[str, list] = {}  # artifacts dir -> [open lock file, holders in this process]
_held_lock = threading.Lock()


def _acquire_run_lock(artifacts: Path, run_id: str) -> None:
    """Hold ``<artifacts>/.run.lock`` (flock) for a run: a second run on the same artifacts waits here.

    Re-entrant within a process (the resource and its copies nested in the IO managers are each set up once).
    """
    key = str(artifacts)
    with _held_lock:
        if key in _held:
            _held[key][1] += 1
            return
    fh = open(artifacts / RUN_LOCK_FILE, "a+")  # waited on outside _held_lock: other trees' runs are not held up
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another run"
        log.warning("run %s waits: %s is materializing into %s (its intermediate tables would be mixed)",
                    run_id, holder, artifacts)
        t0 = time.monotonic()
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        log.warning("run %s starts after waiting %.0f s for %s", run_id, time.monotonic() - t0, holder)
    fh.seek(0)
    fh.truncate()
    fh.write(f"run {run_id} (pid {os.getpid()})\n")
    fh.flush()
    with _held_lock:  # nobody else in this process holds the tree now: this file's lock excludes them
        _held[key] = [fh, 1]


def _release_run_lock(artifacts: Path) -> None:
    key = str(artifacts)
    with _held_lock:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            fcntl.flock(entry[0].fileno(), fcntl.LOCK_UN)
            entry[0].close()


class CurationPaths(dg.ConfigurableResource):
    """Where the source data is read from and where every stage writes its files (the API reads the same tree)."""

    data_dir: str
    artifacts_dir: str
    exclusive_runs: bool = Field(default=True, description="Runs on this artifacts tree take turns (see _RunLock).")

    @property
    def data(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def artifacts(self) -> Path:
        p = Path(self.artifacts_dir).expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def images(self) -> Path:
        return self.artifacts / "images"


class ClipEncoderResource(dg.ConfigurableResource):
    """The CLIP checkpoint (hub id, local directory, or ``tiny-random``) and the device to run it on."""

    model: str
    device: str = "auto"
    precision: str = "auto"

    def load(self):
        # torch/transformers are imported only by the steps that need them
        from .core.encoder import ClipEncoder, ModelLoadError

        try:
            return _load_encoder_cached(self.model, self.device, self.precision, ClipEncoder)
        except ModelLoadError as exc:
            # One clear message (it says what failed and how to fix it), not the loader's internals.
            raise dg.Failure(description=str(exc), allow_retries=False) from None


_ENCODERS: dict[tuple[str, str, str], Any] = {}


def _load_encoder_cached(model: str, device: str, precision: str, cls):
    key = (model, device, precision)
    if key not in _ENCODERS:
        _ENCODERS[key] = cls.load(model, device, precision=precision)
    return _ENCODERS[key]


class ParquetIOManager(dg.UPathIOManager):
    """Polars DataFrames as parquet files, so any tool (and ``Definitions.load_asset_value``) can read them."""

    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected a polars DataFrame, got {type(obj)}")
        with atomic_file(Path(str(path))) as tmp:
            obj.write_parquet(tmp)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pl.DataFrame:
        return pl.read_parquet(str(path))


class EmbeddingSetIOManager(dg.UPathIOManager):
    """Embeddings as a directory of .npy matrices + id table (see core.embedding_set), replaced atomically."""

    extension = ""

    def dump_to_path(self, context: dg.OutputContext, obj: EmbeddingSet, path: UPath) -> None:
        obj.save(Path(str(path)))

    def load_from_path(self, context: dg.InputContext, path: UPath) -> EmbeddingSet:
        return EmbeddingSet.load(Path(str(path)))


class _RunLock:
    """Runs on one artifacts tree take turns: the intermediate tables (``tables/``, ``embeddings/``) are one copy per
    asset, so two runs at once would read each other's inputs (a run's check failed on the other run's rows).

    The IO managers hold a lock on the tree from set-up to tear-down: the in-process executor sets them up once per
    run, and only runs have IO managers (a sensor tick never waits on a run); the kernel drops the lock of a run
    worker that dies. The sharded code location turns ``exclusive_runs`` off: its steps run in separate processes
    of one run, and its shard runs are meant to run side by side; do not start its ingest or curate job twice at
    once on one tree."""

    paths: CurationPaths

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.paths.exclusive_runs:
            _acquire_run_lock(self.paths.artifacts, context.run_id if context.dagster_run is not None else "?")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self.paths.exclusive_runs:
            _release_run_lock(self.paths.artifacts)


class ParquetIOManagerFactory(_RunLock, dg.ConfigurableIOManagerFactory):
    """Tables under ``<artifacts>/tables``: the directory comes from the ``paths`` resource, read when a run starts
    (like every other path), not when the code location loads."""

    paths: CurationPaths

    def create_io_manager(self, context) -> ParquetIOManager:
        return ParquetIOManager(base_path=UPath(self.paths.artifacts / "tables"))


class EmbeddingSetIOManagerFactory(_RunLock, dg.ConfigurableIOManagerFactory):
    """Embedding sets under ``<artifacts>/embeddings`` (see ParquetIOManagerFactory)."""

    paths: CurationPaths

    def create_io_manager(self, context) -> EmbeddingSetIOManager:
        return EmbeddingSetIOManager(base_path=UPath(self.paths.artifacts / "embeddings"))


def build_resources(*, data_dir: str | None = None, artifacts_dir: str | None = None, model: str | None = None,
                    device: str | None = None, exclusive_runs: bool = True) -> dict[str, Any]:
    """Resources from the environment (or explicit overrides, which tests use): the one owner of the pipeline's
    environment variables in the Dagster layer (core/settings.py holds their defaults)."""
    paths = CurationPaths(
        data_dir=data_dir or env_or_default("CURATION_DATA_DIR", str(settings.data_dir())),
        artifacts_dir=artifacts_dir or env_or_default("CURATION_ARTIFACTS_DIR", str(settings.artifacts_dir())),
        exclusive_runs=exclusive_runs,
    )
    return {
        "paths": paths,
        "encoder": ClipEncoderResource(
            model=model or env_or_default("CURATION_CLIP_MODEL", settings.DEFAULT_CLIP_MODEL),
            device=device or env_or_default("CURATION_DEVICE", "auto"),
            precision=env_or_default("CURATION_PRECISION", "auto"),
        ),
        "io_manager": ParquetIOManagerFactory(paths=paths),
        "embeddings_io_manager": EmbeddingSetIOManagerFactory(paths=paths),
    }
