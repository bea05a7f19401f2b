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
from . import engine as engine_mod
from . import ivf as ivf_mod
from . import memory
from . import score as score_mod
from . import validate
from .codebook import Codebook, quantize, quantize_jax, train_codebook  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)



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


def _run_batches(index, agg, fn, progress: bool, desc: str):
    """``fn(batch)`` for each :class:`~jasmk.engine.Batch` of the query images in ``agg``, with a progress bar."""
    out = []
    with _progress(int(np.unique(agg.images).size), desc, progress) as bar:
        for batch in engine_mod.batches(index, agg):
            out.append(fn(batch))
            bar.update(len(batch.ids))
    return out


def _check_query_params(index: ivf_mod.Index, alpha, similarity_threshold, topk, engine="auto"):
    engine_mod.check_engine(engine)
    if engine == "sparse-cpu" and not index.binary:
        raise ValueError("engine 'sparse-cpu' scores ASMK* (binary) indexes only; use 'sparse-xla' or 'dense'")
    if index.n_entries == 0:
        raise ValueError("the index is empty: build it with images first")
    alpha = validate.finite_number(alpha, "alpha")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (a negative power of a zero similarity is infinite), got {alpha}")
    thr = validate.finite_number(similarity_threshold, "similarity_threshold")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    return alpha, thr


def query(index: ivf_mod.Index, qfeats, qids, *, multiple_assignment: int = 5, alpha: float = 3.0,
          similarity_threshold: float = 0.0, topk: int | None = None, quantizer: str = "faiss",
          word_ids=None, progress: bool = False, engine: str = "auto") -> QueryResult:
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
        engine: ``"auto"`` (per batch and segment, the cheaper of the dense scan and the sparse kernels),
            ``"dense"``, ``"sparse"``, ``"sparse-xla"`` or ``"sparse-cpu"`` (see :mod:`jasmk.engine`).

    Returns:
        :class:`QueryResult` ``(ids [n_query], ranks [n_query, k], scores [n_query, k])``.
    """
    _check_query_params(index, alpha, similarity_threshold, topk, engine)
    agg = aggregate_images(Codebook(index.centroids, index.codebook_size_param), qfeats, qids,
                           binary=index.binary, multiple_assignment=multiple_assignment, quantizer=quantizer,
                           word_ids=word_ids, sort=False)
    return query_aggregated(index, agg, alpha=alpha, similarity_threshold=similarity_threshold, topk=topk,
                            progress=progress, engine=engine)


def query_aggregated(index: ivf_mod.Index, agg: agg_mod.Aggregated, *, alpha: float = 3.0,
                     similarity_threshold: float = 0.0, topk: int | None = None, progress: bool = False,
                     engine: str = "auto") -> QueryResult:
    """:func:`query` for query images already aggregated (:func:`aggregate_images`, or rows kept from an
    earlier step): ``agg`` rows grouped by image in ascending id order, one row per (image, word)."""
    alpha, thr = _check_query_params(index, alpha, similarity_threshold, topk, engine)
    _check_aggregated(index, agg)
    n_q = int(np.unique(agg.images).size)
    k = index.n_images if topk is None else min(int(topk), index.n_images)
    memory.require(2 * n_q * k * 12, f"ranks and scores of {n_q} queries x {k} images",
                   hint="pass a smaller topk (topk=None ranks every image slot)")

    def fn(batch):
        return (batch.ids,) + engine_mod.ranked(index, batch, alpha, thr, topk=topk, engine=engine)

    ids, ranks, scores = zip(*_run_batches(index, agg, fn, progress, "query"))
    return QueryResult(np.concatenate(ids).astype(np.int64), np.concatenate(ranks), np.concatenate(scores))


def _check_aggregated(index: ivf_mod.Index, agg: agg_mod.Aggregated) -> None:
    if agg.vecs.ndim != 2 or agg.vecs.shape[1] != index.width or agg.vecs.dtype != (
            np.uint32 if index.binary else np.float32):
        raise ValueError(f"aggregated query rows must be [R, {index.width}] "
                         f"{'uint32' if index.binary else 'float32'}, got {agg.vecs.shape} {agg.vecs.dtype}")
    if agg.words.shape[0] == 0:
        raise ValueError("no aggregated query rows")
    if agg.words.min() < 0 or agg.words.max() >= index.n_words:
        raise ValueError(f"aggregated query words must lie in [0, {index.n_words})")
    if (np.diff(agg.images) < 0).any():
        raise ValueError("aggregated query rows must be grouped by image in ascending id order")


def score_matrix(index: ivf_mod.Index, qfeats, qids, *, multiple_assignment: int = 5, alpha: float = 3.0,
                 similarity_threshold: float = 0.0, quantizer: str = "faiss", word_ids=None,
                 progress: bool = False, engine: str = "auto") -> np.ndarray:
    """Dense query-by-database scores: ``[n_query, index.n_images] float32``.

    Row ``i`` is the ``i``-th distinct query id (ascending); column ``j`` is the database image with
    internal id ``j`` (its own id when no distractor index was used). This is the matrix MASt3R's
    Retriever builds from asmk's ranks and scores. ``engine`` as in :func:`query`.
    """
    _check_query_params(index, alpha, similarity_threshold, None, engine)
    agg = aggregate_images(Codebook(index.centroids, index.codebook_size_param), qfeats, qids,
                           binary=index.binary, multiple_assignment=multiple_assignment, quantizer=quantizer,
                           word_ids=word_ids, sort=False)
    return score_matrix_aggregated(index, agg, alpha=alpha, similarity_threshold=similarity_threshold,
                                   progress=progress, engine=engine)


def score_matrix_aggregated(index: ivf_mod.Index, agg: agg_mod.Aggregated, *, alpha: float = 3.0,
                            similarity_threshold: float = 0.0, progress: bool = False,
                            engine: str = "auto") -> np.ndarray:
    """:func:`score_matrix` for query images already aggregated (as :func:`query_aggregated`)."""
    alpha, thr = _check_query_params(index, alpha, similarity_threshold, None, engine)
    _check_aggregated(index, agg)
    n_q = int(np.unique(agg.images).size)
    memory.require(2 * n_q * index.n_images * 4, f"a dense {n_q} x {index.n_images} score matrix",
                   hint="use jasmk.query(..., topk=k) for the best k per query, or query fewer images at a time")
    rows = _run_batches(index, agg, lambda batch: engine_mod.dense_scores(index, batch, alpha, thr, engine=engine),
                        progress, "score matrix")
    return np.concatenate(rows)


def query_padded(index: ivf_mod.Index, feats, valid, *, multiple_assignment: int = 5, alpha=3.0,
                 similarity_threshold=0.0, topk: int | None = None, max_pairs: int | None = None):
    """Fully jitted query of a batch of padded descriptor arrays (vmappable); see :func:`_query_padded`.

    Shapes and static parameters are checked here, also while tracing under ``jit`` / ``vmap``; values (NaN or
    inf descriptors, alpha, the threshold) are checked when they are concrete arrays (a traced value cannot
    raise: check them before the transformation, or use :func:`jax.experimental.checkify`).
    """
    traced_index = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(index))
    if not traced_index and index.n_entries == 0:
        raise ValueError("the index is empty: build it with images first")
    shape = getattr(feats, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"feats must be [B, N, D], got shape {shape}")
    b, n, d = shape
    if b < 1 or n < 1:
        raise ValueError(f"feats must hold at least one image and one row, got shape {tuple(shape)}")
    if d != index.dim:
        raise ValueError(f"feats have dimension {d} but the codebook has dimension {index.dim}")
    if getattr(valid, "shape", None) != (b, n):
        raise ValueError(f"valid must be [B, N] = {(b, n)}, got shape {getattr(valid, 'shape', None)}")
    validate.multiple_assignment(multiple_assignment, index.n_words)
    if n * int(multiple_assignment) > score_mod.MAX_TERMS:
        raise ValueError(f"{n} rows x multiple assignment {multiple_assignment} exceed the {score_mod.MAX_TERMS} "
                         "aggregated rows per image that the fixed-point sums hold; query fewer rows per image")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer))
                                  or max_pairs < 1):
        raise ValueError(f"max_pairs must be a positive int or None, got {max_pairs!r}")
    if not isinstance(feats, jax.core.Tracer):
        validate.descriptors(np.asarray(feats).reshape(b * n, d)[np.asarray(valid).reshape(-1)], dim=index.dim,
                             allow_empty=True)
    for value, name in ((alpha, "alpha"), (similarity_threshold, "similarity_threshold")):
        if not isinstance(value, jax.core.Tracer):
            v = validate.finite_number(np.asarray(value).item() if np.ndim(value) == 0 else value, name)
            if name == "alpha" and v < 0:
                raise ValueError(f"alpha must be >= 0, got {v}")
    return _query_padded(index, feats, valid, multiple_assignment=int(multiple_assignment), alpha=alpha,
                         similarity_threshold=similarity_threshold, topk=topk, max_pairs=max_pairs)


@functools.partial(jax.jit, static_argnames=("multiple_assignment", "topk", "max_pairs"))
def _query_padded(index: ivf_mod.Index, feats, valid, *, multiple_assignment: int = 5, alpha=3.0,
                  similarity_threshold=0.0, topk: int | None = None, max_pairs: int | None = None):
    """Fully jitted query of a batch of images given as padded descriptor arrays (vmappable).

    Quantization (:func:`~jasmk.codebook.quantize_jax`), aggregation and scoring all run inside one jit, over
    every segment of the index (the segment structure is part of the compiled program: an add that creates or
    merges segments compiles it again).

    Args:
        index: the inverted file.
        feats: ``[B, N, D] float32`` descriptors of ``B`` query images, padded to ``N`` rows.
        valid: ``[B, N] bool`` real descriptor rows.
        multiple_assignment: words per query descriptor (static).
        alpha, similarity_threshold: selective kernel (traced).
        topk: results per query (static; None: every image slot of every segment, padding slots last with
            score -inf and rank -1).
        max_pairs: static bound on the (query row, posting) pairs a batch touches in one segment. None: every
            segment is scanned densely. Given: the sparse kernel runs for segments where the batch touches at
            most that many pairs and the dense scan for the others (chosen inside the program, same scores).

    Returns:
        ``(ranks [B, k] int32, scores [B, k] float32)``: best first, ranks in ids minus ``index.imid_offset``,
        equal scores in ascending id order.
    """
    b, n, d = feats.shape
    ma = multiple_assignment
    flat = feats.reshape(b * n, d)
    words = quantize_jax(index.centroids, flat, multiple_assignment=ma, chunk_size=min(4096, b * n))
    slots = jnp.where(valid, jnp.arange(b, dtype=jnp.int32)[:, None], agg_mod.PAD_IMAGE).reshape(b * n)
    agg, agg_words, agg_slots, _ = agg_mod.aggregate_padded(index.centroids, flat, words, slots,
                                                            binary=index.binary, n_slots=b)
    q_scale = score_mod.query_scale(index.idf, agg_words, agg_slots, b)
    alpha = jnp.asarray(alpha, jnp.float32)
    thr = jnp.asarray(similarity_threshold, jnp.float32)
    ids, scores = [], []
    for seg in index.segments:
        args = (seg, index.idf, agg, agg_words, agg_slots, q_scale, alpha, thr)
        if max_pairs is None:
            s = score_mod.dense_segment(*args, n_queries=b)
        else:
            s = score_mod.sparse_or_dense(*args, n_queries=b, pairs_cap=ivf_mod.capacity(max_pairs, minimum=1024))
        k = seg.image_capacity if topk is None else min(int(topk), seg.image_capacity)
        i, t = score_mod.segment_top_k(s, seg, k=k)
        ids.append(i)
        scores.append(t)
    ids, scores = jnp.concatenate(ids, axis=1), jnp.concatenate(scores, axis=1)
    k = ids.shape[1] if topk is None else min(int(topk), ids.shape[1])
    scores, pos = jax.lax.top_k(scores, k)  # ties: the lower position, i.e. the lower id, first
    ranks = jnp.take_along_axis(ids, pos, axis=1) - index.imid_offset
    return jnp.where(scores > score_mod.NEG_INF, ranks, -1), scores
