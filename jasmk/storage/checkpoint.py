"""Persistence: crash-safe Orbax checkpoints of PyTrees (codebook, index, head parameters) and asmk pickle
import/export.

A checkpoint is a directory::

    CURRENT              {"format": "jasmk-checkpoint-3", "version": "v-<hex>"}: the live version
    v-<hex>/arrays/      the Orbax-saved arrays
    v-<hex>/meta.json    kind, static fields, format, dtype/shape/crc32 of every array, the size (crc32 for
                         small ones) of every file of the array store, and the stores the version uses
    s-<hex>/<name>.npy   a store: immutable arrays (a segment's postings, a codebook) shared between versions
    .lock                present while a save runs (holds the writer's pid)

A save writes a new ``v-<hex>`` folder (and the stores it does not share with the live version), fsyncs them,
then replaces ``CURRENT`` with ``os.replace`` (atomic), then deletes older versions and the stores no live
version names (Lucene-style commits: an index saved over its own earlier checkpoint writes only the segments
made since). At every instant the directory holds the old or the new complete checkpoint,
and a crash leaves at worst unreferenced folders that the next save deletes. Saves never replace anything
that is not a jasmk checkpoint of the same kind. Loads check the format version and every array's checksum.
Checkpoints of the first format (``arrays/`` and ``meta.json`` directly in the directory) still load, and
saving over one converts it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
import weakref
import zlib

import jax
import numpy as np

from ..core import ivf as ivf_mod
from ..core.codebook import Codebook
from . import index_format
from .asmk_format import export_asmk_ivf, load_asmk_codebook, load_asmk_ivf  # noqa: F401 (0.1 names)

log = logging.getLogger(__name__)

_FORMAT = "jasmk-checkpoint-2"  # one array store per version (codebooks, heads, sharded indexes)
_STORES_FORMAT = "jasmk-checkpoint-3"  # versions that also name shared stores (indexes: compact ids, stores)
_FORMATS = (_FORMAT, _STORES_FORMAT)
_LEGACY_FORMAT = "jasmk-checkpoint-1"
_FORMAT_PREFIX = "jasmk-checkpoint-"
_POINTER = "CURRENT"
_LOCK = ".lock"
_META = "meta.json"
_ARRAYS = "arrays"
_VERSION_RE = re.compile(r"^v-[0-9a-f]{32}$")
_STORE_RE = re.compile(r"^s-[0-9a-f]{32}$")
_STORE_ARRAY_RE = re.compile(r"^[a-z_]{1,32}$")
_POINTER_TMP_RE = re.compile(r"^CURRENT\.tmp-[0-9a-f]{32}$")
_RESERVED_META = ("format", "arrays", "files")
_READ_ATTEMPTS = 5

#: seconds a save waits for another save of the same checkpoint before giving up
LOCK_TIMEOUT = 60.0
#: a lock file without a readable pid is taken over once it is this many seconds old
_LOCK_UNREADABLE_STALE_S = 10.0


def _crash_point(step: str) -> None:
    """Called between the steps of a save; does nothing (tests replace it to inject crashes or read along)."""


# ---------------------------------------------------------------------------------------------------------
# what is at a path


def _read_json(path):
    with open(path) as handle:
        return json.load(handle)


def _pointer_text(folder):
    """The raw ``CURRENT`` text of ``folder``, or None."""
    try:
        with open(os.path.join(folder, _POINTER)) as handle:
            return handle.read()
    except OSError:
        return None


def _parse_pointer(folder, text):
    try:
        pointer = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt checkpoint pointer {os.path.join(folder, _POINTER)}: {exc}") from exc
    if not isinstance(pointer, dict) or not isinstance(pointer.get("format"), str) \
            or not pointer["format"].startswith(_FORMAT_PREFIX):
        raise ValueError(f"{folder} is not a jasmk checkpoint (bad {_POINTER} file)")
    _check_format(folder, pointer["format"], _FORMATS)
    version = pointer.get("version")
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"corrupt checkpoint pointer {os.path.join(folder, _POINTER)}: bad version {version!r}")
    return version


def _check_format(where, found, expected):
    if found not in ((expected,) if isinstance(expected, str) else expected):
        raise ValueError(f"checkpoint {where} has format version {found!r}; this jasmk reads "
                         f"{', '.join(map(repr, _FORMATS))} (and the older {_LEGACY_FORMAT!r}): a newer jasmk "
                         "wrote it, upgrade jasmk to read it")


def _version_dir(path) -> str:
    """The folder holding ``arrays/`` and ``meta.json`` of the live checkpoint at ``path`` (either layout)."""
    path = os.path.abspath(os.fspath(path))
    text = _pointer_text(path)
    if text is None:
        return path
    return os.path.join(path, _parse_pointer(path, text))


def _checkpoint_kind(folder):
    """``(True, kind)`` if ``folder`` holds a jasmk checkpoint (either layout), ``(False, None)`` if not.

    Raises:
        ValueError: a jasmk checkpoint whose kind cannot be told (damaged) or of another format version.
    """
    if os.path.isfile(os.path.join(folder, _POINTER)):
        version = _parse_pointer(folder, _pointer_text(folder) or "")
        try:
            meta = _read_json(os.path.join(folder, version, _META))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot tell what the checkpoint {folder} holds: {exc}") from exc
        return True, meta.get("kind") if isinstance(meta, dict) else None
    meta_path = os.path.join(folder, _META)
    if os.path.isfile(meta_path):
        try:
            meta = _read_json(meta_path)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return False, None
        if isinstance(meta, dict) and isinstance(meta.get("format"), str) \
                and meta["format"].startswith(_FORMAT_PREFIX):
            _check_format(folder, meta["format"], _LEGACY_FORMAT)
            return True, meta.get("kind")
    return False, None


def checkpoint_kind(path):
    """What the jasmk checkpoint at ``path`` holds (``"codebook"``, ``"index"``, ``"sharded-index"``,
    ``"head"``), or None where ``path`` is no jasmk checkpoint.

    Raises:
        ValueError: a jasmk checkpoint whose kind cannot be told (damaged) or of another format version.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        return None
    is_ckpt, kind = _checkpoint_kind(path)
    return kind if is_ckpt else None


# the first bytes of the files users hand to a checkpoint loader by mistake, and what reads each
_OTHER_FORMATS = (
    (b"\x80", "it is a pickle: asmk's codebook .pkl is read by jasmk.storage.asmk_format.load_asmk_codebook (or "
              "passed as build_index(codebook=path)), asmk's IVF .pkl by load_asmk_ivf"),
    (b"\x89HDF\r\n\x1a\n", "it is an HDF5 file: hloc's features.h5 is read by jasmk.storage.hloc.read_features"),
    (b"\x93NUMPY", "it is a .npy array: np.load reads it; jasmk.train_codebook / build_index take the arrays"),
    (b"PK\x03\x04", "it is a zip archive (an .npz?): np.load reads it"),
)


def what_file(path) -> str:
    """Why ``path`` is no jasmk checkpoint, in words, naming the function that reads it where it is a file of
    another format jasmk knows (asmk's pickles, hloc's HDF5, numpy's files)."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return "nothing is there"
    if not os.path.isfile(path):
        return "it is not a directory"
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        return f"a file that cannot be read: {exc}"
    for magic, hint in _OTHER_FORMATS:
        if head.startswith(magic):
            return f"a file, not a checkpoint directory; {hint}"
    return "a file, not a checkpoint directory"


def _is_leftover(folder, name) -> bool:
    """Whether ``name`` in ``folder`` is something a jasmk save creates (a lock, an unpublished version)."""
    if name == _LOCK or _POINTER_TMP_RE.match(name):
        return True
    return bool(_VERSION_RE.match(name) or _STORE_RE.match(name)) and os.path.isdir(os.path.join(folder, name))


def enclosing_checkpoint(path):
    """The jasmk checkpoint directory that ``path`` lies inside (not counting ``path`` itself), or None."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    while True:
        try:
            if _checkpoint_kind(folder)[0]:
                return folder
        except ValueError:
            return folder
        up = os.path.dirname(folder)
        if up == folder:
            return None
        folder = up


def check_save_target(path, *, kind=None) -> str:
    """Check that a checkpoint of ``kind`` may be saved at ``path`` without destroying anything.

    Allowed: a missing path, an empty directory (or one holding only what a crashed jasmk save left), or a
    jasmk checkpoint of the same kind (which the save replaces).

    Returns:
        The absolute path.

    Raises:
        ValueError: an empty path, an existing file, a non-empty directory that is not a jasmk checkpoint,
            a checkpoint of another kind or format version, or a path inside a checkpoint.
    """
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) in ("", b""):
        raise ValueError(f"checkpoint path must be a non-empty path, got {path!r}")
    path = os.path.abspath(os.fspath(path))
    inside = enclosing_checkpoint(path)
    if inside is not None:
        raise ValueError(f"refusing to save a checkpoint at {path}: it is inside the jasmk checkpoint {inside}")
    if not os.path.lexists(path):
        return path
    if not os.path.isdir(path):
        raise ValueError(f"refusing to save a checkpoint at {path}: a file is there (only a jasmk checkpoint "
                         "of the same kind or an empty directory is replaced)")
    try:
        is_ckpt, found = _checkpoint_kind(path)
    except ValueError as exc:
        raise ValueError(f"refusing to save a checkpoint at {path}: {exc}") from None
    if is_ckpt:
        if found != kind:
            raise ValueError(f"refusing to save a {kind!r} checkpoint at {path}: it holds a {found!r} checkpoint")
        return path
    others = [name for name in os.listdir(path) if not _is_leftover(path, name)]
    if others:
        raise ValueError(f"refusing to save a checkpoint at {path}: it is a non-empty directory that is not a "
                         f"jasmk checkpoint (holds {sorted(others)[:5]})")
    return path


# ---------------------------------------------------------------------------------------------------------
# locking, syncing, cleaning


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def _take_over_if_stale(lock) -> bool:
    """Delete ``lock`` if the process that wrote it is gone; True if it was deleted (or vanished)."""
    try:
        st = os.stat(lock)
        with open(lock) as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        pid = int(text)
    except ValueError:
        pid = None
    if pid is not None and _pid_alive(pid):
        return False
    if pid is None and time.time() - st.st_mtime < _LOCK_UNREADABLE_STALE_S:
        return False  # being written right now
    try:
        now = os.stat(lock)
        if (now.st_ino, now.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
            return False  # replaced meanwhile by a live writer
        os.unlink(lock)
    except FileNotFoundError:
        return True
    log.warning("took over the stale lock %s (its writer, pid %s, is gone)", lock, pid)
    return True


def _lock(folder, timeout: float) -> str:
    lock = os.path.join(folder, _LOCK)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _take_over_if_stale(lock):
                continue
            if time.monotonic() >= deadline:
                try:
                    with open(lock) as handle:
                        owner = handle.read().strip()
                except OSError:
                    owner = "?"
                raise ValueError(f"checkpoint {folder} is being saved by another process: the lock {lock} "
                                 f"(pid {owner}) was not released within {timeout:g} s; if no save is running, "
                                 "delete that lock file") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
            continue
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return lock


def _unlock(lock) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock)


def _fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder) -> None:
    """fsync every file and directory under ``folder`` (Orbax does not)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _write_synced(path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _discard(folder, pointer_tmp) -> None:
    """Remove an unpublished version folder and pointer temporary (best effort)."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(pointer_tmp)


def _collect_garbage(path, *, keep=None) -> None:
    """Delete what earlier saves left in ``path``: unreferenced versions, pointer temporaries, and the
    first-format ``arrays/`` + ``meta.json`` once a pointer exists. Runs under the lock."""
    text = _pointer_text(path)
    live = _parse_pointer(path, text) if text is not None else None
    used = set()
    for version in (live, keep):
        if version is not None:
            used.update(_store_names(os.path.join(path, version)))
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if _POINTER_TMP_RE.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
        elif _VERSION_RE.match(name) and name not in (live, keep) and os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
            _crash_point("old-version-removed")
        elif _STORE_RE.match(name) and name not in used and os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
            _crash_point("old-store-removed")
    if live is not None:
        if os.path.isfile(os.path.join(path, _META)):
            os.unlink(os.path.join(path, _META))
            _crash_point("legacy-meta-removed")
        if os.path.isdir(os.path.join(path, _ARRAYS)):
            shutil.rmtree(os.path.join(path, _ARRAYS), ignore_errors=True)
    _fsync_dir(path)


# ---------------------------------------------------------------------------------------------------------
# checksums


def _json_scalar(value):
    """``json.dumps`` fallback: numpy scalars and 0-d arrays become Python numbers; anything else is an error."""
    if isinstance(value, np.generic) or (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0):
        return np.asarray(value).item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _key_name(key_path) -> str:
    """``"a/0/b"`` for a PyTree key path: the same for dicts, sequences and dataclass fields, since Orbax
    restores custom nodes as plain dicts and lists."""
    parts = []
    for entry in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _array_table(arrays) -> dict:
    """``{key: {"dtype", "shape", "crc32"}}`` for every leaf of ``arrays`` (numpy arrays)."""
    table = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
        a = np.ascontiguousarray(leaf)
        table[_key_name(key_path)] = {"dtype": str(a.dtype), "shape": list(a.shape),
                                                 "crc32": zlib.crc32(a) if a.size else 0}
    return table


def _verify_arrays(where, tree, table) -> None:
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"corrupt checkpoint meta in {where}: bad 'arrays' table")
    got = {_key_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    missing, extra = sorted(set(table) - set(got)), sorted(set(got) - set(table))
    if missing or extra:
        raise ValueError(f"checkpoint {where} does not hold the arrays its meta lists "
                         f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for key, spec in table.items():
        a = np.ascontiguousarray(got[key])
        if str(a.dtype) != spec.get("dtype") or list(a.shape) != spec.get("shape"):
            raise ValueError(f"array {key} in checkpoint {where} is {a.dtype} {list(a.shape)}, its meta says "
                             f"{spec.get('dtype')} {spec.get('shape')}")
        if (zlib.crc32(a) if a.size else 0) != spec.get("crc32"):
            raise ValueError(f"array {key} in checkpoint {where} is corrupt (checksum mismatch)")


# ---------------------------------------------------------------------------------------------------------
# stores: immutable arrays shared between versions


class Blob:
    """Arrays that a save may keep in a store shared between versions (:func:`save_tree`'s ``blobs``).

    Args:
        slot: where the arrays go back into the loaded tree, ``"a/b"`` (a dict path; ``""``: the top level).
        arrays: ``{name: numpy array}`` (names: lowercase letters and ``_``).
        owner: the immutable object the arrays were taken from (a segment's posting array, a codebook's
            centroids): a later save of the same path reuses the store this owner was saved to or loaded from,
            as long as the live version still names it with the same checksums.
    """

    def __init__(self, slot: str, arrays: dict, owner=None):
        self.slot, self.owner = slot, owner
        self.arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}


_KNOWN: dict = {}  # id(owner) -> (weakref to owner, {checkpoint path: (store name, table)})


def remember_store(owner, path, name: str, table: dict) -> None:
    """Record that ``owner``'s arrays are the store ``name`` of the checkpoint at ``path`` (see :class:`Blob`)."""
    if owner is None:
        return
    key = id(owner)
    entry = _KNOWN.get(key)
    if entry is None or entry[0]() is not owner:
        try:
            ref = weakref.ref(owner, lambda _, key=key: _KNOWN.pop(key, None))
        except TypeError:  # not weakly referenceable: nothing to reuse later
            return
        entry = _KNOWN[key] = (ref, {})
    entry[1][os.path.abspath(os.fspath(path))] = (name, table)


def _known_store(owner, path):
    entry = _KNOWN.get(id(owner)) if owner is not None else None
    if entry is None or entry[0]() is not owner:
        return None
    return entry[1].get(path)


def _store_names(vdir) -> list:
    """The stores the version folder ``vdir`` names (none for versions without stores, or unreadable ones)."""
    try:
        meta = _read_json(os.path.join(vdir, _META))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    stores = meta.get("stores") if isinstance(meta, dict) else None
    if not isinstance(stores, dict):
        return []
    return [v["name"] for v in stores.values() if isinstance(v, dict) and isinstance(v.get("name"), str)]


def _write_store(path, arrays: dict) -> str:
    """Write ``arrays`` as a new store folder of ``path`` (each array a ``.npy`` file, fsynced); its name."""
    name = f"s-{uuid.uuid4().hex}"
    folder = os.path.join(path, name)
    os.mkdir(folder)
    for key, a in arrays.items():
        with open(os.path.join(folder, f"{key}.npy"), "wb") as handle:
            np.lib.format.write_array(handle, a, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        _crash_point("store-array-written")
    _fsync_dir(folder)
    return name


def _read_store(path, name, table) -> dict:
    """The arrays of the store ``name`` of ``path``, checked against ``table`` (:func:`_array_table`'s: dtype,
    shape, crc32)."""
    if not isinstance(name, str) or not _STORE_RE.match(name) or not isinstance(table, dict):
        raise ValueError(f"corrupt checkpoint meta in {path}: bad store entry {name!r}")
    out = {}
    for key, spec in table.items():
        if not isinstance(key, str) or not _STORE_ARRAY_RE.match(key) or not isinstance(spec, dict):
            raise ValueError(f"corrupt checkpoint meta in {path}: bad array {key!r} of store {name}")
        file = os.path.join(path, name, f"{key}.npy")
        try:
            with open(file, "rb") as handle:
                a = np.load(handle, allow_pickle=False)
        except FileNotFoundError:
            raise ValueError(f"checkpoint {path} is incomplete: store {name} lacks {key}.npy") from None
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"checkpoint {path} is damaged: store {name}/{key}.npy cannot be read ({exc})") from None
        out[key] = a
    _verify_arrays(f"{path} (store {name})", out, table)
    return out


def _place(tree: dict, slot: str, arrays: dict) -> None:
    node = tree
    for part in [p for p in slot.split("/") if p]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"store slot {slot!r} is not a dict of the checkpoint's tree")
    node.update(arrays)


# ---------------------------------------------------------------------------------------------------------
# generic PyTree checkpoints


SMALL_FILE = 1 << 20  # files of the array store up to this size (its metadata) get a checksum, larger ones a size


def _file_table(folder: str) -> dict:
    """``{relative path: [size, crc32 or None]}`` of the files the array store wrote (crc32 for small files)."""
    table = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            size = os.path.getsize(full)
            crc = None
            if size <= SMALL_FILE:
                with open(full, "rb") as handle:
                    crc = zlib.crc32(handle.read())
            table[os.path.relpath(full, folder).replace(os.sep, "/")] = [size, crc]
    return table


def _check_files(path, folder: str, table: dict) -> None:
    """Every file the save recorded is there, of its size (and checksum, for small ones): a truncated or damaged
    store is refused here with one clear error, before the array reader meets it."""
    for rel, spec in table.items():
        full = os.path.join(folder, *rel.split("/"))
        if not isinstance(spec, list) or len(spec) != 2:
            raise ValueError(f"corrupt checkpoint meta in {path}: bad file entry for {rel}")
        try:
            size = os.path.getsize(full)
        except OSError:
            raise ValueError(f"checkpoint {path} is incomplete: {rel} is missing") from None
        if size != spec[0]:
            raise ValueError(f"checkpoint {path} is damaged: {rel} holds {size} bytes, the save wrote {spec[0]}")
        if spec[1] is not None:
            with open(full, "rb") as handle:
                if zlib.crc32(handle.read()) != spec[1]:
                    raise ValueError(f"checkpoint {path} is damaged: {rel} does not match its checksum")


def save_tree(path, tree, *, meta: dict | None = None, lock_timeout: float | None = None, blobs=()) -> str:
    """Save a PyTree of arrays to the directory ``path`` with a JSON-able ``meta`` dict, crash-safely.

    ``path`` may be missing, an empty directory, or a jasmk checkpoint of the same ``meta["kind"]``; anything
    else is refused. An existing checkpoint is replaced atomically: readers and crashes see the old or the
    new complete checkpoint, never a missing or partial one. Concurrent saves to one path run one at a time.

    Args:
        path: the checkpoint directory.
        tree: PyTree of arrays.
        meta: JSON-serializable dict (``kind`` and static fields); ``format`` and ``arrays`` are reserved.
        lock_timeout: seconds to wait for a concurrent save of the same path (default :data:`LOCK_TIMEOUT`).
        blobs: :class:`Blob` arrays kept in stores: those the live version already holds (same owner, same
            checksums) are shared, not written again.

    Returns:
        The absolute path written.

    Raises:
        ValueError: a refused path (see :func:`check_save_target`), bad meta, or a lock not released in time.
    """
    import orbax.checkpoint as ocp

    meta = dict(meta or {})
    kind = meta.get("kind")
    path = check_save_target(path, kind=kind)
    reserved = [k for k in _RESERVED_META + ("stores",) if k in meta]
    if reserved:
        raise ValueError(f"checkpoint meta keys {reserved} are reserved")
    arrays = jax.tree_util.tree_map(np.asarray, tree)
    blobs = list(blobs)
    # indexes take the newer format (ids, stores): a jasmk that cannot read them says so instead of misreading
    fmt = _STORES_FORMAT if blobs or kind in ("index", "sharded-index") else _FORMAT
    record = {**meta, "format": fmt, "arrays": _array_table(arrays)}
    slots = [b.slot for b in blobs]
    if len(set(slots)) != len(slots):
        raise ValueError(f"blob slots must be distinct, got {slots}")
    try:  # refused here, before anything is written
        json.dumps(record, default=_json_scalar)
    except TypeError as exc:
        raise ValueError(f"checkpoint meta must be JSON-serializable: {exc}") from exc
    created = not os.path.lexists(path)
    os.makedirs(path, exist_ok=True)
    if created:
        _fsync_dir(os.path.dirname(path))
    published = False
    try:
        lock = _lock(path, LOCK_TIMEOUT if lock_timeout is None else lock_timeout)
        try:
            _crash_point("locked")
            check_save_target(path, kind=kind)  # again: another writer may have saved meanwhile
            _collect_garbage(path)
            version = f"v-{uuid.uuid4().hex}"
            vdir = os.path.join(path, version)
            tmp = os.path.join(path, f"{_POINTER}.tmp-{uuid.uuid4().hex}")
            live_text = _pointer_text(path)
            live = set(_store_names(os.path.join(path, _parse_pointer(path, live_text)))) if live_text else set()
            written = []
            try:
                stores = {}
                for blob in blobs:
                    known = _known_store(blob.owner, path)
                    if known is not None and known[0] in live and os.path.isdir(os.path.join(path, known[0])):
                        name, table = known  # unchanged since the live version: shared
                    else:
                        table = _array_table(blob.arrays)
                        name = _write_store(path, blob.arrays)
                        written.append(name)
                    stores[blob.slot] = {"name": name, "arrays": table}
                if blobs:
                    record["stores"] = stores
                    _fsync_dir(path)
                    _crash_point("stores-written")
                with ocp.PyTreeCheckpointer() as ckptr:
                    ckptr.save(os.path.join(vdir, _ARRAYS), arrays)
                _crash_point("arrays-written")
                record["files"] = _file_table(os.path.join(vdir, _ARRAYS))  # what the array store wrote
                _write_synced(os.path.join(vdir, _META), json.dumps(record, default=_json_scalar))
                _crash_point("meta-written")
                _fsync_tree(vdir)
                _fsync_dir(path)
                _crash_point("version-synced")
                _write_synced(tmp, json.dumps({"format": fmt, "version": version}))
                _crash_point("pointer-written")
                os.replace(tmp, os.path.join(path, _POINTER))
                published = True
                _fsync_dir(path)
                _crash_point("published")
            except BaseException:
                if not published:
                    _discard(vdir, tmp)
                    for name in written:
                        shutil.rmtree(os.path.join(path, name), ignore_errors=True)
                raise
            for blob in blobs:
                remember_store(blob.owner, path, stores[blob.slot]["name"], stores[blob.slot]["arrays"])
            _collect_garbage(path, keep=version)
            _crash_point("cleaned")
        finally:
            _unlock(lock)
    except BaseException:
        if created and not published:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if empty: what we made for nothing
        raise
    log.info("saved checkpoint %s", path)
    if blobs:
        log.debug("stores: %d written, %d shared with the previous version", len(written), len(blobs) - len(written))
    return path


def _load_version(path, folder, target, *, expected_format):
    """``(tree, meta)`` from ``folder`` (holding ``arrays/`` and ``meta.json``)."""
    import orbax.checkpoint as ocp

    meta_path = os.path.join(folder, _META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"no jasmk checkpoint at {path} (missing directory or meta.json)")
    try:
        meta = _read_json(meta_path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt checkpoint meta at {meta_path}: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str) \
            or not meta["format"].startswith(_FORMAT_PREFIX):
        raise ValueError(f"{path} is not a jasmk checkpoint")
    _check_format(path, meta["format"], expected_format)
    current = expected_format != _LEGACY_FORMAT
    if current and "arrays" not in meta:
        raise ValueError(f"corrupt checkpoint meta at {meta_path}: no 'arrays' table")
    if isinstance(meta.get("files"), dict):  # before the array reader opens anything (checkpoints since 0.2)
        _check_files(path, os.path.join(folder, _ARRAYS), meta["files"])
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            if target is not None:
                tree = ckptr.restore(os.path.join(folder, _ARRAYS), item=jax.tree_util.tree_map(np.asarray, target))
            else:
                tree = ckptr.restore(os.path.join(folder, _ARRAYS))
    except Exception as exc:  # orbax raises many kinds of errors for damaged data
        raise ValueError(f"corrupt or incomplete checkpoint arrays in {path}: {exc}") from exc
    if current:
        _verify_arrays(path, tree, meta["arrays"])
    stores = meta.get("stores", {}) if meta["format"] == _STORES_FORMAT else {}
    if not isinstance(stores, dict) or not isinstance(tree, dict):
        raise ValueError(f"corrupt checkpoint meta in {path}: bad 'stores' table")
    for slot, entry in stores.items():
        if not isinstance(entry, dict):
            raise ValueError(f"corrupt checkpoint meta in {path}: bad store entry for {slot!r}")
        _place(tree, slot, _read_store(path, entry.get("name"), entry.get("arrays")))
    return tree, meta


def load_tree(path, *, target=None):
    """Load a checkpoint written by :func:`save_tree` (either format version), checking every array's checksum.

    A save running meanwhile is safe: if the checkpoint changed under the read, it is read again.

    Args:
        path: the checkpoint directory.
        target: optional PyTree with the expected structure (restores into that structure).

    Returns:
        ``(tree, meta)``.

    Raises:
        ValueError: missing, incomplete, corrupt checkpoint, or one of an unsupported format version.
    """
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) in ("", b""):
        raise ValueError(f"checkpoint path must be a non-empty path, got {path!r}")
    path = os.path.abspath(os.fspath(path))
    for attempt in range(_READ_ATTEMPTS):
        text = _pointer_text(path)
        try:
            if not os.path.isdir(path):
                raise ValueError(f"no jasmk checkpoint at {path} ({what_file(path)})")
            if text is None:
                return _load_version(path, path, target, expected_format=_LEGACY_FORMAT)
            folder = os.path.join(path, _parse_pointer(path, text))
            return _load_version(path, folder, target, expected_format=_FORMATS)
        except ValueError:
            if attempt + 1 < _READ_ATTEMPTS and _pointer_text(path) != text:
                log.debug("checkpoint %s changed while being read: reading it again", path)
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------
# codebook and index


def save_codebook(path, codebook: Codebook) -> str:
    """Save a :class:`~jasmk.codebook.Codebook` (atomic)."""
    return save_tree(path, {"centroids": codebook.centroids},
                     meta={"kind": "codebook", "size_param": codebook.size_param})


def load_codebook(path) -> Codebook:
    """Load a codebook saved with :func:`save_codebook`."""
    tree, meta = load_tree(path)
    if meta.get("kind") == "index":
        raise ValueError(f"{path} holds an index checkpoint, not a codebook: jasmk.load_index reads it (its "
                         "codebook is index.centroids), and build_index(codebook=path) takes its codebook")
    if meta.get("kind") != "codebook":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a codebook")
    if not isinstance(tree, dict) or "centroids" not in tree:
        raise ValueError(f"codebook checkpoint {path} has no centroids")
    centroids = np.asarray(tree["centroids"])
    if centroids.ndim != 2 or not np.issubdtype(centroids.dtype, np.floating):
        raise ValueError(f"codebook checkpoint {path} holds {centroids.dtype} centroids of shape {centroids.shape}, "
                         "expected a float [K, D] array")
    if not np.isfinite(centroids).all():
        raise ValueError(f"codebook checkpoint {path} holds NaN or inf centroids")
    try:
        return Codebook.from_centroids(centroids, size_param=meta.get("size_param"))
    except ValueError as exc:
        raise ValueError(f"codebook checkpoint {path}: {exc}") from exc


def save_index(path, index: ivf_mod.Index) -> str:
    """Save an :class:`~jasmk.ivf.Index` (atomic): each segment's real postings and the codebook in stores, the
    per-word and per-image arrays in the version, the other fields in the meta
    (:func:`jasmk.storage.index_format.to_arrays`).

    Saving over the index's own earlier checkpoint (the path it was saved to or loaded from, unchanged since)
    writes only what changed: segments made since (new and merged ones), the per-image normalization and ids,
    the per-word arrays; the other segments' stores are shared with the earlier version."""
    arrays, fields = index_format.to_arrays(index)
    blobs = [Blob("", {"centroids": arrays.pop("centroids")}, owner=index.centroids)]
    for slot, owner in _segment_stores(index):
        part = arrays["segments"][slot.split("/")[1]]
        if "vecs" in part:
            blobs.append(Blob(slot, {n: part.pop(n) for n in ("vecs", "words", "images")}, owner=owner))
    return save_tree(path, arrays, meta={"kind": "index", "index": fields}, blobs=blobs)


def _segment_stores(index: ivf_mod.Index):
    """``[(slot, owner)]`` of each segment's postings store: its place in the tree of
    :func:`jasmk.storage.index_format.to_arrays` and the array whose identity marks it unchanged."""
    return [(f"segments/{i:05d}", ivf_mod.host(seg).vecs) for i, seg in enumerate(index.segments)]


def load_index(path) -> ivf_mod.Index:
    """Load an index saved with :func:`save_index`, checking checksums, dtypes, shapes and ranges.

    Indexes saved by jasmk 0.1 (one word-major posting array) load too, into segments."""
    tree, meta = load_tree(path)
    if meta.get("kind") == "codebook":
        raise ValueError(f"{path} holds a codebook checkpoint, not an index: jasmk.load_codebook reads it")
    if meta.get("kind") == "sharded-index":
        raise ValueError(f"{path} holds a sharded index: jasmk.shard.load_sharded_index reads it")
    if meta.get("kind") != "index":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not an index")
    if not isinstance(tree, dict):
        raise ValueError(f"index checkpoint {path} holds no arrays")
    if "index" not in meta:
        return _load_legacy_index(tree, meta, str(path))
    index = index_format.from_arrays(tree, meta["index"], where=str(path))
    stores = meta.get("stores") if isinstance(meta.get("stores"), dict) else {}
    # the arrays just read are those stores: a save over this path shares them while they are unchanged
    for slot, owner in [("", index.centroids)] + _segment_stores(index):
        entry = stores.get(slot)
        if entry is not None:
            remember_store(owner, path, entry["name"], entry["arrays"])
    return index


def _load_legacy_index(tree, meta, where: str) -> ivf_mod.Index:
    """An index from the single-array layout of jasmk 0.1 checkpoints."""
    need = ["centroids", "entry_vecs", "entry_words", "entry_images", "idf", "norm_factor"]
    missing = [n for n in need if n not in tree] + [k for k in ("n_images", "n_entries", "binary") if k not in meta]
    if missing:
        raise ValueError(f"index checkpoint {where} lacks {missing}")
    e, n = int(meta["n_entries"]), int(meta["n_images"])
    centroids = np.asarray(tree["centroids"], np.float32)
    k = centroids.shape[0] if centroids.ndim == 2 else 0
    words = np.asarray(tree["entry_words"])[:e]
    images = np.asarray(tree["entry_images"])[:e]
    if e and (words.min() < 0 or words.max() >= k or (np.diff(words) < 0).any() or images.min() < 0
              or images.max() >= n):
        raise ValueError(f"inconsistent index in {where}: word or image ids out of range or out of order")
    index = ivf_mod.from_postings(
        centroids, np.asarray(tree["entry_vecs"])[:e], words, images, idf=np.asarray(tree["idf"], np.float32),
        norm_factor=np.asarray(tree["norm_factor"], np.float32), n_images=n,
        imid_offset=int(meta.get("imid_offset", 0)), binary=bool(meta["binary"]),
        use_idf=bool(meta.get("use_idf", False)), codebook_size_param=meta.get("codebook_size_param"))
    arrays, fields = index_format.to_arrays(index)
    return index_format.from_arrays(arrays, fields, where=where)  # the same checks as a current checkpoint


def __getattr__(name):
    # jasmk 0.1 had the sharded index's save and load here; they live with the sharded index now (the storage
    # layer imports no layer above it), and this forward warns until jasmk 0.3
    if name in ("save_sharded_index", "load_sharded_index"):
        warnings.warn(f"jasmk.checkpoint.{name} moved to jasmk.shard.{name}; the old path works until jasmk 0.3",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("jasmk.shard"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LOCK_TIMEOUT", "check_save_target", "checkpoint_kind", "enclosing_checkpoint", "export_asmk_ivf",
    "load_asmk_codebook", "load_asmk_ivf", "load_codebook", "load_index", "load_tree", "save_codebook", "save_index",
    "save_tree", "what_file",
]
