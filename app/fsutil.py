"""The app's name for the one file writer of every floor, `trainer.fsutil` (atomic
replacement through unpredictable temporaries; private files and folders for faces, events
and galleries). Nothing is implemented here: app modules import it as `app.fsutil`."""

from __future__ import annotations

from trainer.fsutil import (
    PRIVATE,
    PUBLIC,
    atomic_path,
    atomic_write,
    make_dirs,
    private_file,
    refuse_directory,
    temp_beside,
    write_bytes,
    writer_lock,
)

__all__ = ["PRIVATE", "PUBLIC", "atomic_path", "atomic_write", "make_dirs", "private_file",
           "refuse_directory", "temp_beside", "write_bytes", "writer_lock"]
