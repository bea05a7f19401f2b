"""The user-facing functions: build an index from local descriptors, query it, get a dense score matrix.

Defaults follow HOW/MASt3R's asmk parameters: ASMK* (binary), no idf, one assignment when
indexing, five when querying, ``alpha = 3``, ``similarity_threshold = 0``.
"""

from __future__ import annotations

import functools
import logging
import os
import typing

import jax
import jax.numpy as jnp
import numpy as np

from .core import aggregate as agg_mod
from .core import engine as engine_mod
from .core import ivf as ivf_mod
from .core import memory, presets, runtime, validate
from .core import progress as progress_mod
from .core import score as score_mod
from .core.codebook import Codebook, quantize, quantize_jax, train_codebook  # noqa: F401  (re-exported)
from .storage import asmk_format, checkpoint

log = logging.getLogger(__name__)

# Codebook that build_index trains when it is given none: a seeded sample of the descriptors, at least
# FAISS_MIN_PER_WORD descriptors per word (below that faiss warns that k-means is under-trained), a power of two
# of words between AUTO_MIN_WORDS and AUTO_MAX_WORDS.
AUTO_SAMPLE = 1 << 18  # descriptors: k-means on 2**18 x 128-d into 4096 words takes about a minute on 2 cores
FAISS_MIN_PER_WORD = 39
AUTO_MIN_WORDS = 16
AUTO_MAX_WORDS = 1 << 16


class QueryResult(typing.NamedTuple):
    """Result of :func:`query`.

    Attributes:
        ids: ``[n_query] int64`` query image ids: the distinct ids of the query descriptors, ascending, or
            ``query_ids`` as given.
        ranks: ``[n_query, k] int64`` database image ids, best first.
        scores: ``[n_query, k] float32`` their scores.
    """

    ids: np.ndarray
    ranks: np.ndarray
    scores: np.ndarray


def progress_bar(total: int, desc: str, enabled: bool):
    """Progress over ``total`` images on stderr (a no-op when disabled): a tqdm bar on a terminal or in a
    notebook, whole lines in a log file (:func:`jasmk.core.progress.bar`)."""
    return progress_mod.bar(total, desc, enabled=enabled)


def as_codebook(codebook) -> Codebook:
    """A :class:`Codebook` from a codebook, ``[K, D]`` centroids, or the path of a saved one: a jasmk codebook
    checkpoint (:func:`jasmk.save_codebook`), the codebook of a jasmk index checkpoint, or asmk's codebook
    ``.pkl`` (MASt3R's ``*_codebook.pkl``).

    Raises:
        ValueError: None, a path that holds no codebook, or centroids that are not ``[K, D]`` finite floats.
    """
    if isinstance(codebook, Codebook):
        return codebook
    if codebook is None:
        raise ValueError("a codebook is required, got None: pass codebook=jasmk.train_codebook(...) or a [K, D] "
                         "array (build_index trains one when codebook= is left out)")
    if isinstance(codebook, (str, os.PathLike)):
        path = os.fspath(codebook)
        if not os.path.exists(path):
            raise ValueError(f"codebook must be a Codebook, [K, D] centroids or the path of a saved codebook, got "
                             f"{path!r}, which does not exist (a codebook of a given size: "
                             "jasmk.train_codebook(x, size=...))")
        if os.path.isdir(path) and checkpoint.checkpoint_kind(path) == "index":
            index = checkpoint.load_index(path)
            return Codebook(np.asarray(index.centroids), index.codebook_size_param)
        if os.path.isfile(path) and asmk_format.is_pickle(path):
            return asmk_format.load_asmk_codebook(path)
        return checkpoint.load_codebook(path)
    return Codebook.from_centroids(codebook)


def aggregate_images(centroids, feats, ids, *, binary: bool, multiple_assignment: int, quantizer: str = "auto",
                     word_ids=None, sort: bool = True, allow_empty: bool = False):
    """Validate, quantize and aggregate descriptors ``feats`` (``[N, D]``) of images ``ids`` (``[N]``).

    Args:
        centroids: a :class:`~jasmk.codebook.Codebook`, ``[K, D]`` centroids or a path (see :func:`as_codebook`).
        quantizer: the ``method`` of :func:`jasmk.quantize` (``"auto"``: resolved there, by
            :func:`~jasmk.core.codebook.choose_quantizer`); each descriptor's words do not depend on the others.
        word_ids: optional precomputed ``[N, MA] int`` assignments (e.g. from :func:`jasmk.quantize`); when
            given, quantization is skipped and ``multiple_assignment`` must equal ``MA``.
        sort: sort each image's rows by word (asmk's order); the index and the scorer do not need it.
        allow_empty: accept ``N = 0`` descriptors (no rows come out).

    Returns:
        :class:`~jasmk.aggregate.Aggregated` rows sorted by (image, word).
    """
    cb = as_codebook(centroids)
    x = validate.descriptors(feats, dim=cb.dim, allow_empty=allow_empty)
    imids = validate.image_ids(ids, x.shape[0], wide=True)
    if word_ids is not None:
        word_ids = validate.word_ids(word_ids, x.shape[0], cb.size, multiple_assignment)
    return _aggregate_checked(cb, x, imids, word_ids, binary=binary, multiple_assignment=multiple_assignment,
                              quantizer=quantizer, sort=sort)


def _aggregate_checked(cb: Codebook, x: np.ndarray, imids: np.ndarray, words, *, binary: bool,
                       multiple_assignment: int, quantizer: str, sort: bool) -> agg_mod.Aggregated:
    """:func:`aggregate_images` of inputs it has checked: ``x`` ``[N, D] float32``, ``imids`` ``[N] int64``
    grouped ascending, ``words`` ``[N, MA] int32`` or None (quantized here)."""
    names = None
    if imids.size and int(imids[-1]) >= agg_mod.PAD_IMAGE:  # beyond the aggregation's int32 ids: number them
        names, imids = np.unique(imids, return_inverse=True)
    if words is None and x.shape[0] == 0:
        ma = validate.multiple_assignment(multiple_assignment, cb.size)
        words = np.zeros((0, ma), np.int32)
    elif words is None:
        words = quantize(cb, x, multiple_assignment=multiple_assignment, method=quantizer)
    agg = agg_mod.aggregate(cb.centroids, x, words, imids, binary=binary, sort=sort)
    return agg if names is None else agg._replace(images=names[agg.images])  # int64 ids back


def auto_codebook_plan(n_descriptors: int, *, sample: int = AUTO_SAMPLE, seed: int = 1234):
    """The sample and size of the codebook :func:`build_index` trains when it is given none.

    The sample is every descriptor when there are at most ``sample`` of them, else
    ``np.sort(np.random.default_rng(seed).choice(n_descriptors, sample, replace=False))``. The number of words is
    the largest power of two with at least :data:`FAISS_MIN_PER_WORD` (39) sample descriptors per word, at most
    :data:`AUTO_MAX_WORDS` (65536).

    Returns:
        ``(rows [M] int64, n_words)``: the ascending sample rows and the codebook size.

    Raises:
        ValueError: fewer than ``39 * AUTO_MIN_WORDS`` (624) descriptors, or a bad ``sample``.
    """
    n = int(n_descriptors)
    if not validate.is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not validate.is_int(sample) or sample < 1:
        raise ValueError(f"codebook_sample must be a positive int, got {sample!r}")
    m = min(n, int(sample))
    need = FAISS_MIN_PER_WORD * AUTO_MIN_WORDS
    if m < need:
        raise ValueError(
            f"build_index without codebook= trains a codebook on the features, which needs at least {need} "
            f"descriptors ({FAISS_MIN_PER_WORD} per word, {AUTO_MIN_WORDS} words); got {m}"
            + (f" (codebook_sample={sample})" if m < n else "")
            + ": pass codebook=jasmk.train_codebook(train_feats, size=...)")
    k = min(AUTO_MAX_WORDS, 1 << ((m // FAISS_MIN_PER_WORD).bit_length() - 1))
    if m == n:
        rows = np.arange(n, dtype=np.int64)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n, m, replace=False)).astype(np.int64)
    return rows, k


class _DropInfo(logging.Filter):
    """Drops records below WARNING (keeps :func:`build_index`'s codebook training to its own one line)."""

    def filter(self, record):
        return record.levelno >= logging.WARNING


def _train_auto_codebook(x: np.ndarray, *, sample: int, seed: int) -> Codebook:
    rows, k = auto_codebook_plan(x.shape[0], sample=sample, seed=seed)
    log.info("build_index: no codebook given: training %d words on %d of the %d descriptors (seed %d); "
             "for benchmarks pass codebook= trained on separate data", k, rows.size, x.shape[0], seed)
    train = x if rows.size == x.shape[0] else x[rows]
    quiet = _DropInfo()
    cb_log = logging.getLogger(train_codebook.__module__)
    cb_log.addFilter(quiet)
    try:
        return train_codebook(train, size=k, seed=seed)
    finally:
        cb_log.removeFilter(quiet)


def build_index(feats, ids, *, codebook="auto", binary: bool = True, use_idf: bool = False,
                multiple_assignment: int = 1, quantizer: str = "auto", distractors: ivf_mod.Index | None = None,
                word_ids=None, seed: int = 1234, codebook_sample: int = AUTO_SAMPLE, names=None,
                preset: str | None = None) -> ivf_mod.Index:
    """Build an inverted file from local descriptors.

    ``jasmk.build_index(feats, ids)`` is the short form: without ``codebook=`` (``"auto"``; with
    ``distractors=``, their codebook is used) a codebook is trained on the descriptors themselves, on a seeded sample of
    at most ``codebook_sample`` of them, with as many words as the sample supports (a power of two, at least 39
    descriptors per word, 16 to 65536 words; see :func:`auto_codebook_plan`), logging one INFO line. The
    codebook stays on the index (``index.centroids``): queries and checkpoints use it.

    Training the codebook on the images being searched suits exploring your own collection, not measuring:
    benchmarks, and the HOW / revisited Oxford-Paris protocol in particular, must pass a codebook trained on
    separate data (asmk trains on SfM-120k), since training on the test images is a protocol leak.

    Args:
        feats: ``[N, D] float32`` descriptors of all database images.
        ids: ``[N] int`` image id of each descriptor, grouped in ascending order (``0..n-1`` typically).
        codebook: a :class:`~jasmk.codebook.Codebook`, ``[K, D]`` centroids, or the path of a saved codebook (a
            jasmk codebook or index checkpoint, or asmk's codebook ``.pkl``; see :func:`as_codebook`); ``"auto"``
            (the default): train one (see above). None is an error (a codebook variable never set, most likely).
        binary: ASMK* (packed sign bits) if True, ASMK (real unit vectors) if False.
        use_idf: weight words by ``log(n_images / count)**2``.
        multiple_assignment: words per descriptor when indexing.
        quantizer: ``"auto"`` (JAX on an accelerator; on the CPU, for at most 256 dimensions, the list search from
            4096 to 16384 words and HNSW above, else exact faiss: :func:`~jasmk.core.codebook.choose_quantizer`),
            ``"exact"`` (never approximate), ``"faiss"``, ``"jax"``, ``"ivf"`` or ``"hnsw"`` (approximate); see
            :func:`jasmk.quantize`.
        distractors: an index whose images stay in the new index before the new ones (asmk's
            distractor ivf; new ids are offset by its image count and query ranks are reported minus it).
        word_ids: optional precomputed ``[N, MA]`` word assignments (skips quantization).
        seed: seed of the codebook's sample and of its k-means (only without ``codebook=``).
        codebook_sample: most descriptors the codebook is trained on (only without ``codebook=``).
        names: optional image names (str), one per image in ascending id order (hloc's image names, say): kept in
            the index (``index.names``) and its checkpoints; pairs files and results are written with them.
        preset: ``"how"``, ``"mast3r"`` or ``"sift"`` (:mod:`jasmk.core.presets`): its ``binary``, ``use_idf``
            and ``multiple_assignment`` replace the defaults (an argument given another value wins); ``"sift"``
            also turns raw SIFT into RootSIFT (unit-norm descriptors, hloc's, are left as they are).

    Returns:
        The :class:`~jasmk.ivf.Index`.

    Raises:
        ValueError: bad input; without ``codebook=``, too few descriptors to train one.
    """
    if preset is not None:
        p = presets.get(preset)
        kw = presets.resolve(preset, dict(binary=binary, use_idf=use_idf, multiple_assignment=multiple_assignment),
                             dict(binary=True, use_idf=False, multiple_assignment=1), p.build_kwargs())
        binary, use_idf, multiple_assignment = kw["binary"], kw["use_idf"], kw["multiple_assignment"]
        if p.rootsift:
            feats = presets.sift_input(feats, mode=p.rootsift)
    auto = isinstance(codebook, str) and codebook == "auto" and not os.path.exists(codebook)
    if auto and distractors is not None:
        codebook = Codebook(distractors.centroids, distractors.codebook_size_param)
    elif auto:
        if word_ids is not None:
            raise ValueError("word_ids were given without the codebook they index: pass codebook= too")
        x = validate.descriptors(feats)
        validate.image_ids(ids, x.shape[0])  # bad ids fail before minutes of k-means
        codebook = _train_auto_codebook(x, sample=codebook_sample, seed=seed)
        feats = x
    cb = as_codebook(codebook)
    if distractors is not None:
        if distractors.dim != cb.dim or distractors.n_words != cb.size:
            raise ValueError("the distractor index was built with a different codebook")
        if distractors.binary != bool(binary) or distractors.use_idf != bool(use_idf):
            raise ValueError("the distractor index has different binary/use_idf settings")
        index = ivf_mod.with_distractors(distractors)
    else:
        index = ivf_mod.empty(cb.centroids, binary=binary, use_idf=use_idf, codebook_size_param=cb.size_param)
    return add_images(index, feats, ids, multiple_assignment=multiple_assignment, quantizer=quantizer,
                      word_ids=word_ids, names=names)


def empty_index(codebook, *, binary: bool = True, use_idf: bool = False) -> ivf_mod.Index:
    """An index without images over ``codebook`` (a :class:`~jasmk.codebook.Codebook` or ``[K, D]`` centroids), to
    grow with :func:`add_images` (e.g. keyframes arriving one by one; see :func:`reserve`)."""
    cb = as_codebook(codebook)
    return ivf_mod.empty(cb.centroids, binary=bool(binary), use_idf=bool(use_idf), codebook_size_param=cb.size_param)


def add_images(index: ivf_mod.Index, feats, ids, *, multiple_assignment: int = 1, quantizer: str = "auto",
               word_ids=None, names=None) -> ivf_mod.Index:
    """Return ``index`` with more images added (their ids must be larger than those already there); ``names``:
    one per new image in ascending id order, for an index that names its images (see :func:`build_index`)."""
    agg = aggregate_images(Codebook(index.centroids, index.codebook_size_param), feats, ids,
                           binary=index.binary, multiple_assignment=multiple_assignment, quantizer=quantizer,
                           word_ids=word_ids, sort=False)
    return ivf_mod.add(index, agg, names=names)


def reserve(index: ivf_mod.Index, *, images: int, postings: int | None = None, query_rows: int | None = None,
            warm: bool | str = True, n_queries=(1,), topk: int | None = None, kernel: str = "auto", padded=None,
            multiple_assignment: int = 5) -> ivf_mod.Index:
    """Reserve room in ``index`` for ``images`` more images, so that a loop of adds and queries within the
    reservation compiles nothing (MASt3R-SLAM's keyframes, a photo collection growing online).

    Images added afterwards go into segments of a few fixed shapes (:class:`jasmk.core.ivf.Reservation`), and
    with ``warm`` the XLA kernels that queries will run on those shapes are compiled now
    (:func:`jasmk.core.engine.warm_up`; on the CPU, ASMK* is scored by the compiled CPU kernel and there is
    nothing to compile). Scores do not change. A run past the reservation (more images or postings) still works:
    new shapes compile once each (logged at INFO). The reservation is not saved in checkpoints.

    Args:
        index: the index, possibly empty (:func:`empty_index`).
        images: images the run will add.
        postings: postings those images will hold (descriptors x multiple assignment, at most); default: the
            index's postings per image so far, plus a quarter.
        query_rows: aggregated rows of one query image (default: 8 per indexed posting of an image).
        warm: compile the kernels now, for batches of ``n_queries`` images, ``topk`` results and ``kernel``;
            ``"background"``: in a daemon thread, so that the caller goes on (a query meanwhile compiles what it
            needs itself, once).
        padded: also compile what :func:`query_padded` runs on the reserved shapes for ``feats`` of shape
            ``(B, N, D)`` given as ``(B, N)`` (dense scan, ``multiple_assignment`` words per descriptor; every
            merge of per-segment lists when ``topk`` is at most the smallest reserved segment's image slots).
        multiple_assignment: the query's words per descriptor (``padded`` only).

    Returns:
        The index with its reservation.
    """
    if postings is None:
        if index.n_images == 0 or index.n_entries == 0:
            raise ValueError("the index is empty: pass postings= (what the reserved images will hold)")
        if not validate.is_int(images) or images < 1:
            raise ValueError(f"images must be a positive int, got {images!r}")
        postings = int(images) * max(1, -(-5 * index.n_entries // (4 * index.n_images)))
    kernel = engine_mod.check_kernel(kernel)
    if warm not in (True, False, "background"):
        raise ValueError(f"warm must be True, False or 'background', got {warm!r}")
    if padded is not None:
        if (not isinstance(padded, (tuple, list)) or len(padded) != 2
                or not all(validate.is_int(x) and x >= 1 for x in padded)):
            raise ValueError(f"padded must be (B, N), the batch and row counts of query_padded's feats, got "
                             f"{padded!r}")
        validate.multiple_assignment(multiple_assignment, index.n_words)
    out = ivf_mod.reserve(index, images=images, postings=postings, query_rows=query_rows)

    def compile_all():
        engine_mod.warm_up(out, n_queries=n_queries, topk=topk, kernel=kernel)
        if padded is not None:
            _warm_padded(out, int(padded[0]), int(padded[0] * padded[1] * multiple_assignment), topk)

    if warm == "background":
        runtime.in_background(compile_all, name="jasmk-warm-up")
    elif warm:
        compile_all()
    return out


def _warm_padded(index: ivf_mod.Index, b: int, rows: int, topk: int | None) -> None:
    """Compile what :func:`query_padded` runs on the reserved shapes for ``b`` images of ``rows`` padded rows."""
    engine_mod.warm_up(index, n_queries=(), topk=topk, kernel="dense", padded_rows=(b, rows))
    sizes = sorted({images if topk is None else min(int(topk), images) for _, images in index.reservation.shapes()})
    for ka in sizes:  # the merges of per-segment lists (all of them when topk <= the smallest segment)
        for kb in sizes:
            k = ka + kb if topk is None else min(int(topk), ka + kb)
            jax.block_until_ready(_merge_best(np.zeros((b, ka), np.int32), np.zeros((b, ka), np.float32),
                                              np.zeros((b, kb), np.int32), np.zeros((b, kb), np.float32), k=k))
    jax.block_until_ready(_public_ranks(np.zeros((b, sizes[0]), np.int32), np.zeros((b, sizes[0]), np.float32),
                                        np.int32(0)))


def _run_batches(index, blocks, fn, progress: bool, desc: str, n_images: int):
    """``fn(batch)`` for each :class:`~jasmk.engine.Batch` of the query images of each aggregated block of
    ``blocks`` (an iterable of :class:`~jasmk.aggregate.Aggregated`, made as they are needed), with one progress
    bar over ``n_images`` images."""
    out = []
    with progress_bar(int(n_images), desc, progress) as bar:
        for agg in blocks:
            for batch in engine_mod.batches(agg, **engine_mod.layout(index)):
                out.append(fn(batch))
                bar.update(len(batch.ids))
    return out


#: :func:`query` and :func:`score_matrix` quantize, aggregate and score this many query descriptors at a time
#: (whole images), so that the aggregated rows of a large query set are never all in memory at once.
QUERY_BLOCK_DESCRIPTORS = 1 << 18


def _query_blocks(index: ivf_mod.Index, qfeats, qids, *, multiple_assignment: int, quantizer: str, word_ids,
                  allow_empty: bool):
    """``(image ids [n] int64, blocks)``: the distinct query image ids, and an iterator that quantizes and
    aggregates :data:`QUERY_BLOCK_DESCRIPTORS` descriptors of whole images at a time (ascending ids). Inputs
    are checked here, before any block is made."""
    cb = Codebook(index.centroids, index.codebook_size_param)
    x = validate.descriptors(qfeats, dim=cb.dim, allow_empty=allow_empty)
    imids = validate.image_ids(qids, x.shape[0], wide=True)
    ma = validate.multiple_assignment(multiple_assignment, cb.size)
    if word_ids is not None:
        word_ids = validate.word_ids(word_ids, x.shape[0], cb.size, ma)
    spans = agg_mod.image_chunks(imids, QUERY_BLOCK_DESCRIPTORS, max(1, x.shape[0]))

    def blocks():  # inputs checked above, once: each block goes straight to quantization and aggregation
        for start, stop in spans:
            yield _aggregate_checked(cb, x[start:stop], imids[start:stop],
                                     None if word_ids is None else word_ids[start:stop], binary=index.binary,
                                     multiple_assignment=ma, quantizer=quantizer, sort=False)

    return np.unique(imids).astype(np.int64), blocks()


def check_query_params(index: ivf_mod.Index, alpha, similarity_threshold, topk, kernel="auto"):
    """``(alpha, threshold)`` after checking a query's parameters against ``index`` (a ``ValueError`` says
    what is wrong)."""
    engine_mod.check_kernel(kernel)
    if kernel == "sparse-cpu" and not index.binary:
        raise ValueError("kernel 'sparse-cpu' scores ASMK* (binary) indexes only; use 'sparse-xla' or 'dense'")
    if index.n_entries == 0:
        raise ValueError("the index is empty: build it with images first")
    alpha = validate.finite_number(alpha, "alpha")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (a negative power of a zero similarity is infinite), got {alpha}")
    thr = validate.finite_number(similarity_threshold, "similarity_threshold")
    if topk is not None and (not validate.is_int(topk) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    return alpha, thr


def _query_preset(preset, qfeats, multiple_assignment, alpha, similarity_threshold):
    """``(qfeats, multiple_assignment, alpha, similarity_threshold)`` after ``preset`` (see :func:`query`)."""
    if preset is None:
        return qfeats, multiple_assignment, alpha, similarity_threshold
    p = presets.get(preset)
    kw = presets.resolve(preset, dict(multiple_assignment=multiple_assignment, alpha=alpha,
                                      similarity_threshold=similarity_threshold),
                         dict(multiple_assignment=5, alpha=3.0, similarity_threshold=0.0), p.query_kwargs())
    if p.rootsift:
        qfeats = presets.sift_input(qfeats, mode=p.rootsift)
    return qfeats, kw["multiple_assignment"], kw["alpha"], kw["similarity_threshold"]


def query(index: ivf_mod.Index, qfeats, qids, *, multiple_assignment: int = 5, alpha: float = 3.0,
          similarity_threshold: float = 0.0, topk: int | None = None, quantizer: str = "auto",
          word_ids=None, progress: bool = False, kernel: str = "auto", engine: str | None = None,
          query_ids=None, preset: str | None = None) -> QueryResult:
    """Rank the database images for each query image.

    The query images are quantized, aggregated and scored :data:`QUERY_BLOCK_DESCRIPTORS` descriptors (whole
    images) at a time: the results are those of one pass, and the memory is that of one block.

    Args:
        index: the :class:`~jasmk.ivf.Index`.
        qfeats: ``[N, D] float32`` query descriptors.
        qids: ``[N] int`` query image id of each descriptor, grouped ascending.
        multiple_assignment: words per query descriptor.
        alpha, similarity_threshold: selective kernel ``u**alpha`` for ``u >= threshold``.
        topk: number of results per query (None: all database image slots).
        word_ids: optional precomputed ``[N, MA]`` word assignments (skips quantization).
        progress: show a progress bar on stderr.
        kernel: ``"auto"`` (per batch and segment, the cheaper of the dense scan and the sparse kernels),
            ``"dense"``, ``"sparse"``, ``"sparse-xla"`` or ``"sparse-cpu"`` (see :mod:`jasmk.core.engine`).
        engine: jasmk 0.1's name for ``kernel`` (warns; until 0.3).
        query_ids: optional ``[n_query] int`` distinct query image ids, one result row each in this order. An
            image named here without descriptors (e.g. a blank photo) gets a row of zero scores ranking the
            database in ascending id order (as asmk orders all-zero scores); every id in ``qids`` must be named.
            None: one row per distinct id of ``qids``, ascending (asmk's behaviour: an image without
            descriptors has no row).
        preset: ``"how"``, ``"mast3r"`` or ``"sift"`` (:mod:`jasmk.core.presets`): its ``multiple_assignment``,
            ``alpha`` and ``similarity_threshold`` replace the defaults (an argument given another value wins);
            ``"sift"`` also turns raw SIFT into RootSIFT (unit-norm descriptors are left as they are).

    Returns:
        :class:`QueryResult` ``(ids [n_query], ranks [n_query, k], scores [n_query, k])``.
    """
    qfeats, multiple_assignment, alpha, similarity_threshold = _query_preset(
        preset, qfeats, multiple_assignment, alpha, similarity_threshold)
    kernel = engine_mod.kernel_arg(kernel, engine)
    alpha, thr = check_query_params(index, alpha, similarity_threshold, topk, kernel)
    present, blocks = _query_blocks(index, qfeats, qids, multiple_assignment=multiple_assignment,
                                    quantizer=quantizer, word_ids=word_ids, allow_empty=query_ids is not None)
    return _ranked(index, blocks, present, alpha=alpha, thr=thr, topk=topk, progress=progress, kernel=kernel,
                   query_ids=query_ids)


def query_aggregated(index: ivf_mod.Index, agg: agg_mod.Aggregated, *, alpha: float = 3.0,
                     similarity_threshold: float = 0.0, topk: int | None = None, progress: bool = False,
                     kernel: str = "auto", engine: str | None = None, query_ids=None) -> QueryResult:
    """:func:`query` for query images already aggregated (:func:`aggregate_images`, or rows kept from an
    earlier step): ``agg`` rows grouped by image in ascending id order, one row per (image, word).
    ``query_ids`` as in :func:`query` (with it, ``agg`` may hold no rows)."""
    kernel = engine_mod.kernel_arg(kernel, engine)
    alpha, thr = check_query_params(index, alpha, similarity_threshold, topk, kernel)
    check_aggregated(index, agg, allow_empty=query_ids is not None)
    present = np.unique(agg.images).astype(np.int64)
    return _ranked(index, [agg], present, alpha=alpha, thr=thr, topk=topk, progress=progress, kernel=kernel,
                   query_ids=query_ids)


def _ranked(index: ivf_mod.Index, blocks, present: np.ndarray, *, alpha: float, thr: float, topk, progress: bool,
            kernel: str, query_ids) -> QueryResult:
    """:func:`query`'s results over the aggregated ``blocks`` of the query images ``present`` (checked)."""
    named = None if query_ids is None else _named_query_ids(query_ids, present)
    n_q = present.size if named is None else named.size
    k = index.n_images if topk is None else min(int(topk), index.n_images)
    memory.require(2 * n_q * k * 12, f"ranks and scores of {n_q} queries x {k} images",
                   hint="pass a smaller topk (topk=None ranks every image slot)")

    def fn(batch):
        return (batch.ids,) + engine_mod.ranked(index, batch, alpha, thr, topk=topk, kernel=kernel)

    got = _run_batches(index, blocks, fn, progress, "query", present.size) if present.size else []
    if got:
        ids, ranks, scores = zip(*got)
        ids, ranks, scores = np.concatenate(ids).astype(np.int64), np.concatenate(ranks), np.concatenate(scores)
    else:
        ids, ranks, scores = present[:0], np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    if named is None:
        return QueryResult(ids, ranks, scores)
    # images named without descriptors: all-zero scores, ranked by ascending id as asmk's argsort orders them
    empty_ranks = index.image_ids[:k].astype(ranks.dtype)
    out_ranks = np.broadcast_to(empty_ranks, (n_q, k)).copy()
    out_scores = np.zeros((n_q, k), scores.dtype)
    rows, src = _rows_of(named, ids)
    out_ranks[rows], out_scores[rows] = ranks[src], scores[src]
    return QueryResult(named, out_ranks, out_scores)


def _named_query_ids(query_ids, present: np.ndarray) -> np.ndarray:
    """``query_ids`` as ``[n] int64`` after checking them (distinct, non-negative ints naming every image of
    ``present``, the ids that have descriptors)."""
    q = np.asarray(query_ids)
    if q.ndim != 1:
        raise ValueError(f"query_ids must be a 1-D array of image ids, got shape {q.shape}")
    if q.size == 0:
        raise ValueError("query_ids is empty: name at least one query image")
    if not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"query_ids must be integers, got dtype {q.dtype}")
    q = q.astype(np.int64)
    if q.min() < 0:
        raise ValueError(f"query_ids must be non-negative, got {q.min()}")
    uniq, counts = np.unique(q, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"query_ids name image {uniq[counts > 1][0]} more than once")
    unnamed = np.setdiff1d(present, uniq)
    if unnamed.size:
        raise ValueError(f"the query descriptors of image(s) {unnamed[:5].tolist()}{'...' if unnamed.size > 5 else ''} "
                         "are not named in query_ids")
    return q


def _rows_of(named: np.ndarray, ids: np.ndarray):
    """``(rows, src)``: ``named[rows[i]] == ids[src[i]]`` for every id of ``named`` found in ``ids`` (ascending)."""
    if ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.minimum(np.searchsorted(ids, named), ids.size - 1)
    hit = ids[pos] == named
    return np.flatnonzero(hit), pos[hit]


def check_aggregated(index: ivf_mod.Index, agg: agg_mod.Aggregated, *, allow_empty: bool = False) -> None:
    if agg.vecs.ndim != 2 or agg.vecs.shape[1] != index.width or agg.vecs.dtype != (
            np.uint32 if index.binary else np.float32):
        raise ValueError(f"aggregated query rows must be [R, {index.width}] "
                         f"{'uint32' if index.binary else 'float32'}, got {agg.vecs.shape} {agg.vecs.dtype}")
    if agg.words.shape[0] == 0:
        if allow_empty:
            return
        raise ValueError("no aggregated query rows")
    if agg.words.min() < 0 or agg.words.max() >= index.n_words:
        raise ValueError(f"aggregated query words must lie in [0, {index.n_words})")
    if (np.diff(agg.images) < 0).any():
        raise ValueError("aggregated query rows must be grouped by image in ascending id order")


def score_matrix(index: ivf_mod.Index, qfeats, qids, *, multiple_assignment: int = 5, alpha: float = 3.0,
                 similarity_threshold: float = 0.0, quantizer: str = "auto", word_ids=None,
                 progress: bool = False, kernel: str = "auto", engine: str | None = None, query_ids=None,
                 preset: str | None = None) -> np.ndarray:
    """Dense query-by-database scores: ``[n_query, index.n_images] float32``.

    Row ``i`` is the ``i``-th distinct query id (ascending), or ``query_ids[i]`` when given (an image named
    there without descriptors gets a row of zeros; see :func:`query`); column ``j`` is the database image
    ``index.image_ids[j]`` (ids ascending; ``j`` itself when the ids are ``0..n-1``). This is the matrix MASt3R's
    Retriever builds from asmk's ranks and scores. ``kernel`` and ``preset`` as in :func:`query`, which also
    says how the query images are worked through in blocks.
    """
    qfeats, multiple_assignment, alpha, similarity_threshold = _query_preset(
        preset, qfeats, multiple_assignment, alpha, similarity_threshold)
    kernel = engine_mod.kernel_arg(kernel, engine)
    alpha, thr = check_query_params(index, alpha, similarity_threshold, None, kernel)
    present, blocks = _query_blocks(index, qfeats, qids, multiple_assignment=multiple_assignment,
                                    quantizer=quantizer, word_ids=word_ids, allow_empty=query_ids is not None)
    return _scored(index, blocks, present, alpha=alpha, thr=thr, progress=progress, kernel=kernel,
                   query_ids=query_ids)


def score_matrix_aggregated(index: ivf_mod.Index, agg: agg_mod.Aggregated, *, alpha: float = 3.0,
                            similarity_threshold: float = 0.0, progress: bool = False,
                            kernel: str = "auto", engine: str | None = None, query_ids=None) -> np.ndarray:
    """:func:`score_matrix` for query images already aggregated (as :func:`query_aggregated`)."""
    kernel = engine_mod.kernel_arg(kernel, engine)
    alpha, thr = check_query_params(index, alpha, similarity_threshold, None, kernel)
    check_aggregated(index, agg, allow_empty=query_ids is not None)
    present = np.unique(agg.images).astype(np.int64)
    return _scored(index, [agg], present, alpha=alpha, thr=thr, progress=progress, kernel=kernel,
                   query_ids=query_ids)


def _scored(index: ivf_mod.Index, blocks, present: np.ndarray, *, alpha: float, thr: float, progress: bool,
            kernel: str, query_ids) -> np.ndarray:
    """:func:`score_matrix` over the aggregated ``blocks`` of the query images ``present`` (checked)."""
    named = None if query_ids is None else _named_query_ids(query_ids, present)
    n_q = present.size if named is None else named.size
    memory.require(2 * n_q * index.n_images * 4, f"a dense {n_q} x {index.n_images} score matrix",
                   hint="use jasmk.query(..., topk=k) for the best k per query, or query fewer images at a time")

    def fn(batch):
        return batch.ids, engine_mod.dense_scores(index, batch, alpha, thr, kernel=kernel)

    got = _run_batches(index, blocks, fn, progress, "score matrix", present.size) if present.size else []
    if got:
        ids = np.concatenate([i for i, _ in got]).astype(np.int64)
        scores = np.concatenate([r for _, r in got])
    else:
        ids, scores = present[:0], np.zeros((0, index.n_images), np.float32)
    if named is None:
        return scores
    out = np.zeros((n_q, index.n_images), np.float32)
    rows, src = _rows_of(named, ids)
    out[rows] = scores[src]
    return out


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
    if topk is not None and (not validate.is_int(topk) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    if max_pairs is not None and (not validate.is_int(max_pairs)
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


@functools.partial(jax.jit, static_argnames=("multiple_assignment", "binary"))
def _prepare_padded(centroids, idf, feats, valid, *, multiple_assignment: int, binary: bool):
    """Quantized, aggregated query rows of padded descriptors: ``(rows, words, slots, q_scale)``."""
    b, n, d = feats.shape
    flat = feats.reshape(b * n, d)
    words = quantize_jax(centroids, flat, multiple_assignment=multiple_assignment, chunk_size=min(4096, b * n))
    slots = jnp.where(valid, jnp.arange(b, dtype=jnp.int32)[:, None], agg_mod.PAD_IMAGE).reshape(b * n)
    agg, agg_words, agg_slots, _ = agg_mod.aggregate_padded(centroids, flat, words, slots, binary=binary, n_slots=b)
    return agg, agg_words, agg_slots, score_mod.query_scale(idf, agg_words, agg_slots, b)


def _segment_best(seg, idf, rows, words, slots, q_scale, alpha, thr, *, n_queries: int, k: int,
                  pairs_cap: int | None):
    """The best ``k`` image slots of one segment for a padded batch: ``(internal ids [B, k], scores [B, k])``
    (the engine's jitted kernels, so that :func:`reserve`'s warm-up serves both)."""
    args = (seg, idf, rows, words, slots, q_scale, alpha, thr)
    if pairs_cap is None:
        s = score_mod.dense_segment(*args, n_queries=n_queries)
    else:
        s = score_mod.sparse_or_dense(*args, n_queries=n_queries, pairs_cap=pairs_cap)
    return score_mod.segment_top_k(s, seg, k=k)


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_best(ids_a, scores_a, ids_b, scores_b, *, k: int):
    """The best ``k`` of two ranked lists, ``a`` holding lower ids (equal scores: ``a``'s first, then lower ids)."""
    ids, scores = jnp.concatenate([ids_a, ids_b], axis=1), jnp.concatenate([scores_a, scores_b], axis=1)
    scores, pos = jax.lax.top_k(scores, k)
    return jnp.take_along_axis(ids, pos, axis=1), scores


def _query_padded(index: ivf_mod.Index, feats, valid, *, multiple_assignment: int = 5, alpha=3.0,
                  similarity_threshold=0.0, topk: int | None = None, max_pairs: int | None = None):
    """Query of a batch of images given as padded descriptor arrays, in jitted pieces (vmappable, and traceable
    inside a user's ``jit``).

    Quantization (:func:`~jasmk.codebook.quantize_jax`) and aggregation are one program, each segment's scoring and
    ranking another (one per segment shape), and the per-segment lists are merged by a third; so an add that
    creates or merges segments compiles only the programs of shapes not seen before (none within a reservation,
    :func:`reserve`, with ``topk`` given: ``topk=None`` returns every image slot, a shape that grows with the
    index).

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
        ``(ranks [B, k] int32, scores [B, k] float32)``: best first, ranks in image ids (int64 under
        ``jax_enable_x64``), equal scores in ascending id order.
    """
    b = feats.shape[0]
    rows, words, slots, q_scale = _prepare_padded(index.centroids, index.idf, feats, valid,
                                                  multiple_assignment=int(multiple_assignment),
                                                  binary=bool(index.binary))
    alpha = jnp.asarray(alpha, jnp.float32)
    thr = jnp.asarray(similarity_threshold, jnp.float32)
    pairs_cap = None if max_pairs is None else ivf_mod.capacity(max_pairs, minimum=1024)
    ids = scores = None
    for seg in index.segments:
        k = seg.image_capacity if topk is None else min(int(topk), seg.image_capacity)
        i, t = _segment_best(seg, index.idf, rows, words, slots, q_scale, alpha, thr, n_queries=b, k=k,
                             pairs_cap=pairs_cap)
        if ids is None:
            ids, scores = i, t
        else:
            total = ids.shape[1] + i.shape[1]
            ids, scores = _merge_best(ids, scores, i, t, k=total if topk is None else min(int(topk), total))
    if index.ids is None:
        return _public_ranks(ids, scores, np.int32(index.imid_offset))
    return _mapped_ranks(ids, scores, _id_table(index))


@jax.jit
def _public_ranks(ids, scores, offset):
    return jnp.where(scores > score_mod.NEG_INF, ids - offset, -1), scores


@jax.jit
def _mapped_ranks(ids, scores, table):
    return jnp.where(scores > score_mod.NEG_INF, table[jnp.maximum(ids, 0)], -1), scores


def _id_table(index: ivf_mod.Index):
    """The index's image ids as a device array, padded to a power of two (one program per doubling), for the
    jitted query: int32, or int64 under ``jax_enable_x64``; cached on the index."""
    table = index.caches.get("id_table")
    if table is None:
        ids = index.ids.names - index.imid_offset  # static: also while the index's arrays are traced
        x64 = bool(jax.config.jax_enable_x64)
        if not x64 and ids.size and (int(ids.max()) > 2**31 - 1 or int(ids.min()) < -2**31):
            raise ValueError(f"image id {int(ids.max())} does not fit int32: query_padded returns JAX arrays, "
                             "int32 unless jax_enable_x64 is set; set it, or use jasmk.query (int64 ids)")
        padded = np.full(ivf_mod.capacity(ids.size, minimum=64, steps=1), -1, np.int64 if x64 else np.int32)
        padded[:ids.size] = ids
        table = index.caches["id_table"] = jnp.asarray(padded)
    return table

__all__ = ["AUTO_MAX_WORDS", "AUTO_MIN_WORDS", "AUTO_SAMPLE", "FAISS_MIN_PER_WORD", "QUERY_BLOCK_DESCRIPTORS",
           "QueryResult", "add_images", "aggregate_images", "as_codebook", "auto_codebook_plan", "build_index",
           "check_aggregated", "check_query_params", "empty_index", "progress_bar", "query", "query_aggregated",
           "query_padded", "reserve", "score_matrix", "score_matrix_aggregated"]
