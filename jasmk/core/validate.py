"""Input checks shared by the public functions: bad input raises ``ValueError`` saying what was wrong."""

from __future__ import annotations

import numpy as np


def descriptors(vecs, *, name: str = "descriptors", dim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Return ``vecs`` as a C-contiguous ``[N, D] float32`` host array after checking it.

    Raises:
        ValueError: not 2-D, empty, wrong dim, or holding NaN/inf.
    """
    try:
        x = np.asarray(vecs)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} could not be read as an array: {exc}") from exc
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be a numeric [N, D] array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {x.shape}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {x.shape}): nothing to work on")
    if x.shape[1] == 0:
        raise ValueError(f"{name} have zero dimensions (shape {x.shape})")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]} but the codebook has dimension {dim}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    # a finite sum proves every value finite (NaN/inf propagate); only an overflowing sum needs the full check
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(x)
    if not np.isfinite(total) and not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{name} contain NaN or inf values (rows {bad[:5].tolist()}{'...' if bad.size > 5 else ''})")
    return x


def image_ids(ids, n: int, *, name: str = "image ids", wide: bool = False) -> np.ndarray:
    """Return ``ids`` as an ``[N] int64`` array after checking it matches ``n`` descriptors and is grouped.

    Image ids must be non-negative integers in non-decreasing order (all descriptors of an image
    next to each other, images in ascending id order), as asmk requires; below ``2**31 - 1``, or with ``wide``
    (ids that name images of an index) below ``2**63 - 1``.
    """
    top, top_text = (2**63 - 1, "2**63 - 1") if wide else (2**31 - 1, "2**31 - 1")
    a = np.asarray(ids)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries but there are {n} descriptors")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and (a == np.round(a)).all():
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    if a.size and a.dtype.kind == "u" and int(a.max()) >= top:
        raise ValueError(f"{name} must be below {top_text}, got {a.max()}")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {a.min()}")
    if a.size > 1 and (np.diff(a) < 0).any():
        pos = int(np.flatnonzero(np.diff(a) < 0)[0])
        raise ValueError(
            f"{name} are not grouped in ascending order (id {a[pos]} at position {pos} is followed by {a[pos + 1]}); "
            "sort the descriptors by image id"
        )
    if a.size and a.max() >= top:
        raise ValueError(f"{name} must be below {top_text}, got {a.max()}")
    return a


def multiple_assignment(ma, n_words: int) -> int:
    if isinstance(ma, bool) or not isinstance(ma, (int, np.integer)):
        raise ValueError(f"multiple_assignment must be an int, got {ma!r}")
    if not 1 <= int(ma) <= n_words:
        raise ValueError(f"multiple_assignment must be between 1 and the codebook size {n_words}, got {ma}")
    return int(ma)


def word_ids(ids, n: int, n_words: int, ma: int) -> np.ndarray:
    """Return precomputed word assignments as ``[N, MA] int32`` after checking shape and range."""
    a = np.asarray(ids)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != n:
        raise ValueError(f"word_ids must be [{n}, MA], got shape {np.shape(ids)}")
    if a.shape[1] != ma:
        raise ValueError(f"word_ids hold {a.shape[1]} assignments per descriptor but multiple_assignment is {ma}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"word_ids must be integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= n_words):
        raise ValueError(f"word_ids must lie in [0, {n_words}), got range [{a.min()}, {a.max()}]")
    return a.astype(np.int32)


def is_int(value) -> bool:
    """Whether ``value`` is an integer (Python or numpy) and not a bool: the one test for counts, sizes, seeds."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def finite_number(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v

__all__ = ["descriptors", "finite_number", "image_ids", "is_int", "multiple_assignment", "word_ids"]
