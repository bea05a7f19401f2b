"""Up-front memory checks: estimate what an allocation needs and fail early, saying how much and what to do.

The budget is what this process can still get, the smallest of: ``MemAvailable`` from ``/proc/meminfo``; the
cgroup's memory limit minus its current use (containers); the address-space limit (``ulimit -v``,
``RLIMIT_AS``) minus the process's virtual size, and the data limit (``RLIMIT_DATA``) minus its data segment
(clusters set these); or on a GPU backend the device's free memory. Where none of that can be read (another OS),
nothing is checked.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

MIN_CHECKED = 64 * 2**20  # smaller allocations are not checked (reading the limits costs ~0.3 ms)


def _read_int(path: str):
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def status_bytes(field: str):
    """A ``kB`` field of ``/proc/self/status`` (``VmSize``, ``VmData``) in bytes, or None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_budget() -> tuple[int | None, str]:
    """``(bytes of host memory this process can still allocate, the limit that sets it)``; None where unknown."""
    budgets = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    budgets.append((int(line.split()[1]) * 1024, "available memory (MemAvailable)"))
                    break
    except (OSError, ValueError):
        pass
    limit = _read_int("/sys/fs/cgroup/memory.max")
    usage = _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:  # cgroup v1
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        usage = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is not None and limit < 1 << 60 and usage is not None:
        budgets.append((max(0, limit - usage), f"the container's memory limit ({_fmt(limit)}, cgroup)"))
    try:
        import resource
    except ImportError:  # not a POSIX system
        resource = None
    if resource is not None:
        for name, field, label in (("RLIMIT_AS", "VmSize", "ulimit -v"), ("RLIMIT_DATA", "VmData", "ulimit -d")):
            soft = resource.getrlimit(getattr(resource, name))[0]
            used = status_bytes(field)
            if soft not in (resource.RLIM_INFINITY, -1) and soft > 0 and used is not None:
                budgets.append((max(0, soft - used), f"the process limit {name} ({_fmt(soft)}, {label})"))
    if not budgets:
        return None, "unknown"
    return min(budgets)


def host_available() -> int | None:
    """Bytes of host memory this process can still allocate, or None where unknown."""
    return host_budget()[0]


def device_available() -> int | None:
    """Free bytes on the default JAX device when it is an accelerator that reports them, else None."""
    if jax.default_backend() == "cpu":
        return None
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def require(nbytes: int, what: str, *, hint: str, device: bool = False) -> None:
    """Raise ``ValueError`` before allocating ``nbytes`` for ``what`` if that is more than is available
    (``JASMK_MEMORY_CHECK=0`` turns the check off)."""
    if nbytes < MIN_CHECKED or os.environ.get("JASMK_MEMORY_CHECK", "1") == "0":
        return
    if device:
        avail, source = device_available(), "the device's free memory"
    else:
        avail, source = host_budget()
    if avail is not None and nbytes > avail:
        where = "device" if device else "host"
        raise ValueError(f"{what} needs {_fmt(nbytes)} of {where} memory but only {_fmt(avail)} is allowed by "
                         f"{source}; {hint}")

__all__ = ["MIN_CHECKED", "device_available", "host_available", "host_budget", "require", "status_bytes"]
