"""Checks of the output directory.

:class:`OutputDirLock` holds the directory for one run (a second live run gets
:class:`OutputDirInUseError`; stale locks of crashed runs are taken over; temporary files of
interrupted saves are removed), and :func:`explain_write_error` turns a write error of a
full, read-only or forbidden file system into one naming the file and the fix.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
from typing import List, Optional

from .names import YACS

__all__ = [
    "OutputDirInUseError",
    "OutputDirLock",
    "explain_write_error",
]

logger = logging.getLogger(__name__)


# Write errors whose cause is the file system, not the data being written.
_FS_ERRNOS = {
    errno.ENOSPC: "the file system is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


def explain_write_error(path: str, error: BaseException) -> Optional[OSError]:
    """An OSError naming ``path`` and the fix if ``error`` (or an exception it was raised
    while handling, such as torch.save's RuntimeError after a failed write) comes from a full,
    read-only or forbidden file system; None otherwise."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FS_ERRNOS:
            directory = os.path.dirname(os.path.abspath(path))
            free = ""
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(directory).free / 2**20
                free = f" ({free:.0f} MiB free there without the partial file)"
            return OSError(
                seen.errno,
                f"Cannot write {path}: {_FS_ERRNOS[seen.errno]}{free}; {path} is unchanged. "
                f"Make room or fix the permissions of {directory}, or point "
                "the output (OUTPUT_DIR / train.output_dir, --output) to another directory; "
                "then resume.",
            )
        seen = seen.__cause__ or seen.__context__
    return None


class OutputDirInUseError(RuntimeError):
    """Another live run holds the output directory."""


# Temporary files of rev_det.checkpoint.atomic_open: ".<name>.<8 hex digits>.tmp".
_TMP_FILE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
_LOCK_FILE = "run.lock"


class OutputDirLock:
    """Hold an output directory for one run: ``with OutputDirLock(cfg.OUTPUT_DIR): ...``.

    The lock is ``<directory>/run.lock``, held with ``fcntl.flock`` (the kernel releases it when
    the process ends, however it ends) and holding a line that describes the run (pid, host,
    start time, command) for the message another run gets. On exit the file is removed. A file
    left by a run that was killed or crashed is not locked by anyone: it is taken over, and
    :meth:`tidy` logs it. A second run while the first is alive raises
    :class:`OutputDirInUseError` naming the directory and the running process.

    Args:
        directory: the output directory (created if missing).
        setting: its setting's name, for messages (``OUTPUT_DIR``, ``train.output_dir``).
        enabled: False in processes other than the main one, which only share the directory.
    """

    def __init__(self, directory: str, setting: str = YACS.output_dir, enabled: bool = True):
        self.directory, self.setting, self.enabled = directory, setting, enabled
        self.path = os.path.join(directory, _LOCK_FILE)
        self.previous: Optional[str] = None
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputDirLock":
        if self.enabled and self.directory:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = _read_fd(fd)
                    os.close(fd)
                    raise OutputDirInUseError(
                        f"{self.setting} {os.path.abspath(self.directory)} is in use by another "
                        f"run: {_describe_owner(owner)}. Its checkpoints, metrics and logs would "
                        f"mix with this run's. Wait for it to end (or stop it), or set "
                        f"{self.setting} to another directory."
                    ) from None
                # The previous holder removes the file on release: if it did so after we opened
                # it, we hold a lock on a file no longer in the directory; open it again.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                self.previous = _read_fd(fd) or None
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(_this_run()) + "\n").encode(), 0)
                os.fsync(fd)
                self._fd = fd
        except OSError as e:
            raise OSError(
                e.errno,
                f"{self.setting} {os.path.abspath(self.directory)} cannot be written "
                f"({e.strerror or e}): training writes its checkpoints, metrics and logs there. "
                f"Choose a writable directory with free space for {self.setting}.",
            ) from e

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still locked, so that no other run can lock this file meanwhile.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            # A run ending on an error (e.g. its directory was made read-only while it trained)
            # must report that error, not this one: the lock ends with the file descriptor.
            logger.warning(
                "Could not remove %s (%s). It holds no lock once this run ends; the next run in "
                "%s takes it over (or remove it by hand).",
                self.path,
                e.strerror or e,
                self.directory,
            )
        finally:
            os.close(self._fd)
            self._fd = None

    def tidy(self) -> List[str]:
        """Log a taken-over stale lock and remove temporary files of interrupted checkpoint
        saves (``.<name>.<hex>.tmp``); call it once logging is set up. Returns their names."""
        if self._fd is None:
            return []
        if self.previous:
            logger.warning(
                "%s %s had a lock of a run that did not end cleanly (%s; it holds no lock, so "
                "it was killed or crashed); this run takes the directory over.",
                self.setting,
                self.directory,
                _describe_owner(self.previous),
            )
        removed = []
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if _TMP_FILE.match(name) and os.path.isfile(path):
                size = os.path.getsize(path)
                os.unlink(path)
                removed.append(f"{name} ({size / 2**20:.1f} MiB)")
        if removed:
            logger.warning(
                "Removed %d temporary files left in %s by interrupted checkpoint saves: %s.",
                len(removed),
                self.directory,
                ", ".join(removed),
            )
        return removed


def _this_run() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _read_fd(fd: int) -> str:
    return os.pread(fd, 65536, 0).decode(errors="replace").strip()


def _describe_owner(text: str) -> str:
    try:
        run = json.loads(text)
        return (
            f"pid {run['pid']} on host {run['host']}, started {run['started']}, "
            f"command: {run['command']}"
        )
    except (ValueError, KeyError, TypeError):
        return f"lock file content {text[:200]!r}"
