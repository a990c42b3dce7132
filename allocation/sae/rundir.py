"""The run directory (``allocation train --out DIR``): who may write it, and when.

Rules, checked before any training work:

- DIR must be a directory we can create and write (not a file, not read-only).
- A fresh run refuses a DIR that holds anything (``.lock`` and killed writers' temporaries aside):
  continue the run there with ``--resume`` or replace it with ``--overwrite``, which deletes the
  run's own entries (``RUN_ENTRIES`` and their temporary siblings) and nothing else.
- One writer at a time: a writer holds an exclusive ``flock`` on ``DIR/.lock`` (which records its
  PID) while it writes, and removes the file when done; a second process is refused, naming that
  PID. The kernel drops the lock when its holder dies, so a killed run never blocks the next one
  (the file it leaves is not locked, and is ignored).
- Under the lock, temporary files and staging directories a killed writer left behind (only for
  the run's own entries, matched by name) are removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import AllocationError
from .atomic import remove_stale, stale_entries

LOCK_FILE = ".lock"
RUN_ENTRIES = ("checkpoint", "metrics.jsonl", "summary.json", "saelens")


class RunDirectoryError(AllocationError):
    """The run directory cannot be used as asked (not writable, holds a run, or is busy)."""


class RunDirectory:
    """One run's output directory: checks, the writer's lock, cleanup of stale temporaries."""

    def __init__(self, path: os.PathLike) -> None:
        self.path = Path(path)
        self._lock_handle: Optional[int] = None
        self._depth = 0

    # ------------------------------------------------------------------------------ checks
    def check_writable(self) -> None:
        """Create DIR (and parents) if needed and prove a file can be written there."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"--out {str(path)!r} is a file, not a directory; pass a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            reason = error.strerror or str(error)
            raise RunDirectoryError(
                f"--out {str(path)!r} is not writable ({reason}); choose a directory you can write to"
            ) from None

    def entries(self) -> list:
        """Everything in DIR but the lock file and the temporaries killed writers left (garbage)."""
        if not self.path.is_dir():
            return []
        ignored = {LOCK_FILE} | {entry.name for entry in stale_entries(self.path, RUN_ENTRIES)}
        return sorted(entry.name for entry in self.path.iterdir() if entry.name not in ignored)

    def check_fresh(self, describe_run=None) -> None:
        """Refuse a DIR that is not empty; ``describe_run()`` may say what run it holds."""
        entries = self.entries()
        if not entries:
            return
        held = describe_run() if describe_run is not None else None
        what = held or f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({', '.join(entries[:4])}"
        what += "" if held else (", ...)" if len(entries) > 4 else ")")
        raise RunDirectoryError(
            f"--out {str(self.path)!r} is not empty: it holds {what}. Pass --resume to continue the run "
            "there, --overwrite to replace it, or an empty --out "
            "(in Python: Trainer.resume(out), or Trainer(..., overwrite=True))"
        )

    def clear_run(self) -> None:
        """Delete the run's own entries (and their temporaries); other files stay. Call under the lock."""
        for name in RUN_ENTRIES:
            entry = self.path / name
            aside = self.path / f".{name}.old"
            for path in (entry, aside):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        self.remove_stale()

    def remove_stale(self) -> list:
        """Temporary files / staging directories of killed writers (the run's entries only)."""
        return remove_stale(self.path, RUN_ENTRIES)

    # ------------------------------------------------------------------------------ the lock
    @contextmanager
    def locked(self) -> Iterator["RunDirectory"]:
        """Hold the writer's lock (re-entrant within this object); refuse if another process holds it."""
        if self._depth == 0:
            self._acquire()
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    def _acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK_FILE
        while True:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_pid(handle)
                os.close(handle)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                who = f"process {holder}" if holder else "another process"
                raise RunDirectoryError(
                    f"--out {str(self.path)!r} is in use: {who} is writing it (lock {str(lock_path)!r}); "
                    "wait for it to finish or choose another --out"
                ) from None
            if _same_file(handle, lock_path):
                break
            os.close(handle)  # the previous holder removed the file we locked: lock the current one
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        self._lock_handle = handle
        self.remove_stale()

    def _release(self) -> None:
        handle, self._lock_handle = self._lock_handle, None
        if handle is not None:
            try:
                os.unlink(self.path / LOCK_FILE)  # while still locked: no one else holds this file
            except FileNotFoundError:  # pragma: no cover
                pass
            fcntl.flock(handle, fcntl.LOCK_UN)
            os.close(handle)


def _same_file(handle: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except FileNotFoundError:
        return False


def _read_pid(handle: int) -> Optional[int]:
    try:
        text = os.pread(handle, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
