"""The filesystem of run folders: every read and write of a workdir goes through etils.epath, the path
layer Orbax's checkpoints use, so --workdir may be a local folder or a URL of object storage
(gs://bucket/run; s3:// and the other schemes epath knows read and write the same way).

Object storage has no folders, no renames that replace atomically, no appends and no file locks:
an object is written whole and replaces the old one whole (a reader sees the old object or the new
one). So a file of a remote workdir is written in one piece (`atomic_file`, `write_atomic`: the one
atomic writer of hwrjax, local files included), a growing log is kept in memory and written again
whole at each flush (`LineLog`, `EventFile`: a run's rows, bounded by its length), and the run lock
is local only (hwrjax.training.runlock).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from typing import IO, Any, Iterator

from etils import epath

from hwrjax.core.errors import HwrjaxError


def is_url(path: str | os.PathLike) -> bool:
    """True for a URL such as gs://bucket/run (object storage), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as it is, a local path with ~ expanded and made absolute."""
    path = os.fspath(path)
    return epath.Path(path if is_url(path) else os.path.abspath(os.path.expanduser(path)))


def absolute(path: str | os.PathLike) -> str:
    """`path` as a string: a URL as it is, a local path with ~ expanded and made absolute."""
    return os.fspath(as_path(path))


def join(folder: str | os.PathLike, *parts: str) -> str:
    """`folder`/`parts` as a string, for URLs too (os.path.join would do for both; this says which layer)."""
    return os.fspath(epath.Path(os.fspath(folder)).joinpath(*parts))


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
    """True if `path` is a folder (in object storage: a prefix that holds objects)."""
    return as_path(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
    """Creates the folder `path` and its parents (object storage needs none: this is then a no-op)."""
    as_path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    """The text of `path` as UTF-8 (undecodable bytes replaced)."""
    return read_bytes(path).decode("utf-8", errors="replace")


def remove(path: str | os.PathLike) -> None:
    as_path(path).unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file to write `path` through ("wb", or "w" for UTF-8 text): a reader sees the old file or the new
    one, never half of one; when the block fails the old file stays and nothing is left behind. Creates
    the folder.

    Locally a new temporary sibling, flushed to disk and renamed over `path` when the block ends; in
    object storage a buffer in memory, uploaded as one object when the block ends (an upload is only
    committed when complete). The file gets the permissions a plain `open` would give.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        buffer = io.BytesIO() if mode == "wb" else io.StringIO()
        yield buffer
        data = buffer.getvalue()
        target.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        # "x": a new file of our own (never one a concurrent writer made), with the umask's permissions.
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> str:
    """Writes `data` (text as UTF-8) to `path` atomically (see `atomic_file`); returns `path`."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else bytes(data))
    return os.fspath(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> str:
    """Writes `obj` as indented JSON to `path` atomically (see `write_atomic`); returns the path."""
    return write_atomic(path, json.dumps(obj, indent=2))


class LineLog:
    """A text file that grows by lines (metrics.jsonl): locally an append-mode file flushed per line;
    in object storage, which cannot append, the text is kept in memory and the object written again
    whole at each `write` (the file of one run: bounded by its rows)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = None
        self._text: list[str] | None = None
        if is_url(self.path):
            target = as_path(self.path)
            self._text = [read_text(target)] if target.exists() else []
        else:
            makedirs(os.path.dirname(absolute(self.path)))
            self._file = open(absolute(self.path), "a", encoding="utf-8")

    def write(self, line: str) -> None:
        """Adds `line` (and a newline) to the file, flushed."""
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        elif self._text is not None:
            self._text.append(line + "\n")
            as_path(self.path).write_text("".join(self._text))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._text = None, None


class EventFile:
    """A TensorBoard event file in object storage, for tensorboardX (`register_tensorboard_scheme`):
    the records are kept in memory and the object written whole at each flush."""

    def __init__(self, path: str):
        self.path = path
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        as_path(self.path).write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        if self._buffer is not None:
            self.flush()
            self._buffer = None


class _EventFiles:
    """A tensorboardX writer factory: event files of a URL logdir go through epath."""

    def open(self, path: str) -> EventFile:
        return EventFile(path)

    def directory_check(self, path: str) -> None:
        makedirs(path)


def register_tensorboard_scheme(logdir: str | os.PathLike) -> None:
    """Makes tensorboardX write the event files of `logdir` through epath when it is a URL (its own
    writers cover gs:// and s3:// only, through other client libraries and their own credentials)."""
    logdir = os.fspath(logdir)
    if is_url(logdir):
        from tensorboardX import record_writer

        record_writer.register_writer_factory(logdir.split("://", 1)[0], _EventFiles())


def check_new_output(output: str, flag: str, error: type[Exception] = HwrjaxError, folder_ok: bool = False) -> str:
    """The absolute path of a local output about to be created (export's file, finetune's workdir), checked
    before any work: nothing may be there yet (with `folder_ok`, an empty folder may), and its parent
    folder is created and must be writable. Raises `error` with one line naming `flag` otherwise."""
    path = os.path.abspath(os.path.expanduser(os.fspath(output)))
    if folder_ok and os.path.isdir(path):
        if os.listdir(path):
            raise error(f"{path} already exists and is not empty; pass a new {flag} (nothing is ever overwritten)")
    elif folder_ok and os.path.lexists(path):
        raise error(f"{path} exists and is not a folder; pass a new {flag}")
    elif os.path.lexists(path):
        raise error(f"{path} already exists; pass a new {flag} (an existing one is never overwritten)")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {parent} ({e.strerror}); pass an {flag} you can write to") from e
    if not os.access(parent, os.W_OK):
        raise error(f"{parent} is not writable; pass an {flag} you can write to")
    return path
