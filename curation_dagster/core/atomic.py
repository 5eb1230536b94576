"""Atomic file-system writes: the one home of every "write aside, fsync, rename" an artifact reader relies on.

A reader (another stage, the API, another user) sees the old file/directory or the new one, never a half-written
one, and a crash leaves at most a hidden ``.tmp-*`` leftover. Files are world-readable (0644, directories 0755)
whatever the writer's umask: the API may run as another user.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FILE_MODE, DIR_MODE = 0o644, 0o755


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames/creations in ``path`` durable; silently skipped where directories cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path | str, *, mode: int = FILE_MODE) -> Iterator[Path]:
    """``with atomic_file(p) as tmp: write to tmp`` → tmp is fsynced and renamed onto ``p`` (or removed on error).

    The temp file keeps ``p``'s suffix, so writers that pick a format from the name (savefig, write_parquet) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem[:40]}-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int = FILE_MODE) -> Path:
    with atomic_file(path, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str, *, mode: int = FILE_MODE) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_copy(src: Path | str, dest: Path | str) -> Path:
    with atomic_file(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)


@contextmanager
def staging_dir(parent: Path | str, prefix: str) -> Iterator[Path]:
    """A temp directory under ``parent`` (same filesystem, so a rename publishes it), removed if the block fails or
    leaves it in place; the caller renames it into place inside the block (see :func:`publish_dir`)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{prefix}-", dir=parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def seal_dir(tmp: Path) -> None:
    """Make a fully written temp dir durable and readable by others before it is renamed into place."""
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, FILE_MODE)
            fsync_file(f)
    os.chmod(tmp, DIR_MODE)  # mkdtemp creates 0700
    fsync_dir(tmp)


def replace_dir(tmp: Path, directory: Path) -> None:
    """Move a fully written ``tmp`` dir to ``directory``, replacing an existing one (old copy removed after)."""
    seal_dir(tmp)
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def world_readable(path: Path | str, mode: int = DIR_MODE) -> None:
    """Add ``mode``'s bits to an existing path (a writer's umask must not hide artifacts from a reader running as
    another user); a path that is not ours to change is left as it is (readers say what they cannot read)."""
    try:
        st_mode = os.stat(path).st_mode
        if (st_mode & mode) != mode:
            os.chmod(path, st_mode | mode)
    except OSError:
        pass
