"""One run per output folder: an advisory lock on ``<folder>/.usfmae-fast.lock`` held for the
whole run by ``ingest``, ``pretrain``, ``finetune`` and ``demo`` (no torch import).

The lock is ``flock`` on the open file, so the OS drops it when its holder ends in any way,
``kill -9`` and power loss included: there is no stale lock to clean up by hand. The file
records the holder (pid, host, command, start time) for the message a second run gets, and is
emptied on a clean exit; a record found in a free lock file is a run that ended without
releasing it (killed), reported when the next run takes the folder over.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".usfmae-fast.lock"

_held: dict[str, list] = {}  # real path of a folder this process holds -> [fd, depth]
_guard = threading.Lock()


class FolderBusy(RuntimeError):
    """The output folder is in use by another run."""


def _forget_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) shares the lock's open file; closing its copy
    keeps the lock the parent's alone, so the parent's death frees it even while an orphaned
    child lives on (closing, unlike LOCK_UN, never releases the parent's lock)."""
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _record(fd: int) -> dict | None:
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return {"pid": "?", "host": "?", "command": f"unreadable record {raw[:60]!r}"}


def _describe(record: dict | None) -> str:
    if not record:
        return "pid unknown (the run is starting)"
    return (f"pid {record.get('pid')} on host {record.get('host')}, `{record.get('command')}` "
            f"since {record.get('started')}")


def _try_lock(fd: int, folder: Path) -> bool:
    """True when this process now holds ``fd``'s lock, False when another process does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without flock (some network mounts)
        if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        warnings.warn(f"{folder}: this file system cannot lock files ({exc.strerror}), so a "
                      f"second run into the same folder is not detected", RuntimeWarning,
                      stacklevel=4)
        return True


def check_free(folder) -> None:
    """Raise :class:`FolderBusy` if another run holds ``folder``; creates nothing (for checks
    made before a run decides to write, e.g. while validating its inputs)."""
    path = Path(folder) / LOCK_NAME
    if os.path.realpath(folder) in _held or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _try_lock(fd, Path(folder)):
            raise FolderBusy(_busy_message(folder, _record(fd)))
    finally:
        os.close(fd)  # also drops the lock just taken


def _busy_message(folder, record: dict | None) -> str:
    return (f"output folder {str(folder)!r} is in use by another run ({_describe(record)}); "
            f"wait for it to end or choose another folder")


@contextmanager
def output_lock(folder, command: str):
    """Hold ``folder`` (created if missing) for this run; :class:`FolderBusy` at once, naming
    the holder's pid, if another process holds it. Re-entrant within one process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd, folder):
                record = _record(fd)
                os.close(fd)
                raise FolderBusy(_busy_message(folder, record))
            if previous := _record(fd):
                warnings.warn(f"{folder}: the run before ({_describe(previous)}) ended without "
                              f"releasing the folder (killed?); this run takes it over",
                              RuntimeWarning, stacklevel=3)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[key]
                    os.ftruncate(entry[0], 0)  # a clean exit leaves no record behind
                    os.close(entry[0])  # releases the lock
