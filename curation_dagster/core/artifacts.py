"""The curated artifact: the on-disk contract between the pipeline (writer) and the API (reader).

Layout (see docs/architecture.md)::

    <artifacts_dir>/curated/<version>/records.parquet
                                     /image_embeddings.npy
                                     /text_embeddings.npy
                                     /manifest.json
    <artifacts_dir>/curated/CURRENT          one line: the version name
    <artifacts_dir>/curated/_staged/<version>/   complete but unpublished (checks not passed yet, or failed)

Why it is written this way: the API polls CURRENT and may load a version at any moment, so a version
directory is complete (written to a hidden temp dir, fsynced, renamed) before CURRENT points to it, and
CURRENT itself is replaced atomically (temp file + fsync + ``os.replace``). A reader therefore sees either
the old version or the new one, never a half-written one. Versions are immutable once written.

Writing and publishing are two steps: :func:`write_staged_version` writes a complete version under
``_staged/`` (the pipeline's checks and evaluation read it there, by name), and only :func:`publish_version`
moves it next to the published versions (one ``rename``) and then moves CURRENT. A version whose checks
failed stays under ``_staged/`` for inspection and is never served. Everything is world-readable (0644/0755)
whatever the writer's umask: the API may run as another user.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl

from .atomic import DIR_MODE, atomic_write_text, fsync_dir, seal_dir, staging_dir, world_readable

FORMAT_VERSION = 1
CURATED_DIRNAME = "curated"
CURRENT_FILENAME = "CURRENT"
RECORDS_FILE = "records.parquet"
IMAGE_EMB_FILE = "image_embeddings.npy"
TEXT_EMB_FILE = "text_embeddings.npy"
MANIFEST_FILE = "manifest.json"
VERSION_FILES = (RECORDS_FILE, IMAGE_EMB_FILE, TEXT_EMB_FILE, MANIFEST_FILE)
# Optional: every row curation removed, with its reason and the fields a person needs to judge it (the curation
# browser shows them next to the kept record). Versions written before it existed simply lack it.
REMOVALS_FILE = "removals.parquet"
IMAGES_DIRNAME = "images"
STAGED_DIRNAME = "_staged"
PROBE_KEY = "probe"
PROBE_MIN_COSINE = 0.98
PROBE_ROWS = 8

RECORD_COLUMNS = [
    "record_id",
    "productid",
    "imageid",
    "designation",
    "description",
    "prdtypecode",
    "category",
    "image_file",
    "alignment_score",
    "dup_group",
]
RECORD_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Int64(),
    "productid": pl.Int64(),
    "imageid": pl.Int64(),
    "designation": pl.String(),
    "description": pl.String(),
    "prdtypecode": pl.Int64(),
    "category": pl.String(),
    "image_file": pl.String(),
    "alignment_score": pl.Float32(),
    "dup_group": pl.Int64(),
}
# Columns that may hold nulls (descriptions are often empty; unlabelled products have no class and no category name).
NULLABLE_COLUMNS = frozenset({"description", "category", "prdtypecode"})
# Manifest key under which the pipeline records per-stage counts, and the stage names it uses.
STAGE_COUNTS_KEY = "counts"
STAGE_COUNT_NAMES = ("raw", "sampled", "clean", "removed_misaligned", "removed_duplicate", "curated")

NORM_TOLERANCE = 1e-3
NO_ARTIFACT_HINT = "run the main job: `dagster job execute -m curation_dagster.definitions -j curation_job`"

_VERSION_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z_[A-Za-z0-9-]{1,32}$")
_RUN_ID_CHARS = 32  # a Dagster run id without dashes: a run finds the versions it wrote by name
_IMAGE_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600


class ArtifactError(RuntimeError):
    """A curated artifact is missing, incomplete or does not match the contract."""


class NoArtifactError(ArtifactError):
    """No curated version has been published yet."""

    def __init__(self, artifacts_dir: Path | str | None = None):
        where = f" in {Path(artifacts_dir) / CURATED_DIRNAME}" if artifacts_dir is not None else ""
        super().__init__(f"no curated artifact yet{where}: {NO_ARTIFACT_HINT}")


@dataclass(frozen=True)
class CuratedVersionInfo:
    """What :func:`publish_curated_version` wrote."""

    version: str
    path: Path
    count: int
    dim: int
    pruned: tuple[str, ...] = ()


@dataclass
class CuratedVersion:
    """A fully loaded and validated curated version."""

    version: str
    path: Path
    records: pl.DataFrame
    image_emb: np.ndarray
    text_emb: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def dim(self) -> int:
        return int(self.image_emb.shape[1])

    @property
    def count(self) -> int:
        return int(self.image_emb.shape[0])


# --------------------------------------------------------------------------------------------- paths


def curated_dir(artifacts_dir: Path | str) -> Path:
    return Path(artifacts_dir) / CURATED_DIRNAME


def images_dir(artifacts_dir: Path | str) -> Path:
    return Path(artifacts_dir) / IMAGES_DIRNAME


def image_file_name(imageid: int, productid: int) -> str:
    """Name of a collected image under ``<artifacts_dir>/images`` (the ``image_file`` column)."""
    return f"{int(imageid)}_{int(productid)}.jpg"


def is_valid_version_name(name: str) -> bool:
    return bool(_VERSION_RE.match(name))


_STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def new_version_name(run_id: str | None = None, *, after: str | None = None) -> str:
    """Sortable, unique version name: UTC timestamp with microseconds + ``_`` + the run id (alphanumerics).

    Lexical order equals staging order: ``after`` (the newest existing version) bumps the stamp past it when the
    clock is behind (a clock set back by NTP or by hand would otherwise name a new version below the served one,
    which publication then refuses as older). Without a run id a random suffix keeps names unique.
    """
    now = datetime.now(timezone.utc)
    if after is not None and is_valid_version_name(after):
        floor = datetime.strptime(after.split("_", 1)[0], _STAMP_FORMAT).replace(tzinfo=timezone.utc)
        now = max(now, floor + timedelta(microseconds=1))
    return f"{now.strftime(_STAMP_FORMAT)}_{run_suffix(run_id) or uuid.uuid4().hex[:8]}"


def _newest_version_name(*dirs: Path) -> str | None:
    names = [p.name for d in dirs if d.is_dir() for p in d.iterdir() if is_valid_version_name(p.name)]
    return max(names, default=None)


def run_suffix(run_id: str | None) -> str:
    """The part of a version name that identifies the run that wrote it."""
    return re.sub(r"[^A-Za-z0-9]", "", run_id or "")[:_RUN_ID_CHARS]


def staged_dir(artifacts_dir: Path | str) -> Path:
    return curated_dir(artifacts_dir) / STAGED_DIRNAME


def _write_current(cdir: Path, version: str) -> None:
    atomic_write_text(cdir / CURRENT_FILENAME, version + "\n")  # 0644: an API running as another user reads it


# --------------------------------------------------------------------------------------------- validation


def _check_embeddings(name: str, emb: Any, *, expected_rows: int | None = None, dim: int | None = None) -> np.ndarray:
    if not isinstance(emb, np.ndarray):
        raise ArtifactError(f"{name} must be a numpy array, got {type(emb).__name__}")
    if emb.ndim != 2:
        raise ArtifactError(f"{name} must be 2-D [n, dim], got shape {emb.shape}")
    if emb.dtype != np.float32:
        raise ArtifactError(f"{name} must be float32, got {emb.dtype}")
    n, d = emb.shape
    if d == 0:
        raise ArtifactError(f"{name} has dimension 0")
    if expected_rows is not None and n != expected_rows:
        raise ArtifactError(f"{name} has {n} rows but records has {expected_rows}")
    if dim is not None and d != dim:
        raise ArtifactError(f"{name} has dimension {d}, expected {dim}")
    if n:
        if not np.isfinite(emb).all():
            bad = int((~np.isfinite(emb).all(axis=1)).sum())
            raise ArtifactError(f"{name} has {bad} rows with non-finite values")
        norms = np.linalg.norm(emb, axis=1)
        off = np.abs(norms - 1.0) > NORM_TOLERANCE
        if off.any():
            i = int(np.argmax(off))
            raise ArtifactError(
                f"{name} is not L2-normalised: {int(off.sum())} rows off by > {NORM_TOLERANCE} (row {i} has norm {norms[i]:.6f})"
            )
    return emb


def _coerce_records(records: Any) -> pl.DataFrame:
    """Check required columns and dtypes; widen compatible integer/float types to the contract's dtypes."""
    if not isinstance(records, pl.DataFrame):
        raise ArtifactError(f"records must be a polars DataFrame, got {type(records).__name__}")
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise ArtifactError(f"records is missing required columns {missing}; has {records.columns}")
    casts = []
    for col, want in RECORD_SCHEMA.items():
        have = records.schema[col]
        if have == want:
            continue
        if isinstance(want, pl.Int64) and have.is_integer():
            casts.append(pl.col(col).cast(pl.Int64))
        elif isinstance(want, pl.Float32) and (have.is_float() or have.is_integer()):
            casts.append(pl.col(col).cast(pl.Float32))
        elif isinstance(want, pl.String) and have == pl.Null:
            casts.append(pl.col(col).cast(pl.String))
        else:
            raise ArtifactError(f"records column {col!r} has dtype {have}, expected {want}")
    out = records.with_columns(casts) if casts else records
    extra = [c for c in out.columns if c not in RECORD_SCHEMA]
    return out.select(RECORD_COLUMNS + extra)


def _check_records(records: pl.DataFrame) -> None:
    for col in RECORD_COLUMNS:
        if col in NULLABLE_COLUMNS:
            continue
        nulls = records[col].null_count()
        if nulls:
            raise ArtifactError(f"records column {col!r} has {nulls} nulls")
    if records["record_id"].n_unique() != records.height:
        dups = records.filter(pl.col("record_id").is_duplicated())["record_id"].unique().head(5).to_list()
        raise ArtifactError(f"records has duplicate record_id values, e.g. {dups}")
    if records.height and not (records["record_id"] == records["productid"]).all():
        raise ArtifactError("record_id must equal productid (the artifact contract, docs/architecture.md)")
    bad_files = [f for f in records["image_file"].to_list() if not _IMAGE_FILE_RE.match(f)]
    if bad_files:
        raise ArtifactError(f"image_file must be a plain file name inside images/, got e.g. {bad_files[:3]}")
    if records.height and not records["alignment_score"].is_finite().all():
        raise ArtifactError("alignment_score has non-finite values")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"manifest value of type {type(obj).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------------------------- writer


class PublishRefused(ArtifactError):
    """A version is below the publish floor (or otherwise unfit to serve): it stays unpublished."""


@dataclass(frozen=True)
class PublishFloor:
    """The least a version must hold to replace the served one: an empty or gutted version is never published.

    ``min_kept_fraction`` is measured against the clean rows of the same run (manifest ``counts.clean``).
    """

    min_rows: int = 1
    min_kept_fraction: float = 0.5

    def problems(self, count: int, clean: int | None) -> list[str]:
        out = []
        if count < self.min_rows:
            out.append(f"{count} curated rows is below the publish floor of {self.min_rows} rows")
        if clean:
            kept = count / clean
            if kept < self.min_kept_fraction:
                out.append(f"{count}/{clean} clean rows kept ({kept:.1%}) is below the publish floor of "
                           f"{self.min_kept_fraction:.0%}")
        return out


def build_probe(texts: list[str], n: int = PROBE_ROWS) -> dict[str, Any]:
    """Rows (evenly spread) and the exact strings embedded for them, for :func:`verify_probe`."""
    if not texts:
        return {"rows": [], "texts": []}
    rows = sorted({int(i) for i in np.linspace(0, len(texts) - 1, num=min(n, len(texts)))})
    return {"rows": rows, "texts": [str(texts[i]) for i in rows]}


def verify_probe(version: "CuratedVersion", encode_texts) -> float:
    """Re-embed the probe texts with the serving encoder and compare with the stored text embeddings.

    Why: a version whose vectors are unit-norm and of the right dimension can still be garbage (random vectors,
    another model's, rows shuffled against the records); only re-encoding stored inputs tells. Returns the
    smallest cosine; raises ArtifactError below PROBE_MIN_COSINE or when the version has no probe.
    """
    probe = version.manifest.get(PROBE_KEY)
    if not isinstance(probe, dict) or not isinstance(probe.get("rows"), list) or not isinstance(probe.get("texts"), list) \
            or len(probe["rows"]) != len(probe["texts"]):
        raise ArtifactError(f"curated version {version.version!r} has no valid probe in its manifest "
                            "(re-run the pipeline to publish a verifiable version)")
    rows, texts = probe["rows"], probe["texts"]
    if not rows:
        if version.count:
            raise ArtifactError(f"curated version {version.version!r} has an empty probe but {version.count} rows")
        return 1.0
    if not all(isinstance(r, int) and 0 <= r < version.count for r in rows):
        raise ArtifactError(f"curated version {version.version!r}: probe rows out of range")
    got = np.asarray(encode_texts([str(t) for t in texts]), dtype=np.float32)
    if got.shape != (len(rows), version.dim):
        raise ArtifactError(f"probe embeddings have shape {got.shape}, expected ({len(rows)}, {version.dim})")
    cos = float(np.min(np.sum(got * version.text_emb[rows], axis=1)))
    if not cos >= PROBE_MIN_COSINE:
        raise ArtifactError(
            f"curated version {version.version!r}: its text embeddings do not match the model {version.model!r} "
            f"(probe min cosine {cos:.3f} < {PROBE_MIN_COSINE}): wrong model, or corrupt embeddings")
    return cos


def write_staged_version(
    artifacts_dir: Path | str,
    records: pl.DataFrame,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    manifest: dict,
    *,
    run_id: str | None = None,
    removals: pl.DataFrame | None = None,
    images_from: Path | str | None = None,
) -> CuratedVersionInfo:
    """Validate and write a complete, unpublished version under ``curated/_staged/<version>``.

    ``manifest`` must name the ``model``; ``format_version``, ``dim``, ``count``, ``created_at`` and
    ``version`` (and ``run_id`` when given) are filled in here. With ``images_from`` (the shared images/ folder),
    the version pins its images: see :func:`_pin_images`.
    """
    if not isinstance(manifest, dict):
        raise ArtifactError(f"manifest must be a dict, got {type(manifest).__name__}")
    model = manifest.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ArtifactError("manifest must name the embedding model under 'model' (non-empty string)")
    recs = _coerce_records(records)
    _check_records(recs)
    n = recs.height
    img = _check_embeddings("image_emb", image_emb, expected_rows=n)
    txt = _check_embeddings("text_emb", text_emb, expected_rows=n, dim=img.shape[1])
    dim = int(img.shape[1])

    cdir = curated_dir(artifacts_dir)
    sdir = staged_dir(artifacts_dir)
    sdir.mkdir(parents=True, exist_ok=True)
    for d in (cdir.parent, cdir, sdir):
        world_readable(d, DIR_MODE)
    newest = _newest_version_name(cdir, sdir)
    version = new_version_name(run_id, after=newest)
    while (cdir / version).exists() or (sdir / version).exists():  # same microsecond and same run id
        time.sleep(1e-6)
        version = new_version_name(run_id, after=newest)

    full_manifest = dict(manifest)
    full_manifest.update(
        format_version=FORMAT_VERSION,
        version=version,
        dim=dim,
        count=n,
        created_at=datetime.now(timezone.utc).isoformat(),
    )
    if run_id is not None:
        full_manifest.setdefault("run_id", run_id)
    try:
        manifest_text = json.dumps(full_manifest, indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest is not JSON-serialisable: {exc}") from exc

    with staging_dir(sdir, prefix=version) as tmp:
        recs.write_parquet(tmp / RECORDS_FILE)
        for name, arr in ((IMAGE_EMB_FILE, img), (TEXT_EMB_FILE, txt)):
            with open(tmp / name, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        (tmp / MANIFEST_FILE).write_text(manifest_text + "\n", encoding="utf-8")
        if removals is not None:
            removals.write_parquet(tmp / REMOVALS_FILE)
        if images_from is not None:
            _pin_images(tmp / IMAGES_DIRNAME, Path(images_from), recs["image_file"].to_list(),
                        _removal_image_names(removals))
        seal_dir(tmp)  # 0644/0755 and fsynced: readers may run as another user
        os.rename(tmp, sdir / version)
    fsync_dir(sdir)
    return CuratedVersionInfo(version=version, path=sdir / version, count=n, dim=dim)


def _removal_image_names(removals: pl.DataFrame | None) -> list[str]:
    if removals is None:
        return []
    return [f for col in ("image_file", "kept_image_file") if col in removals.columns
            for f in removals[col].drop_nulls().cast(pl.Utf8).to_list()]


def _pin_images(dest: Path, source: Path, required: list[str], optional: list[str]) -> None:
    """Hard-link (else copy) the version's images into ``<version>/images/``.

    Why: images/<name> is shared by every run, and a later run replaces it when the source photo changed or when
    cleaning rewrites it (another mode or format, an EXIF orientation), before its checks pass and whether or not
    it ever publishes. A served version must keep showing the very pictures its embeddings were made from: its own
    links keep those files (a replacement is a rename, a new inode) until the version is pruned. Links cost no
    space; another file system gets copies. ``optional``: the images of removed rows (the curation browser).
    """
    dest.mkdir()
    for name, needed in [(n, True) for n in dict.fromkeys(required)] + [(n, False) for n in dict.fromkeys(optional)]:
        if Path(name).name != name or name in (".", ".."):
            raise ArtifactError(f"image_file {name!r} is not a plain file name")
        target = dest / name
        if target.exists():
            continue
        try:
            os.link(source / name, target)
        except FileNotFoundError:
            if needed:
                raise ArtifactError(f"image {name} of a curated record is missing from {source}") from None
        except OSError:  # another file system, or links not allowed: a copy, readable by other users
            shutil.copyfile(source / name, target)
            os.chmod(target, 0o644)
    os.chmod(dest, DIR_MODE)
    os.sync()  # the collected files were not fsynced one by one (core/images.py): once for all, before publication
    fsync_dir(dest)


def publish_version(
    artifacts_dir: Path | str,
    version: str,
    *,
    keep_versions: int = 5,
    floor: PublishFloor | None = None,
) -> CuratedVersionInfo:
    """Move a staged version next to the published ones, then point CURRENT at it; prune old versions.

    The version is loaded and validated first, and refused (:class:`PublishRefused`, nothing moves) when it is
    below ``floor``, or older than the version CURRENT names (two runs at once: the one that staged later may
    finish first; CURRENT never goes back). Versions beyond ``keep_versions`` (newest first) are pruned, never the
    CURRENT one. Publishers take turns (an exclusive lock): one's prune never removes what another is publishing.
    Idempotent: a version already moved by an attempt that failed before CURRENT was written is published from
    where it is, and publishing the CURRENT version again changes nothing.
    """
    if keep_versions < 1:
        raise ArtifactError(f"keep_versions must be >= 1, got {keep_versions}")
    cdir = curated_dir(artifacts_dir)
    if not (staged_dir(artifacts_dir) / version).is_dir() and (cdir / version).is_dir():
        # An earlier attempt moved it and then failed before CURRENT was written (killed, disk full): resume.
        staged = _load_version_dir(cdir, version)
    else:
        staged = load_staged_version(artifacts_dir, version)
    if floor is not None:
        counts = staged.manifest.get(STAGE_COUNTS_KEY) or {}
        problems = floor.problems(staged.count, counts.get("clean") if isinstance(counts, dict) else None)
        if problems:
            raise PublishRefused(f"curated version {version} not published: " + "; ".join(problems))
    with _publish_lock(cdir):
        try:
            current = _read_current(cdir)
        except ArtifactError:
            current = None  # unreadable CURRENT: publishing a good version repairs it
        if current and is_valid_version_name(current) and current > version and (cdir / current).is_dir():
            raise PublishRefused(f"curated version {version} not published: the newer version {current} is "
                                 f"CURRENT already (staged later, published first); {version} stays staged")
        if staged.path != cdir / version and not (cdir / version).is_dir():  # (else moved by a concurrent retry)
            os.rename(staged.path, cdir / version)
            fsync_dir(staged.path.parent)
            fsync_dir(cdir)
        if current != version:
            _write_current(cdir, version)
        pruned = _prune(cdir, keep_versions, protect=version)
    return CuratedVersionInfo(version=version, path=cdir / version, count=staged.count, dim=staged.dim,
                              pruned=tuple(pruned))


def publish_curated_version(
    artifacts_dir: Path | str,
    records: pl.DataFrame,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    manifest: dict,
    *,
    run_id: str | None = None,
    keep_versions: int = 5,
    images_from: Path | str | None = None,
) -> CuratedVersionInfo:
    """Write and publish in one call (tools, tests, benchmarks); the pipeline stages and checks in between."""
    if keep_versions < 1:
        raise ArtifactError(f"keep_versions must be >= 1, got {keep_versions}")
    info = write_staged_version(artifacts_dir, records, image_emb, text_emb, manifest, run_id=run_id,
                                images_from=images_from)
    return publish_version(artifacts_dir, info.version, keep_versions=keep_versions)


@contextmanager
def _publish_lock(cdir: Path) -> Iterator[None]:
    with open(cdir / ".publish.lock", "a+") as fh:  # never a version name: listings skip it
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _prune(cdir: Path, keep_versions: int, protect: str) -> list[str]:
    current = _read_current(cdir)
    versions = list_versions(cdir.parent)
    keep = set(versions[-keep_versions:]) | {protect}
    if current:
        keep.add(current)
    pruned = []
    for v in versions:
        if v not in keep:
            shutil.rmtree(cdir / v, ignore_errors=True)
            pruned.append(v)
    # Staged versions that were never published (failed checks) are kept as long as published ones, for
    # inspection; leftovers of writers that crashed long ago go too (a recent one may belong to a live writer).
    now = time.time()
    sdir = cdir / STAGED_DIRNAME
    staged = sorted(p.name for p in sdir.iterdir() if p.is_dir() and is_valid_version_name(p.name)) \
        if sdir.is_dir() else []
    for v in staged[:-keep_versions]:
        shutil.rmtree(sdir / v, ignore_errors=True)
    for d in (cdir, sdir):
        for p in d.glob(_TMP_PREFIX + "*") if d.is_dir() else ():
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            except OSError:
                pass
    return pruned


# --------------------------------------------------------------------------------------------- reader


def _read_current(cdir: Path) -> str | None:
    """CURRENT's version name; None when nothing is published. Anything unreadable is an ArtifactError that says
    what is wrong (a reader must be able to start and report it, not crash)."""
    path = cdir / CURRENT_FILENAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise ArtifactError(f"{cdir.parent} is not a directory (CURATION_ARTIFACTS_DIR must be one)") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a directory, not a file naming the current version") from None
    except OSError as exc:  # permissions, a symlink loop, I/O errors
        raise ArtifactError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not UTF-8 text (it must hold one version name)") from None
    return text or None


def read_current_version_name(artifacts_dir: Path | str) -> str | None:
    """The version CURRENT points to, or None when nothing has been published."""
    return _read_current(curated_dir(artifacts_dir))


def list_versions(artifacts_dir: Path | str) -> list[str]:
    """Published version names, oldest first (temp dirs of writers in progress are not versions)."""
    cdir = curated_dir(artifacts_dir)
    if not cdir.is_dir():
        return []
    return sorted(p.name for p in cdir.iterdir() if p.is_dir() and is_valid_version_name(p.name))


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"cannot read {path.name}: {exc}") from exc


def versions_of_run(artifacts_dir: Path | str, run_id: str, *, staged: bool) -> list[str]:
    """Versions a run wrote, oldest first: unpublished ones under ``_staged/`` (``staged``) or published ones.

    Why by name: two runs may be in flight at once, and each must check, publish and evaluate its own version,
    never whatever CURRENT or a shared table happens to hold."""
    d = staged_dir(artifacts_dir) if staged else curated_dir(artifacts_dir)
    suffix = "_" + run_suffix(run_id)
    if not d.is_dir() or suffix == "_":
        return []
    return sorted(p.name for p in d.iterdir()
                  if p.is_dir() and is_valid_version_name(p.name) and p.name.endswith(suffix))


def load_staged_version(artifacts_dir: Path | str, version: str) -> CuratedVersion:
    """Load and validate an unpublished version by name."""
    return _load_version_dir(staged_dir(artifacts_dir), version)


def load_version(artifacts_dir: Path | str, version: str | None = None) -> CuratedVersion:
    """Load and validate a curated version (``None`` → CURRENT, retried if CURRENT moved and the version it named
    was pruned while we read it: a reader of CURRENT never fails because of a concurrent publish)."""
    if version is not None:
        return _load_version(artifacts_dir, version)
    cdir = curated_dir(artifacts_dir)
    for _ in range(5):
        current = _read_current(cdir)
        if current is None:
            raise NoArtifactError(artifacts_dir)
        try:
            return _load_version(artifacts_dir, current)
        except ArtifactError:
            if _read_current(cdir) == current:
                raise
    return _load_version(artifacts_dir, None)


def _load_version(artifacts_dir: Path | str, version: str | None = None) -> CuratedVersion:
    """Load and validate a published version (``None`` → the one CURRENT points to).

    Raises :class:`NoArtifactError` when nothing is published and :class:`ArtifactError` with a message
    saying what is wrong for anything that does not match the contract.
    """
    cdir = curated_dir(artifacts_dir)
    if version is None:
        version = _read_current(cdir)
        if version is None:
            raise NoArtifactError(artifacts_dir)
    return _load_version_dir(cdir, version)


def _load_version_dir(cdir: Path, version: str) -> CuratedVersion:
    if not is_valid_version_name(version):
        raise ArtifactError(f"invalid curated version name {version!r} (expected e.g. {new_version_name('run')!r})")
    vdir = cdir / version
    if not vdir.is_dir():
        raise ArtifactError(f"curated version {version!r} does not exist in {cdir}")
    missing = [f for f in VERSION_FILES if not (vdir / f).is_file()]
    if missing:
        raise ArtifactError(f"curated version {version!r} is incomplete: missing {missing}")

    try:
        manifest = json.loads((vdir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"curated version {version!r}: cannot read manifest.json: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"curated version {version!r}: manifest.json is not a JSON object")
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        raise ArtifactError(f"curated version {version!r}: format_version {fv!r} is not supported (expected {FORMAT_VERSION})")
    model = manifest.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ArtifactError(f"curated version {version!r}: manifest does not name the embedding model")
    dim, count = manifest.get("dim"), manifest.get("count")
    if not isinstance(dim, int) or dim <= 0 or not isinstance(count, int) or count < 0:
        raise ArtifactError(f"curated version {version!r}: manifest dim/count invalid ({dim!r}, {count!r})")

    try:
        records = pl.read_parquet(vdir / RECORDS_FILE)
    except Exception as exc:  # polars raises several error types for corrupt files
        raise ArtifactError(f"curated version {version!r}: cannot read records.parquet: {exc}") from exc
    try:
        records = _coerce_records(records)
        _check_records(records)
        if records.height != count:
            raise ArtifactError(f"records.parquet has {records.height} rows, manifest count is {count}")
        img = _check_embeddings(IMAGE_EMB_FILE, _load_array(vdir / IMAGE_EMB_FILE), expected_rows=count, dim=dim)
        txt = _check_embeddings(TEXT_EMB_FILE, _load_array(vdir / TEXT_EMB_FILE), expected_rows=count, dim=dim)
    except ArtifactError as exc:
        raise ArtifactError(f"curated version {version!r}: {exc}") from exc
    except FileNotFoundError as exc:
        raise ArtifactError(f"curated version {version!r} is incomplete: {exc}") from exc
    return CuratedVersion(version=version, path=vdir, records=records, image_emb=img, text_emb=txt, manifest=manifest)


def load_removals(version: CuratedVersion) -> pl.DataFrame | None:
    """The version's removals table (None for a version written without one)."""
    path = version.path / REMOVALS_FILE
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for corrupt files
        raise ArtifactError(f"curated version {version.version!r}: cannot read {REMOVALS_FILE}: {exc}") from exc


def alignment_stats(scores: np.ndarray) -> dict[str, float | None]:
    """min/max/mean/p10/p50/p90 of alignment scores (None for an empty corpus)."""
    keys = ("min", "max", "mean", "p10", "p50", "p90")
    if scores.size == 0:
        return dict.fromkeys(keys)
    s = scores.astype(np.float64)
    p10, p50, p90 = np.percentile(s, [10, 50, 90])
    vals = (s.min(), s.max(), s.mean(), p10, p50, p90)
    return {k: (float(v) if math.isfinite(v) else None) for k, v in zip(keys, vals)}
