"""Files that survive a power cut: a temporary file's data made durable, then renamed into place.

A rename makes a file appear whole to every reader at once, but only to readers of the same
running system: after a power cut (or a kernel crash) a file system may hold the new name with
none of the data written before it (a zero-length ``_run.json``, a Parquet part of 0 bytes),
because the data and the rename reach the disk separately. :func:`replace_durably` forces the
data to the disk (``fsync``) before the rename and the rename itself after (``fsync`` of the
folder), so the name holds either the old file or the whole new one, whatever happens when.

Used by the run provenance (:func:`nanoscout.clients.provenance.write_json`: rewritten after
every batch of a recording), a run's Parquet parts (:class:`nanoscout.clients.runfile.RunWriter`)
and the parts of a ``measure --ray`` output (:mod:`nanoscout.batch.parts`: a part that exists
marks its file done for a resumed run).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "replace_durably"]


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a new or removed file) durable. Where the
    platform cannot open a folder (Windows) this does nothing: there the rename is its own."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # Windows: folders are not opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the written file ``tmp`` to ``path`` (same folder) once its data is on the disk,
    and make the rename durable too; OSError from the file system (``tmp`` is left to the
    caller to remove)."""
    fd = os.open(tmp, os.O_RDWR)  # writable: some platforms refuse fsync on a read-only one
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
