"""Drop-in replacement for asmk 0.1.1's ``asmk_method`` module, backed by jasmk.

Same params dict (``index`` / ``train_codebook`` / ``build_ivf`` / ``query_ivf``), same call sequence and return
values, same codebook and IVF pickle formats, so MASt3R's ``Retriever`` works after changing one import::

    from jasmk.compat import asmk_method      # instead of: from asmk import asmk_method

    asmk = asmk_method.ASMKMethod.initialize_untrained(params)
    asmk = asmk.train_codebook(None, cache_path="codebook.pkl")
    dataset = asmk.build_ivf(feats, ids)
    metadata, images, ranks, scores = dataset.query_ivf(feats, ids)

``load_params`` reads asmk's parameter files (``asmk.io_helpers.load_params``: a yaml file, its ``__template__``
laid under it) and also takes the name of a HOW set jasmk ships: ``load_params("eccv20_how_r50-_1000")``.

``params["index"]["gpu_id"]`` is honoured as asmk does for faiss: None quantizes with faiss on the CPU; an int
quantizes with jitted JAX on that GPU (at full float32 precision), or with faiss on the CPU where JAX has no
GPU (as MASt3R's own fallback for faiss-cpu does). Constructing an ``ASMKMethod`` and loading a codebook touch
no JAX device, and JAX is told not to preallocate the GPU memory that torch (MASt3R's backbone) needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time

import jax
import numpy as np

from . import api
from .core import ivf as ivf_mod
from .core import runtime, validate
from .core.codebook import Codebook, have_faiss, quantize, train_codebook
from .storage import asmk_format
from .storage.asmk_format import codebook_from_state, codebook_state  # noqa: F401 (0.1 names)
from .storage.params import load_params

log = logging.getLogger(__name__)

asmk_method = sys.modules[__name__]  # ``from jasmk.compat import asmk_method`` mirrors ``from asmk import asmk_method``

_BINARY_SHORTCUTS = {"bin": True, "nobin": False, True: True, False: False}


def _fingerprint(vecs) -> str:
    """Content hash of a descriptor array (shape, dtype and bytes)."""
    a = np.ascontiguousarray(vecs)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((a.shape, a.dtype.str)).encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _section(params, key, name):
    if not isinstance(params, dict) or key not in params or not isinstance(params[key], dict):
        raise ValueError(f"{name} params need a '{key}' dict, got {params!r}")
    return params[key]


def _only_keys(d, allowed, name):
    extra = set(d) - set(allowed)
    if extra:
        raise ValueError(f"unknown {name} parameter(s) {sorted(extra)}; allowed: {sorted(allowed)}")


def _gpu_id(params):
    """``params["index"]["gpu_id"]``: None (CPU) or a GPU number."""
    index = params.get("index") if isinstance(params, dict) else None
    if index is None:
        return None
    if not isinstance(index, dict):
        raise ValueError(f"index params must be a dict like {{'gpu_id': 0}}, got {index!r}")
    _only_keys(index, {"gpu_id"}, "index")
    gpu = index.get("gpu_id")
    if gpu is not None and (not validate.is_int(gpu) or gpu < 0):
        raise ValueError(f"index gpu_id must be None or a GPU number >= 0, got {gpu!r}")
    return None if gpu is None else int(gpu)


def _quantize(codebook, vecs, ma, gpu_id):
    """asmk's quantization: faiss on the CPU (gpu_id None), else JAX on that GPU (faiss if JAX has none)."""
    if gpu_id is None:
        if have_faiss():
            return quantize(codebook, vecs, multiple_assignment=ma, method="faiss")
        return quantize(codebook, vecs, multiple_assignment=ma, method="jax", device=jax.devices("cpu")[0])
    return quantize(codebook, vecs, multiple_assignment=ma, method="auto", device=gpu_id)


class ASMKMethod:
    """asmk's ``ASMKMethod`` on jasmk: each step returns a new object, ``self`` is never changed.

    Args:
        params: dict with keys ``index``, ``train_codebook``, ``build_ivf``, ``query_ivf``.
        metadata: timing and statistics of the steps done so far.
    """

    def __init__(self, params, metadata, *, codebook=None, kernel=None, inverted_file=None, word_cache=None):
        self.params = params
        self.metadata = metadata
        self.codebook = codebook
        self.kernel = kernel  # {"binary": bool} once the ivf exists
        self.inverted_file = inverted_file
        # (fingerprint, [N, MA] words) of the last indexed descriptors, quantized with the query's MA so that
        # querying the indexed set itself (MASt3R's Retriever) quantizes once
        self._word_cache = word_cache

    @classmethod
    def initialize_untrained(cls, params):
        """Start from params only (see the class doc)."""
        if not isinstance(params, dict):
            raise ValueError(f"params must be a dict, got {type(params).__name__}")
        _gpu_id(params)
        runtime.share_gpu_with_torch()
        return cls(params, {})

    def train_codebook(self, *columns, cache_path=None, step_params=None):
        """Train the codebook on ``vecs`` (``[N, D]``), or load it from ``cache_path`` if that file exists."""
        if self.codebook is not None:
            raise ValueError("the codebook is already trained")
        step_params = step_params or self.params.get("train_codebook")
        cb_params = _section(step_params, "codebook", "train_codebook")
        _only_keys(cb_params, {"size"}, "codebook")
        time0 = time.time()
        if cache_path and os.path.exists(cache_path):
            codebook = asmk_format.codebook_from_state(asmk_format.read_pickle(cache_path))
            if codebook.size_param != cb_params["size"]:
                raise ValueError(f"cached codebook {cache_path} has size {codebook.size_param!r}, "
                                 f"params ask for {cb_params['size']!r}")
            metadata = {"load_time": time.time() - time0}
        else:
            if not columns or columns[0] is None:
                raise ValueError("no training descriptors given and no cached codebook at "
                                 f"{cache_path!r}")
            codebook = train_codebook(columns[0], size=cb_params["size"])
            metadata = {"train_time": time.time() - time0}
            if cache_path:
                asmk_format.write_pickle(cache_path, codebook_state(codebook))
        metadata["index_class"] = "jasmk"
        return self.__class__({**self.params, "train_codebook": step_params},
                              {**self.metadata, "train_codebook": metadata}, codebook=codebook)

    def build_ivf(self, *columns, distractors_path=None, cache_path=None, step_params=None):
        """Index ``vecs`` (``[N, D]``) of images ``imids`` (``[N]``); or load the ivf from ``cache_path``."""
        builder = self.create_ivf_builder(cache_path=cache_path, step_params=step_params)
        if not builder.loaded_from_cache:
            if distractors_path:
                builder.initialize_with_distractors(distractors_path)
            builder.add(*columns)
        return self.add_ivf_builder(builder)

    def create_ivf_builder(self, *, cache_path=None, step_params=None):
        """An :class:`IvfBuilder` for adding images step by step."""
        if self.codebook is None:
            raise ValueError("train or load the codebook before building the ivf")
        if self.inverted_file is not None:
            raise ValueError("the inverted file is already built")
        step_params = step_params or self.params.get("build_ivf")
        query_ma = ((self.params.get("query_ivf") or {}).get("quantize") or {}).get("multiple_assignment", 1)
        return IvfBuilder(step_params, self.codebook, cache_path=cache_path, prefetch_multiple_assignment=query_ma,
                          gpu_id=_gpu_id(self.params))

    def add_ivf_builder(self, ivf_builder):
        """Finish building with ``ivf_builder`` (saving it to its cache path, if any)."""
        metadata = ivf_builder.save()
        return self.__class__({**self.params, "build_ivf": ivf_builder.step_params},
                              {**self.metadata, "build_ivf": metadata}, codebook=self.codebook,
                              kernel={"binary": ivf_builder.ivf.binary}, inverted_file=ivf_builder.ivf,
                              word_cache=ivf_builder.word_cache)

    def query_ivf(self, *columns, step_params=None, progress=None):
        """Query with ``qvecs`` (``[N, D]``) of images ``qimids`` (``[N]``).

        Returns:
            ``(metadata, images [n_query], ranks [n_query, k] int64, scores [n_query, k] float64)``.
        """
        if self.inverted_file is None:
            raise ValueError("build the ivf before querying it")
        if len(columns) < 2:
            raise ValueError("query_ivf needs qvecs and qimids")
        step_params = step_params or self.params.get("query_ivf")
        q = _section(step_params, "quantize", "query_ivf")
        sim = _section(step_params, "similarity", "query_ivf")
        search = step_params.get("search", {}) or {}
        _only_keys(q, {"multiple_assignment"}, "quantize")
        _only_keys(sim, {"alpha", "similarity_threshold"}, "similarity")
        _only_keys(search, {"topk"}, "search")
        _only_keys(step_params.get("aggregate", {}) or {}, set(), "aggregate")
        time0 = time.time()
        ma = q.get("multiple_assignment", 1)
        word_ids = None
        if self._word_cache is not None and ma <= self._word_cache[1].shape[1]:
            if _fingerprint(columns[0]) == self._word_cache[0]:
                word_ids = self._word_cache[1][:, :ma]
                log.debug("query descriptors are the indexed ones: reusing their quantization")
        if word_ids is None:
            qvecs = validate.descriptors(columns[0], dim=self.codebook.dim)
            word_ids = _quantize(self.codebook, qvecs, validate.multiple_assignment(ma, self.codebook.size),
                                 _gpu_id(self.params))
        result = api.query(self.inverted_file, columns[0], columns[1], multiple_assignment=ma, alpha=sim["alpha"],
                           similarity_threshold=sim["similarity_threshold"], topk=search.get("topk"),
                           word_ids=word_ids)
        metadata = {"query_avg_time": (time.time() - time0) / max(len(result.ids), 1)}
        return metadata, result.ids, result.ranks.astype(np.int64), result.scores.astype(np.float64)


class IvfBuilder:
    """Adds images to a jasmk inverted file with asmk's ``build_ivf`` params."""

    def __init__(self, step_params, codebook: Codebook, *, cache_path=None, prefetch_multiple_assignment=1,
                 gpu_id=None):
        kernel = _section(step_params, "kernel", "build_ivf")
        ivf_params = _section(step_params, "ivf", "build_ivf")
        q = _section(step_params, "quantize", "build_ivf")
        _only_keys(kernel, {"binary"}, "kernel")
        _only_keys(ivf_params, {"use_idf"}, "ivf")
        _only_keys(q, {"multiple_assignment"}, "quantize")
        _only_keys(step_params.get("aggregate", {}) or {}, set(), "aggregate")
        if kernel.get("binary") not in _BINARY_SHORTCUTS:
            raise ValueError(f"kernel binary must be True/False/'bin'/'nobin', got {kernel.get('binary')!r}")
        self.step_params = step_params
        self.codebook = codebook
        self.binary = _BINARY_SHORTCUTS[kernel["binary"]]
        self.multiple_assignment = q.get("multiple_assignment", 1)
        self.prefetch_multiple_assignment = prefetch_multiple_assignment
        self.gpu_id = gpu_id
        self.word_cache = None
        time0 = time.time()
        if cache_path and os.path.exists(cache_path):
            self.ivf = asmk_format.load_asmk_ivf(asmk_format.read_pickle(cache_path), codebook)
            self.metadata = {"load_time": time.time() - time0}
            self.cache_path = None
        else:
            # asmk's dense layout: gap ids count in idf's n_images and appear in full rankings, as in asmk
            self.ivf = ivf_mod.empty(codebook.centroids, binary=self.binary, use_idf=bool(ivf_params["use_idf"]),
                                     codebook_size_param=codebook.size_param, dense_ids=True)
            self.metadata = {"index_time": 0.0}
            self.cache_path = cache_path

    @property
    def loaded_from_cache(self) -> bool:
        return "load_time" in self.metadata

    def initialize_with_distractors(self, path):
        """Start from the distractor ivf pickled at ``path``; added images are numbered after it."""
        self.ivf = ivf_mod.with_distractors(asmk_format.load_asmk_ivf(asmk_format.read_pickle(path), self.codebook))

    def add(self, *columns, progress=None):
        """Add descriptors ``vecs`` (``[N, D]``) of images ``imids`` (``[N]``)."""
        if len(columns) < 2:
            raise ValueError("add needs vecs and imids")
        time0 = time.time()
        vecs = validate.descriptors(columns[0], dim=self.codebook.dim)
        ma = validate.multiple_assignment(self.multiple_assignment, self.codebook.size)
        ma_q = self.prefetch_multiple_assignment
        # quantize once with the query's MA when larger: the nearest `ma` words are its first columns
        wide = isinstance(ma_q, int) and ma < ma_q <= self.codebook.size
        words = _quantize(self.codebook, vecs, ma_q if wide else ma, self.gpu_id)
        self.word_cache = (_fingerprint(columns[0]), words)
        self.ivf = api.add_images(self.ivf, vecs, columns[1], multiple_assignment=ma, word_ids=words[:, :ma])
        self.metadata["index_time"] += time.time() - time0

    def save(self):
        """Pickle the ivf in asmk's format to the cache path (if any); return metadata with ivf stats."""
        if self.cache_path:
            asmk_format.write_pickle(self.cache_path, asmk_format.export_asmk_ivf(self.ivf))
        return {**self.metadata, "ivf_stats": self.ivf.stats()}


__all__ = ["ASMKMethod", "IvfBuilder", "asmk_method", "codebook_from_state", "codebook_state", "load_params"]
