"""The user-facing functions: build an index from local descriptors, query it, get a dense score matrix.

Defaults follow HOW/MASt3R's asmk parameters: ASMK* (binary), no idf, one assignment when
indexing, five when querying, ``alpha = 3``, ``similarity_threshold = 0``.
"""

from __future__ import annotations

import functools
import logging
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np

from . import aggregate as agg_mod
from . import ivf as ivf_mod
from . import score as score_mod
from . import validate
from .codebook import Codebook, quantize, quantize_jax, train_codebook  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

# Bytes of the per-batch query word table (see jasmk.score): bounds the batch size.
_TABLE_BYTES = 64 * 2**20
_MAX_BATCH = 64


class QueryResult(typing.NamedTuple):
    """Result of :func:`query`.

    Attributes:
        ids: ``[n_query] int64`` query image ids, ascending.
        ranks: ``[n_query, k] int64`` database image ids, best first.
        scores: ``[n_query, k] float32`` their scores.
    """

    ids: np.ndarray
    ranks: np.ndarray
    scores: np.ndarray


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm progress bar on stderr (a no-op when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, leave=False)


def _as_codebook(codebook) -> Codebook:
    if isinstance(codebook, Codebook):
        return codebook
    if codebook is None:
        raise ValueError("a codebook is required: pass codebook=jasmk.train_codebook(...) or a [K, D] array")
    return Codebook.from_centroids(codebook)


def aggregate_images(centroids, feats, ids, *, binary: bool, multiple_assignment: int, quantizer: str = "faiss",
                     word_ids=None, sort: bool = True):
    """Validate, quantize and aggregate descriptors ``feats`` (``[N, D]``) of images ``ids`` (``[N]``).

    Args:
        word_ids: optional precomputed ``[N, MA] int`` assignments (e.g. from :func:`jasmk.quantize`); when
            given, quantization is skipped and ``multiple_assignment`` must equal ``MA``.
        sort: sort each image's rows by word (asmk's order); the index and the scorer do not need it.

    Returns:
        :class:`~jasmk.aggregate.Aggregated` rows sorted by (image, word).
    """
    cb = _as_codebook(centroids)
    x = validate.descriptors(feats, dim=cb.dim)
    imids = validate.image_ids(ids, x.shape[0])
    if word_ids is None:
        words = quantize(cb, x, multiple_assignment=multiple_assignment, method=quantizer)
    else:
        words = validate.word_ids(word_ids, x.shape[0], cb.size, multiple_assignment)
    return agg_mod.aggregate(cb.centroids, x, words, imids, binary=binary, sort=sort)


def build_index(feats, ids, *, codebook, binary: bool = True, use_idf: bool = False,
                multiple_assignment: int = 1, quantizer: str = "faiss", distractors: ivf_mod.Index | None = None,
                word_ids=None) -> ivf_mod.Index:
    """Build an inverted file from local descriptors.

    Args:
        feats: ``[N, D] float32`` descriptors of all database images.
        ids: ``[N] int`` image id of each descriptor, grouped in ascending order (``0..n-1`` typically).
        codebook: a :class:`~jasmk.codebook.Codebook` or ``[K, D]`` centroids.
        binary: ASMK* (packed sign bits) if True, ASMK (real unit vectors) if False.
        use_idf: weight words by ``log(n_images / count)**2``.
        multiple_assignment: words per descriptor when indexing.
        quantizer: ``"faiss"`` or ``"jax"``.
        distractors: an index whose images stay in the new index before the new ones (asmk's
            distractor ivf; new ids are offset by its image count and query ranks are reported minus it).
        word_ids: optional precomputed ``[N, MA]`` word assignments (skips quantization).

    Returns:
        The :class:`~jasmk.ivf.Index`.
    """
    cb = _as_codebook(codebook)
    if distractors is not None:
        if distractors.dim != cb.dim or distractors.n_words != cb.size:
            raise ValueError("the distractor index was built with a different codebook")
        if distractors.binary != bool(binary) or distractors.use_idf != bool(use_idf):
            raise ValueError("the distractor index has different binary/use_idf settings")
        index = ivf_mod.with_distractors(distractors)
    else:
        index = ivf_mod.empty(cb.centroids, binary=binary, use_idf=use_idf, codebook_size_param=cb.size_param)
    return add_images(index, feats, ids, multiple_assignment=multiple_assignment, quantizer=quantizer,
                      word_ids=word_ids)


def add_images(index: ivf_mod.Index, feats, ids, *, multiple_assignment: int = 1, quantizer: str = "faiss",
               word_ids=None) -> ivf_mod.Index:
    """Return ``index`` with more images added (their ids must be larger than those already there)."""
    agg = aggregate_images(Codebook(index.centroids, index.codebook_size_param), feats, ids,
                           binary=index.binary, multiple_assignment=multiple_assignment, quantizer=quantizer,
                           word_ids=word_ids, sort=False)
    return ivf_mod.add(index, agg)


def _bucket(n: int, minimum: int = 64) -> int:
    """A size >= n from a short ladder (4 steps per octave), so that jitted shapes repeat."""
    n = max(int(n), minimum)
    top = 1 << (n - 1).bit_length()
    step = max(top // 8, 1)
    return -(-n // step) * step


def batch_size(index: ivf_mod.Index, n_queries: int, max_rows: int) -> int:
    """Query images scored together: the largest power of two <= 64 whose word table
    (``min(K, B * max_rows) x B x W`` words) fits in 64 MiB and whose score accumulator (at least
    ``n_images x B`` floats) fits in 256 MiB, and no more than the queries there are."""
    b = 1
    while b < _MAX_BATCH:
        nb = 2 * b
        if (min(index.n_words, nb * max_rows) + 1) * nb * index.width * 4 > _TABLE_BYTES:
            break
        if index.n_images * nb * 4 > score_mod.ACC_BYTES:
            break
        b = nb
    return min(b, 1 << max(0, (int(n_queries) - 1).bit_length()))  # powers of two: few compiled shapes


def _query_batches(index: ivf_mod.Index, agg: agg_mod.Aggregated):
    """Yield ``(image ids [b'], vecs [R, W], words [R], slots [R], B)`` batches of flat query rows.

    ``agg`` rows are grouped by image; each batch holds up to ``B`` images (slot = position in the batch,
    ``B`` on padding rows) and ``R`` is rounded up on a short ladder so that compilations repeat."""
    bounds = np.flatnonzero(np.diff(agg.images)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    stops = np.concatenate([bounds, [agg.images.shape[0]]]).astype(np.int64)
    n_q = starts.size
    b = batch_size(index, n_q, int((stops - starts).max()))
    slot_of_row = np.repeat(np.arange(n_q), stops - starts)
    width = agg.vecs.shape[1]
    for i in range(0, n_q, b):
        j = min(i + b, n_q)
        s, e = starts[i], stops[j - 1]
        r = int(e - s)
        cap = _bucket(r)
        vecs = np.zeros((cap, width), agg.vecs.dtype)
        vecs[:r] = agg.vecs[s:e]
        words = np.zeros(cap, np.int32)
        words[:r] = agg.words[s:e]
        slots = np.full(cap, b, np.int32)
        slots[:r] = slot_of_row[s:e] - i
        yield agg.images[starts[i:j]], vecs, words, slots, b


def _run_batches(index, agg, fn, convert, progress: bool, desc: str):
    """Dispatch ``fn`` on each query batch, converting each result while the next one runs."""
    out, pending = [], None
    with _progress(int(np.unique(agg.images).size), desc, progress) as bar:
        for imgs, vecs, words, slots, b in _query_batches(index, agg):
            res = fn(vecs, words, slots, b)
            if pending is not None:
                out.append(convert(*pending))
                bar.update(len(pending[0]))
            pending = (imgs, res)
        if pending is not None:
            out.append(convert(*pending))
            bar.update(len(pending[0]))
    return out


def _check_query_params(index: ivf_mod.Index, alpha, similarity_threshold, topk):
    if index.n_entries == 0:
        raise ValueError("the index is empty: build it with images first")
    alpha = validate.finite_number(alpha, "alpha")
    thr = validate.finite_number(similarity_threshold, "similarity_threshold")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    return alpha, thr


def query(index: ivf_mod.Index, qfeats, qids, *, multiple_assignment: int = 5, alpha: float = 3.0,
          similarity_threshold: float = 0.0, topk: int | None = None, quantizer: str = "faiss",
          word_ids=None, progress: bool = False) -> QueryResult:
    """Rank the database images for each query image.

    Args:
        index: the :class:`~jasmk.ivf.Index`.
        qfeats: ``[N, D] float32`` query descriptors.
        qids: ``[N] int`` query image id of each descriptor, grouped ascending.
        multiple_assignment: words per query descriptor.
        alpha, similarity_threshold: selective kernel ``u**alpha`` for ``u >= threshold``.
        topk: number of results per query (None: all database image slots).
        word_ids: optional precomputed ``[N, MA]`` word assignments (skips quantization).
        progress: show a progress bar on stderr.

    Returns:
        :class:`QueryResult` ``(ids [n_query], ranks [n_query, k], scores [n_query, k])``.
    """
    alpha, thr = _check_query_params(index, alpha, similarity_threshold, topk)
    agg = aggregate_images(Codebook(index.centroids, index.codebook_size_param), qfeats, qids,
                           binary=index.binary, multiple_assignment=multiple_assignment, quantizer=quantizer,
                           word_ids=word_ids, sort=False)

    def fn(vecs, words, slots, b):
        return score_mod.score_rows_ranked(index, vecs, words, slots, jnp.float32(alpha), jnp.float32(thr),
                                           n_queries=b, topk=topk)

    def convert(imgs, res):
        r, s = res
        return imgs, np.asarray(r, np.int64)[: len(imgs)], np.asarray(s)[: len(imgs)]

    parts = _run_batches(index, agg, fn, convert, progress, "query")
    ids, ranks, scores = zip(*parts)
    return QueryResult(np.concatenate(ids).astype(np.int64), np.concatenate(ranks), np.concatenate(scores))


def score_matrix(index: ivf_mod.Index, qfeats, qids, *, multiple_assignment: int = 5, alpha: float = 3.0,
                 similarity_threshold: float = 0.0, quantizer: str = "faiss", word_ids=None,
                 progress: bool = False) -> np.ndarray:
    """Dense query-by-database scores: ``[n_query, index.n_images] float32``.

    Row ``i`` is the ``i``-th distinct query id (ascending); column ``j`` is the database image with
    internal id ``j`` (its own id when no distractor index was used). This is the matrix MASt3R's
    Retriever builds from asmk's ranks and scores.
    """
    alpha, thr = _check_query_params(index, alpha, similarity_threshold, None)
    agg = aggregate_images(Codebook(index.centroids, index.codebook_size_param), qfeats, qids,
                           binary=index.binary, multiple_assignment=multiple_assignment, quantizer=quantizer,
                           word_ids=word_ids, sort=False)

    def fn(vecs, words, slots, b):
        return score_mod.score_rows(index, vecs, words, slots, jnp.float32(alpha), jnp.float32(thr), n_queries=b)

    rows = _run_batches(index, agg, fn, lambda imgs, res: np.asarray(res)[: len(imgs)], progress, "score matrix")
    return np.concatenate(rows)


@functools.partial(jax.jit, static_argnames=("multiple_assignment", "topk"))
def query_padded(index: ivf_mod.Index, feats, valid, *, multiple_assignment: int = 5, alpha=3.0,
                 similarity_threshold=0.0, topk: int | None = None):
    """Fully jitted query of a batch of images given as padded descriptor arrays (vmappable).

    Quantization (:func:`~jasmk.codebook.quantize_jax`), aggregation and scoring all run inside one jit.

    Args:
        index: the inverted file.
        feats: ``[B, N, D] float32`` descriptors of ``B`` query images, padded to ``N`` rows.
        valid: ``[B, N] bool`` real descriptor rows.
        multiple_assignment: words per query descriptor (static).
        alpha, similarity_threshold: selective kernel (traced).
        topk: results per query (static; None: all image slots).

    Returns:
        ``(ranks [B, k] int32, scores [B, k] float32)`` as in :func:`~jasmk.score.score_batch`.
    """
    b, n, d = feats.shape
    ma = multiple_assignment
    flat = feats.reshape(b * n, d)
    words = quantize_jax(index.centroids, flat, multiple_assignment=ma, chunk_size=min(4096, b * n))
    slots = jnp.where(valid, jnp.arange(b, dtype=jnp.int32)[:, None], agg_mod.PAD_IMAGE).reshape(b * n)
    agg, agg_words, agg_slots, _ = agg_mod.aggregate_padded(index.centroids, flat, words, slots,
                                                            binary=index.binary, n_slots=b)
    return score_mod.score_rows_ranked(index, agg, agg_words, agg_slots, alpha, similarity_threshold, n_queries=b,
                                       topk=topk)
