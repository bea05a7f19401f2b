"""When and how JAX starts: jasmk touches no device until a computation needs one.

MASt3R runs its backbone in torch in the same process, and its DataLoader forks worker processes. Two things
follow: JAX must not start (and must not start its threads) while merely importing jasmk, building an
``ASMKMethod`` or loading a codebook; and when JAX does start on a GPU it must not preallocate 75 % of the
GPU's memory that torch needs. :func:`share_gpu_with_torch` sets XLA's allocator to grow on demand, unless the
user already chose, and only while JAX has not started yet.

:func:`float64` is the one place jasmk switches JAX to 64-bit types: for one block, on one thread, never for the
whole process.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import jax  # importing JAX starts no backend: backend_started() tells when one has

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


def float64():
    """A context in which JAX creates and computes float64 values, for this thread and this block only.

    jasmk's float64 whitening (MASt3R whitens in float64) runs inside it, also while tracing a jitted function;
    the user's ``jax_enable_x64`` setting is left alone. Uses ``jax.enable_x64`` where JAX has it and
    ``jax.experimental.enable_x64`` on older versions.
    """
    state = getattr(jax, "enable_x64", None)
    if state is not None:
        return state(True)
    from jax.experimental import enable_x64  # jax < 0.8

    return enable_x64()

def in_background(fn, *, name: str) -> threading.Thread:
    """Run ``fn()`` in a started daemon thread (a compilation ahead of need); a failure is logged, never raised:
    what it would have prepared is then made when it is needed."""
    def run():
        try:
            fn()
        except Exception:
            log.warning("the background task %s failed; its work is done when needed instead", name, exc_info=True)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


__all__ = ["backend_started", "float64", "in_background", "share_gpu_with_torch"]
