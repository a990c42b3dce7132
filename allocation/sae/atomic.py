"""Crash-safe writes: every file and directory appears under its final name complete, or not at all.

A file is written to a temporary sibling (``.<name>.<random>.tmp``), fsynced, given the permissions
the process umask asks for, then renamed over the final name. A directory is assembled in a
staging sibling (``.<name>.tmp-<random>``) and swapped in by ``publish_directory``: the previous
directory is moved aside to ``.<name>.old`` first and removed last, so an interruption leaves either
the old or the new one (``resolve_published`` finds the moved-aside copy after a crash mid-swap).

A process killed mid-write leaves its temporary siblings behind; ``remove_stale`` deletes them by
name pattern (only for the names it is given), and a moved-aside copy once the new directory is in
place, on the next write into the same directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional


def current_umask() -> int:
    """The process umask (read by setting and restoring it: Python has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a file created by ``open()`` under the current umask (0666 & ~umask)."""
    return 0o666 & ~current_umask()


def directory_mode() -> int:
    """Permissions of a directory created by ``mkdir`` under the current umask (0777 & ~umask)."""
    return 0o777 & ~current_umask()


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse to open directories
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(handle)


def write_file(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: temporary sibling, fsync, chmod to the umask, rename.

    ``sync_directory=False`` skips the fsync of the parent (the caller syncs it once, later).
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), file_mode())
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    if sync_directory:
        _fsync_directory(path.parent)


def staging_directory(target: Path) -> Path:
    """A fresh, empty staging directory beside ``target`` (parents created), to fill then publish."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def publish_directory(staging: Path, target: Path) -> None:
    """Move the filled ``staging`` directory to ``target``, keeping the old ``target`` aside until done."""
    os.chmod(staging, directory_mode())
    _fsync_directory(staging)
    aside = _aside(target)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside)
        else:  # a crash mid-swap left the only complete copy aside: keep it until the swap succeeds
            os.replace(aside, target)
    if target.exists():
        os.replace(target, aside)
    os.replace(staging, target)
    _fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def resolve_published(target: Path) -> Optional[Path]:
    """``target`` if it is a directory, else its moved-aside copy from an interrupted swap, else None."""
    target = Path(target)
    if target.is_dir():
        return target
    aside = _aside(target)
    return aside if aside.is_dir() else None


def write_directory(target: Path, files: dict) -> Path:
    """Publish a directory holding exactly ``files`` (name -> bytes) at ``target``, atomically."""
    target = Path(target)
    staging = staging_directory(target)
    try:
        for name, data in files.items():
            write_file(staging / name, data, sync_directory=False)  # publish syncs the staging directory
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def stale_entries(directory: Path, names: Iterable[str]) -> list:
    """Temporary siblings a killed writer left in ``directory`` for the given final ``names``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for name in names:
        found.extend(directory.glob(f".{name}.tmp-*"))  # staging directories
        found.extend(directory.glob(f".{name}.*.tmp"))  # temporary files
        if (directory / name).exists() and _aside(directory / name).exists():
            found.append(_aside(directory / name))  # a swap killed while removing the old copy
    return sorted(set(found))


def remove_stale(directory: Path, names: Iterable[str]) -> list:
    """Delete ``stale_entries(directory, names)``; returns what was removed.

    Only call this while no other writer can be using ``directory`` (e.g. under a run's lock).
    """
    removed = []
    for entry in stale_entries(directory, names):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except FileNotFoundError:  # pragma: no cover
                continue
        removed.append(entry)
    return removed
