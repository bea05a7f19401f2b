"""May jasmk write a file here? The one check before any file output (pictures, score matrices, pair lists, CLI
outputs): jasmk replaces only what it could have written itself, and never writes into a checkpoint.
(Checkpoint folders have their own check, :func:`jasmk.storage.checkpoint.check_save_target`.)"""

from __future__ import annotations

import os

from .checkpoint import enclosing_checkpoint

NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_file_target(path, *, magic: bytes | None = None, what: str = "file", name: str = "out") -> str:
    """``path`` as a string, if a file may be written there; raise ``ValueError`` saying why not otherwise.

    Refused: an empty path, an existing directory or other non-file, a path inside a jasmk checkpoint, and, when
    ``magic`` is given, an existing file that does not start with it (it is not a ``what`` jasmk wrote).
    ``name`` is how the message calls the path (an argument's name).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{name} must be a non-empty path, got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"refusing to write {name} {path}: it is an existing directory")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise ValueError(f"refusing to write {name} {path}: it exists and is not a regular file")
        if magic is not None:
            with open(path, "rb") as handle:
                if handle.read(len(magic)) != magic:
                    raise ValueError(f"refusing to replace {name} {path}: it exists and is not a {what}")
    inside = enclosing_checkpoint(path)
    if inside is not None:
        raise ValueError(f"refusing to write {name} {path}: it is inside the jasmk checkpoint {inside}")
    return path


__all__ = ["NPY_MAGIC", "PNG_MAGIC", "check_file_target"]
