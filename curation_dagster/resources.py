"""Dagster resources and IO managers: configuration read from the environment variables of README "Configuration".

A variable that is set is bound with ``EnvVar`` (the UI shows where the value came from); an unset one falls back
to the documented default, so a fresh clone runs with no environment at all.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field
from upath import UPath

from .core import settings
from .core.atomic import atomic_file
from .core.embedding_set import EmbeddingSet
from .core.tree_lease import LeaseHolder, LeaseWaitTimeout, TreeLease, this_process_start


def env_or_default(var: str, default: str) -> Any:
    """``EnvVar(var)`` when set; its stripped text when it carries stray blanks (EnvVar would pass ``"dir "`` on,
    while the API's core.settings strips it: the two would use different trees), else ``default``."""
    raw = os.environ.get(var, "")
    if not raw.strip():
        return default
    return dg.EnvVar(var) if raw == raw.strip() else raw.strip()


log = logging.getLogger(__name__)
_held: dict[tuple[str, str], int] = {}  # (artifacts dir, run id) -> set-ups of this run's resources in this process
_held_lock = threading.Lock()


def _acquire_run_lease(artifacts: Path, me: LeaseHolder, run_active, max_wait_s: float | None = None) -> None:
    """Enter the tree's lease for a run (core.tree_lease), waiting for conflicting runs. Re-entrant within a
    process: the resource and its copies nested in the IO managers are each set up once per run (or step)."""
    key = (str(artifacts), me.run_id)
    with _held_lock:
        if key in _held:
            _held[key] += 1
            return
    try:  # waited on outside _held_lock: other trees are not held up
        TreeLease(artifacts, run_active).acquire(me, max_wait_s=max_wait_s)
    except LeaseWaitTimeout as exc:
        raise dg.Failure(str(exc), allow_retries=True) from None
    with _held_lock:
        _held[key] = _held.get(key, 0) + 1


def _release_run_lease(artifacts: Path, run_id: str, *, leave: bool) -> None:
    key = (str(artifacts), run_id)
    with _held_lock:
        if key not in _held:
            return
        _held[key] -= 1
        if _held[key] > 0:
            return
        del _held[key]
    if leave:
        TreeLease(artifacts, lambda _rid: True).release(run_id)


class CurationPaths(dg.ConfigurableResource):
    """Where the source data is read from and where every stage writes its files (the API reads the same tree)."""

    data_dir: str
    artifacts_dir: str
    run_lease: str = Field(default="process", description=(
        "How runs on this artifacts tree take turns (see _RunLock): 'process' (a run's steps run in this "
        "process: the in-process executor), 'run' (a run's steps run in many processes: the run holds the tree "
        "until Dagster marks it finished; embedding-shard runs share it), 'off'."))
    run_lease_max_wait_s: float = Field(default=600.0, description=(
        "'run' leases only: a step gives up (fails, retryable) after waiting this long for the tree. A waiting "
        "shard step holds a `gpu` pool slot, which the run it waits for may need: without a bound both would "
        "wait for ever."))

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

    The IO managers enter the tree's lease (core.tree_lease) when they are set up: once per run with the in-process
    executor (left at tear-down, and freed at once if the run worker dies), once per step in the sharded code
    location (held until Dagster marks the run finished; runs that only materialize ``clip_embedding_shards`` share
    the tree with each other, so shard runs run side by side). Only runs have IO managers: a sensor tick never
    waits here."""

    paths: CurationPaths

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        bound = self.paths.run_lease
        if bound == "off":
            return
        if bound not in ("process", "run"):
            raise dg.Failure(f"paths.run_lease={bound!r}: expected 'process', 'run' or 'off'", allow_retries=False)
        run = context.dagster_run
        shared = bound == "run" and run is not None and _only_shards(run.job_name, run.asset_selection)
        me = LeaseHolder(run_id=_lease_run_id(context),
                         mode="shared" if shared else "exclusive", bound=bound, job=run.job_name if run else "",
                         pid_start=this_process_start())
        _acquire_run_lease(self.paths.artifacts, me, _run_active_in(context.instance),
                           self.paths.run_lease_max_wait_s if bound == "run" else None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self.paths.run_lease in ("process", "run"):
            # a step of a many-process run does not leave: the run's next step (maybe elsewhere) still needs the tree
            _release_run_lease(self.paths.artifacts, _lease_run_id(context), leave=self.paths.run_lease == "process")


def _lease_run_id(context: dg.InitResourceContext) -> str:
    run = context.dagster_run
    return run.run_id if run is not None else f"pid-{os.getpid()}"


SHARED_LEASE_ASSETS = frozenset({dg.AssetKey("clip_embedding_shards")})
SHARED_LEASE_JOBS = frozenset({"embedding_shards_job"})  # (definitions_sharded; its runs carry no asset selection)


def _only_shards(job_name: str, selection) -> bool:
    """Runs that only write embedding shards (one file per partition) may share the tree with each other."""
    if selection:
        return set(selection) <= SHARED_LEASE_ASSETS
    return job_name in SHARED_LEASE_JOBS


def _run_active_in(instance):
    """True (not finished) / False (finished) / None (this instance does not know the run)."""
    def run_active(run_id: str) -> bool | None:
        record = instance.get_run_by_id(run_id) if instance is not None else None
        return None if record is None else not record.is_finished
    return run_active


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
                    device: str | None = None, run_lease: str = "process") -> dict[str, Any]:
    """Resources from the environment (or explicit overrides, which tests use): the one owner of the pipeline's
    environment variables in the Dagster layer (core/settings.py holds their defaults)."""
    paths = CurationPaths(
        data_dir=data_dir or env_or_default("CURATION_DATA_DIR", str(settings.data_dir())),
        artifacts_dir=artifacts_dir or env_or_default("CURATION_ARTIFACTS_DIR", str(settings.artifacts_dir())),
        run_lease=run_lease,
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
