"""Atomic file writes: a file appears complete at its path or not at all.

Every file jasmk writes (pickles for asmk, ``.npy`` / ``.npz`` results, pair lists, pictures) goes through
:func:`replacing`: the content is written to a temporary file in the destination folder, synced to disk, and
renamed over the path with ``os.replace``; on any error the temporary file is removed and the path is left as it
was. Checkpoint folders have their own versioned scheme (:mod:`jasmk.checkpoint`). Whether a path may be
replaced at all is the caller's check, made before the work.
"""

from __future__ import annotations

import contextlib
import os
import uuid


@contextlib.contextmanager
def replacing(path, *, suffix: str = ""):
    """Yield a fresh temporary path next to ``path``; when the block succeeds, sync it and rename it to ``path``.

    ``suffix`` ends the temporary name (writers that pick a format from the name, e.g. ``.npy``). The file gets
    the usual mode for new files (0666 less the umask).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}{suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_with(path, save, *, suffix: str = "") -> None:
    """Write ``path`` atomically through ``save(handle)`` on a new binary file."""
    with replacing(path, suffix=suffix) as tmp:
        with open(tmp, "xb") as handle:
            save(handle)

__all__ = ["replacing", "write_bytes_with"]
