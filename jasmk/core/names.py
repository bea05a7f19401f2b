"""Image names: the strings users know their images by (hloc's relative paths, file names), kept in slot order.

An index built from hloc's ``features.h5`` or given ``names=`` carries one name per image; pairs files and
results are written with them. Names are labels: no kernel reads them.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["ImageNames", "check_names"]


def check_names(names, *, what: str = "image names") -> list:
    """``names`` as a list of str, checked: non-empty strings without line breaks or NUL, each once.

    Raises:
        ValueError: naming the first bad name.
    """
    if isinstance(names, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of strings, got a single {type(names).__name__}")
    out = []
    for i, name in enumerate(names):
        if isinstance(name, np.str_):
            name = str(name)
        if not isinstance(name, str):
            raise ValueError(f"{what}: entry {i} is a {type(name).__name__}, not a str ({name!r})")
        if not name or any(c in name for c in "\n\r\0"):
            raise ValueError(f"{what}: entry {i} ({name!r}) is empty or holds a line break or NUL")
        out.append(name)
    if len(set(out)) != len(out):
        seen = set()
        dup = next(n for n in out if n in seen or seen.add(n))
        raise ValueError(f"{what}: {dup!r} appears more than once; each image needs its own name")
    return out


class ImageNames:
    """The names of an index's images, ``names[slot]`` for internal slots ``0..n-1``.

    Stored as one UTF-8 blob and ``[n + 1]`` offsets (what a checkpoint holds); immutable and hashable (static
    metadata of the index PyTree: the hash is a digest computed on first use, equality compares the bytes).

    Attributes:
        blob: ``[B] uint8`` the UTF-8 names, concatenated.
        offsets: ``[n + 1] int64`` start of each name in ``blob`` (``offsets[n] == B``).
    """

    __slots__ = ("blob", "offsets", "_digest", "_lookup", "_list")

    def __init__(self, blob, offsets):
        blob = np.array(blob, dtype=np.uint8, copy=True).reshape(-1)
        offsets = np.array(offsets, dtype=np.int64, copy=True).reshape(-1)
        if offsets.size < 1 or offsets[0] != 0 or offsets[-1] != blob.size or (np.diff(offsets) <= 0).any():
            raise ValueError("image names: offsets must start at 0, increase strictly and end at the blob size")
        blob.setflags(write=False)
        offsets.setflags(write=False)
        self.blob, self.offsets = blob, offsets
        self._digest = self._lookup = self._list = None

    @classmethod
    def from_list(cls, names, *, what: str = "image names") -> "ImageNames":
        names = check_names(names, what=what)
        encoded = [n.encode("utf-8", "surrogateescape") for n in names]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    def tolist(self) -> list:
        """Every name, in slot order."""
        if self._list is None:
            data, off = self.blob.tobytes(), self.offsets.tolist()
            self._list = [data[a:b].decode("utf-8", "surrogateescape") for a, b in zip(off[:-1], off[1:])]
        return self._list

    def __getitem__(self, slot: int) -> str:
        return self.tolist()[slot]

    def take(self, slots) -> list:
        """Names of ``slots`` (an int array of any shape), as a flat list."""
        names = self.tolist()
        return [names[int(s)] for s in np.asarray(slots).reshape(-1)]

    def slot(self, name: str) -> int:
        """The slot of ``name``; KeyError if no image has it."""
        if self._lookup is None:
            self._lookup = {n: i for i, n in enumerate(self.tolist())}
        return self._lookup[name]

    def __contains__(self, name) -> bool:
        try:
            self.slot(name)
        except (KeyError, TypeError):
            return False
        return True

    def extended(self, names, *, what: str = "image names") -> "ImageNames":
        """These names followed by ``names`` (checked; none may already be here)."""
        new = ImageNames.from_list(names, what=what)
        clash = next((n for n in new.tolist() if n in self), None)
        if clash is not None:
            raise ValueError(f"{what}: {clash!r} is already in the index (slot {self.slot(clash)}); each image "
                             "needs its own name")
        return ImageNames(np.concatenate([self.blob, new.blob]),
                          np.concatenate([self.offsets, new.offsets[1:] + self.offsets[-1]]))

    def __hash__(self) -> int:
        if self._digest is None:
            h = hashlib.blake2b(self.offsets.tobytes(), digest_size=16)
            h.update(self.blob.tobytes())
            self._digest = hash(h.digest())
        return self._digest

    def __eq__(self, other) -> bool:
        return (isinstance(other, ImageNames) and hash(self) == hash(other)
                and np.array_equal(self.offsets, other.offsets) and np.array_equal(self.blob, other.blob))

    def __repr__(self) -> str:
        names = self.tolist()
        shown = ", ".join(map(repr, names[:2])) + (", ..." if len(names) > 2 else "")
        return f"ImageNames({len(names)}: {shown})"
