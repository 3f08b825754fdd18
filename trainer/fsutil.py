"""The one file writer of every floor (trainer, engine, app): atomic replacement through
unpredictable temporaries, and private folders and files for what names people.

Every temporary is created by `tempfile.mkstemp` in the target's directory (O_CREAT|O_EXCL,
mode 0600, random name), so a symlink planted at a predictable name cannot redirect the
write and two writers never share one; the finished file is fsynced and replaces the target
with `os.replace`, so a reader sees the old file or the new one, never a part. It sits on the
bottom floor (part of `trainer.CONTRACT`) so that the engine and the app use it too;
`app.fsutil` is the app's name for it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

PRIVATE = 0o600  # faces, events, galleries, keys
PUBLIC = None  # what the umask allows (0o666 & ~umask): models, engines, manifests, checkpoints


def refuse_directory(path: str | Path, what: str) -> Path:
    """`path` as a Path; OSError (one line) when it names an existing directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise IsADirectoryError(f"cannot write {what} {p}: it is a directory")
    return p


def private_file(fd: int, what: str) -> None:
    """An opened file that names people stays private: a regular file must be ours and gets
    mode 0600 (a group/other bit left by whoever made it is removed); OSError (one line)
    otherwise. Devices and pipes (/dev/stdout) are written as they are."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return
    if st.st_uid != os.geteuid():
        raise OSError(f"cannot write {what}: it belongs to another user (uid {st.st_uid})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o600)


def make_dirs(path: str | Path, private: bool = True) -> None:
    """Create `path` and its missing parents; each one created here is 0700 when `private`
    (faces, events, galleries), so no other user can list what is inside. Existing
    directories keep their permissions."""
    missing, p = [], Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700 if private else 0o777, exist_ok=True)


def temp_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """(open descriptor, path) of a new private temporary file next to `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    return fd, Path(tmp)


def _file_mode(mode: int | None) -> int:
    """`mode`, or for PUBLIC what the umask allows a new file."""
    if mode is not None:
        return mode
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _prepare(path: str | Path, mode: int) -> Path:
    """The destination, its missing folders made (0700 when `mode` is private)."""
    dest = refuse_directory(path, "file")
    make_dirs(dest.parent, private=not mode & 0o077)
    return dest


@contextmanager
def atomic_write(path: str | Path, mode: int | None = PRIVATE) -> Iterator[BinaryIO]:
    """Write `path` atomically: yield a binary file; on success fsync and rename it over
    `path` with permissions `mode` (PUBLIC: as the umask allows); on any failure the
    temporary is removed. Missing folders are made 0700 when `mode` is private (no group or
    other bits)."""
    mode = _file_mode(mode)
    dest = _prepare(path, mode)
    fd, tmp = temp_beside(dest)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if mode != 0o600:
                os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path, mode: int | None = PRIVATE, suffix: str = ".tmp"
                ) -> Iterator[Path]:
    """`atomic_write` for writers that take a file name (torch.onnx.export, onnx.save): yield
    the path of a new private temporary beside `path` (ending in `suffix`, for writers that
    look at it); once the writer is done it gets `mode`, is fsynced and replaces `path`."""
    mode = _file_mode(mode)
    dest = _prepare(path, mode)
    fd, tmp = temp_beside(dest, suffix)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            if mode != 0o600:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, mode: int | None = PRIVATE) -> None:
    """`data` written to `path` atomically (`atomic_write`)."""
    with atomic_write(path, mode) as fh:
        fh.write(data)


@contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the exclusive lock (flock on `<path>.lock`, 0600, never a followed symlink) that
    every writer of `path` takes: the daemon's appends and rotations of an events file and an
    erasure's rewrite of it, in any process or thread, so a line is never appended to a file
    that is being replaced. Each holder opens its own descriptor: threads of one process
    exclude each other too."""
    import fcntl

    lock = Path(path).expanduser()
    lock = lock.with_name(lock.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
