"""When and how JAX starts: jasmk touches no device until a computation needs one.

MASt3R runs its backbone in torch in the same process, and its DataLoader forks worker processes. Two things
follow: JAX must not start (and must not start its threads) while merely importing jasmk, building an
``ASMKMethod`` or loading a codebook; and when JAX does start on a GPU it must not preallocate 75 % of the
GPU's memory that torch needs. :func:`share_gpu_with_torch` sets XLA's allocator to grow on demand, unless the
user already chose, and only while JAX has not started yet.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
_MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
_ALLOCATOR = "XLA_PYTHON_CLIENT_ALLOCATOR"


def backend_started() -> bool:
    """Whether a JAX backend (and its thread pools) has already been initialized in this process."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - layout of a future jax
        return True
    backends = getattr(xla_bridge, "_backends", None)
    return bool(backends)


def share_gpu_with_torch() -> bool:
    """Make JAX allocate GPU memory on demand instead of preallocating most of it.

    Does nothing when the user set any of XLA's allocator variables, or when JAX has already started (the
    setting can no longer take effect). Returns whether the setting was applied.
    """
    if any(v in os.environ for v in (_PREALLOCATE, _MEM_FRACTION, _ALLOCATOR)):
        return False
    if backend_started():
        log.debug("JAX already started; its GPU preallocation setting is left as it is")
        return False
    os.environ[_PREALLOCATE] = "false"
    return True
