"""The data directory's permissions: what the relay stores is for the relay's user alone.

The spool, its dead letters and the warehouse hold personal data (ids, IP addresses, page
URLs), so the data directory is created ``0700`` and every file the relay creates in it
``0600``, whatever the process's umask.

The modes are explicit (``os.open(..., 0o600)``, ``mkdir`` then ``chmod``) rather than a
umask changed around creation: the umask is process-wide, and the relay runs threads and
starts child processes at any time. The child processes that create files themselves (the
spool's commit process, the warehouse process, whose engine names its own files: the
DuckDB write-ahead log, spill files) are started with umask ``077`` instead, which is safe
there: it is set in the child before it runs anything. SQLite gives ``-wal`` and ``-shm``
the mode of their database file.

Files the relay names (the spool, its lock, the warehouse) are the relay's: when they exist
with a looser mode (from an older version), they are tightened. A directory that existed
before the relay (``data_dir: /srv/shared``) may be shared with other things and is left as
it is, with one warning per directory.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Final

from tagrelay.errors import DataDirError

__all__ = [
    "CHILD_UMASK",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "ensure_writable",
    "open_private",
    "private_dir",
    "private_file",
    "tighten",
]

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE: Final = 0o700
PRIVATE_FILE_MODE: Final = 0o600
CHILD_UMASK: Final = 0o077
"""The umask of the child processes that create files in the data directory."""

_warned: set[str] = set()
"""Directories already warned about (one warning per directory per process)."""


def private_dir(path: Path, *, owned: bool = False) -> None:
    """Make sure ``path`` is a directory; the levels created here get mode 0700. An existing
    directory that others may read is tightened when ``owned`` (the relay's own directory,
    such as its cache), and otherwise left as it is, with a warning once per directory."""
    missing: list[Path] = []
    level = path
    while not level.exists():
        missing.append(level)
        if level.parent == level:
            break
        level = level.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # created meanwhile by another process or thread: not ours to tighten
        # mkdir's mode passes through the umask; chmod does not.
        os.chmod(created, PRIVATE_DIR_MODE)
    if path in missing:
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return
    if owned:
        tighten(path, PRIVATE_DIR_MODE)
    elif str(path) not in _warned:
        _warned.add(str(path))
        log.warning(
            "the directory %s is open to other users (mode %s) and the relay stores "
            "personal data in it; its files are 0600, but other users can list them: "
            "chmod 700 it",
            path,
            oct(mode),
        )


def ensure_writable(path: Path) -> None:
    """Create the data directory ``path`` if it is missing (``private_dir``) and check that
    the relay can create files in it; raise ``DataDirError`` saying what is wrong if not.
    Run before anything opens a file there, so that the operator reads "the data directory
    is not writable" rather than the first failure it causes further on."""
    try:
        private_dir(path)
        probe = path / f".write-test-{os.getpid()}"
        os.close(open_private(probe, os.O_WRONLY))
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise DataDirError(
            f"the data directory {path} is not writable: {reason}{where}. Create it writable "
            "for the relay's user, or point data_dir (or --data-dir) elsewhere"
        ) from exc


def open_private(path: Path, flags: int) -> int:
    """``os.open(path, flags | O_CREAT)`` with mode 0600, also when the file existed with a
    looser mode. Returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except PermissionError:
        _not_tightened(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it is missing; tighten it to 0600 if not."""
    os.close(open_private(path, os.O_RDONLY))


def tighten(path: Path, mode: int = PRIVATE_FILE_MODE) -> None:
    """chmod ``path`` to ``mode`` if it exists with another mode (a file of an older version
    of the relay); a file owned by another user is left as it is, with a warning."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
        if current != mode:
            os.chmod(path, mode)
    except FileNotFoundError:
        return
    except PermissionError:
        _not_tightened(path)


def _not_tightened(path: Path) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        log.warning(
            "cannot restrict %s to the relay's user (it belongs to another user); "
            "it may hold personal data: chown it to the relay's user",
            path,
        )
