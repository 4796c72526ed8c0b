"""One run per workdir: an exclusive lock on WORKDIR/run.lock held for the life of a run.

The lock is an flock (fcntl module), so the kernel drops it when its process ends, however it ends: a
lock file left by a killed run never blocks the next one. The file names the holder
(pid, host, start time) for the message a second launch gets.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from hwrjax.core.errors import CheckpointError, WorkdirBusy
from hwrjax.training import storage

LOCK_NAME = "run.lock"


class RunLock:
    """A held workdir lock; `release` (or the end of the process) lets the next run in."""

    def __init__(self, path: str, fd: int | None):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (the file stays; its contents are only read while it is locked)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops its fcntl lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"process {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def acquire(workdir: str) -> RunLock:
    """Takes WORKDIR's run lock or raises WorkdirBusy naming the process that holds it.

    A workdir in object storage (a URL such as gs://bucket/run) is not locked: object storage has no
    lock a killed run would give back (a marker object would shut out the resume after a preemption).
    That is said in one warning; keeping to one run per such workdir is then the user's part.
    """
    if storage.is_url(workdir):
        logging.warning("%s is in object storage, which has no file locks: it is not locked against a second "
                        "run; start only one run per workdir there.", workdir)
        return RunLock("", None)
    path = os.path.join(workdir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot create the lock file {path} ({e.strerror}); pass a --workdir you can "
                              "write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise WorkdirBusy(f"{workdir} is in use by another run ({holder}); wait for it to end or use "
                              "another --workdir") from None
        raise CheckpointError(f"cannot lock {path} ({e.strerror}); use a --workdir on a local or "
                              "lock-capable filesystem") from None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    return RunLock(path, fd)
