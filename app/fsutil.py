"""Files the product writes: atomic replacement through unpredictable temporaries.

Every temporary is created by `tempfile.mkstemp` in the target's directory (O_CREAT|O_EXCL,
mode 0600, random name), so a symlink planted at a predictable name cannot redirect the
write; the finished file replaces the target with `os.replace`.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


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


@contextmanager
def atomic_write(path: str | Path, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Write `path` atomically: yield a binary file; on success fsync and rename it over
    `path` with permissions `mode`; on any failure the temporary is removed. Missing folders
    are made 0700 when `mode` is private (no group or other bits)."""
    dest = refuse_directory(path, "file")
    make_dirs(dest.parent, private=not mode & 0o077)
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
