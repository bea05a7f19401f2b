"""A restricted unpickler for asmk 0.1.1's codebook and IVF pickles: loading one never runs code.

``pickle.load`` calls whatever callables a pickle names, so a hostile ``.pkl`` can run any command. asmk's
pickles only hold plain Python containers and numpy arrays; :class:`SafeUnpickler` admits exactly the
globals those need (numpy's array and scalar reconstruction, ``numpy.dtype`` and the builtin containers)
and refuses every other global with a ``ValueError`` before anything is called.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import pickle

import numpy as np

log = logging.getLogger(__name__)


def _numpy_attr(*candidates):
    """The first importable ``module:name`` of ``candidates`` (numpy moved ``numpy.core`` to ``numpy._core``)."""
    for candidate in candidates:
        module, name = candidate.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (``latin1`` only: no codec lookups)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise ValueError(f"refusing to unpickle _codecs.encode with encoding {encoding!r}: only latin1 bytes "
                         "are allowed")
    return text.encode("latin1")


def _allowed() -> dict:
    reconstruct = _numpy_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    scalar = _numpy_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    frombuffer = _numpy_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
    table = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core", "numpy._core"):
        if reconstruct is not None:
            table[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        if scalar is not None:
            table[(f"{module}.multiarray", "scalar")] = scalar
        if frombuffer is not None:
            table[(f"{module}.numeric", "_frombuffer")] = frombuffer
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool", "complex", "bytes",
                 "bytearray"):
        table[("builtins", name)] = getattr(__import__("builtins"), name)
        table[("__builtin__", name)] = table[("builtins", name)]
    return table


_ALLOWED = _allowed()


class SafeUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that only resolves the globals asmk's pickles need (see the module doc)."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise ValueError(f"refusing to unpickle {module}.{name}: asmk pickles hold only numpy arrays and "
                             "plain Python containers, and loading anything else could run code") from None

    def persistent_load(self, pid):
        raise ValueError("refusing to unpickle a persistent id: asmk pickles hold none")


def _load_from(handle, what: str):
    try:
        return SafeUnpickler(handle).load()
    except ValueError as exc:
        if "refusing to unpickle" in str(exc):
            raise ValueError(f"{what}: {exc}") from None
        raise ValueError(f"cannot read {what}: {exc}") from exc
    except Exception as exc:  # UnpicklingError, EOFError, struct/attribute/type errors of damaged data
        raise ValueError(f"cannot read {what}: not a valid pickle ({type(exc).__name__}: {exc})") from exc


def loads(data: bytes, *, what: str = "pickle"):
    """Unpickle ``data`` with :class:`SafeUnpickler`.

    Raises:
        ValueError: a refused global, or data that is not a complete pickle.
    """
    if not data:
        raise ValueError(f"cannot read {what}: no data")
    return _load_from(io.BytesIO(data), what)


def load(path):
    """Read the pickle file at ``path`` with :class:`SafeUnpickler`.

    Raises:
        ValueError: missing, empty, damaged or hostile file, or a directory.
    """
    path = os.fspath(path)
    what = f"pickle {path}"
    if os.path.isdir(path):
        raise ValueError(f"cannot read {what}: it is a directory")
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"cannot read {what}: {exc}") from exc
    with handle:
        try:
            empty = os.fstat(handle.fileno()).st_size == 0
        except OSError:
            empty = False
        if empty:
            raise ValueError(f"cannot read {what}: the file is empty")
        return _load_from(handle, what)


__all__ = ["SafeUnpickler", "load", "loads"]
