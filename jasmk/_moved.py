"""The module paths jasmk had before its layer packages (0.1) keep importing for one minor version.

``jasmk/<old>.py`` calls :func:`alias`, which makes the old name the very module at its new place (same object,
same attributes) and warns once, with a :class:`DeprecationWarning` attributed to the line that imported it.
"""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["alias"]


def _importer_frame():
    """The first frame outside the import machinery and this package's alias modules."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        internal = frame.f_code.co_filename.startswith("<frozen") or frame.f_globals.get("_JASMK_ALIAS") \
            or module == __name__ or module == "importlib" or module.startswith("importlib.")
        if not internal:
            return frame
        frame = frame.f_back
    return None


def alias(old: str, new: str) -> None:
    """Make the module ``old`` an alias of ``new`` and warn that it moved."""
    module = importlib.import_module(new)
    message = f"{old} moved to {new}; the old path works until jasmk 0.3"
    frame = _importer_frame()
    if frame is None:  # pragma: no cover - no Python frame imported it
        warnings.warn(message, DeprecationWarning, stacklevel=2)
    else:
        glb = frame.f_globals
        warnings.warn_explicit(message, DeprecationWarning, frame.f_code.co_filename, frame.f_lineno,
                               module=glb.get("__name__", "<unknown>"),
                               registry=glb.setdefault("__warningregistry__", {}))
    sys.modules[old] = module
