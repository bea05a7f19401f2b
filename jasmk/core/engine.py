"""The query engine: batches of query images scored segment by segment, with the cheaper kernel for each.

For each batch of ``B`` query images (flat aggregated rows) and each :class:`~jasmk.ivf.Segment`, the host
counts the (row, posting) pairs the batch touches, ``sum_r count_seg[word(r)]`` (a gather of the segment's word
offsets), and picks a kernel from a cost model with per-backend constants:

* ``dense``  (:func:`jasmk.score.dense_segment`): ``c_dense x capacity x B x W / 4`` seconds,
* ``sparse-xla`` (:func:`jasmk.core.score.sparse_segment`): ``c_sparse_xla x pairs`` plus a fixed cost,
* ``sparse-cpu`` (:mod:`jasmk.core.cpu_kernel`, CPU backend, ASMK* only, when numba is there): ``c_sparse_cpu x
  pairs``; it reads each posting once per batch however many query rows share its word.

On the CPU backend with numba, ``auto`` always takes ``sparse-cpu`` for ASMK* (the cheapest there, see
docs/benchmarks.md; one kernel for every batch keeps each score independent of its batch). ``kernel=`` forces one
(``"sparse"``: the best sparse kernel for the backend). All kernels sum the same float32 terms in order-free
fixed point, so they give the same bits for ASMK* (on any backend). Rows are sorted by word (stable) before
scoring, which groups the CPU kernel's shared reads.
Each segment's scores are ranked on their own (``lax.top_k``) and the per-segment lists are merged with a stable
sort (segments are in image order, so equal scores keep ascending ids); the score
matrix is assembled by columns.

Memory per batch and segment: the score accumulator ``I x B x 4`` int32 limbs (within
:data:`jasmk.score.ACC_BYTES`), plus for the dense kernel its word table and for the sparse XLA kernel
``pairs x (W + 4)`` words of gathered postings; the pair count is rounded up on the capacity ladder so that
compilations repeat.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings

import jax
import numpy as np

from . import cpu_kernel, memory
from . import ivf as ivf_mod
from . import score as score_mod
from .aggregate import PAD_IMAGE, Aggregated

log = logging.getLogger(__name__)

KERNELS = ("auto", "dense", "sparse", "sparse-xla", "sparse-cpu")
ENGINES = KERNELS  # the 0.1 name

# Seconds per unit of work, from experiments/bench_scale.py on a 2-core CPU (docs/benchmarks.md); the GPU figures
# are estimates that no GPU measurement has checked yet. The dense scan costs
# (dense-posting + dense-pair * B) per posting, sparse kernels cost per (row, posting) pair, each per 2 packed
# words of code (64 bits) or 2 floats; "fixed": per call.
COSTS = {
    "cpu": {"dense-posting": 25e-9, "dense-pair": 12e-9, "dense-fixed": 1e-4,
            "sparse-xla": 150e-9, "sparse-xla-fixed": 1e-3},
    "gpu": {"dense-posting": 0.05e-9, "dense-pair": 0.02e-9, "dense-fixed": 1e-4,
            "sparse-xla": 0.3e-9, "sparse-xla-fixed": 1e-4},
}
PAIR_STEPS = 1  # sizes per octave of the sparse kernel's pair capacity (powers of two: few compilations)
ROW_STEPS = 4  # sizes per octave of a batch's query rows
TABLE_BYTES = 64 * 2**20  # the dense kernel's per-batch word table stays within this
MAX_BATCH = 64
PAIRS_BYTES = 512 * 2**20  # the sparse XLA kernel's gathered postings stay within this, else the dense scan


def backend() -> str:
    """``"cpu"`` or ``"gpu"`` (any accelerator) for the default JAX device."""
    return "cpu" if jax.default_backend() == "cpu" else "gpu"


def kernel_arg(kernel: str = "auto", engine: str | None = None) -> str:
    """The ``kernel=`` argument of a query function, taking jasmk 0.1's name for it, ``engine=``, with a warning
    (until 0.3); checked against :data:`KERNELS`."""
    if engine is not None:
        warnings.warn("engine= is now called kernel= (it picks a scoring kernel); engine= works until jasmk 0.3",
                      DeprecationWarning, stacklevel=3)
        kernel = engine
    return check_kernel(kernel)


def check_kernel(kernel: str) -> str:
    """``kernel`` if it names a kernel choice (:data:`KERNELS`)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "sparse-cpu" and not cpu_kernel.available():
        raise ValueError("kernel 'sparse-cpu' needs numba (pip install numba)")
    return kernel


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of query images as flat rows, sorted by word (stable).

    Attributes:
        ids: ``[b] int`` query image ids of the batch (``b <= B``).
        vecs: ``[R, W]`` rows (``R`` on the capacity ladder; padding rows after the real ones).
        words: ``[R] int32`` word of each row (padding: 0).
        slots: ``[R] int32`` query slot of each row (padding: ``B``).
        n_rows: real rows.
        max_rows: most rows of one query image.
        n_queries: ``B``.
        q_scale: ``[B] float32`` query normalization.
    """

    ids: np.ndarray
    vecs: np.ndarray
    words: np.ndarray
    slots: np.ndarray
    n_rows: int
    max_rows: int
    n_queries: int
    q_scale: np.ndarray


def query_scale_host(idf: np.ndarray, words: np.ndarray, slots: np.ndarray, n_queries: int) -> np.ndarray:
    """Host twin of :func:`jasmk.core.score.query_scale` (rows summed in order, float32)."""
    qn = np.zeros(n_queries, np.float32)
    np.add.at(qn, slots, idf[words])
    return ivf_mod.inverse_sqrt(qn)


def batch_size(n_queries: int, max_rows: int, *, n_words: int, width: int, image_capacity: int) -> int:
    """Query images scored together: the largest power of two <= 64 whose dense word table
    (``min(K, B * max_rows) x B x W`` words) fits in 64 MiB and whose score accumulator (at least
    ``I x B x LIMBS`` int32 for the largest segment's ``image_capacity``) fits in 256 MiB, and no more than the
    queries there are."""
    b = 1
    while b < MAX_BATCH:
        nb = 2 * b
        if (min(n_words, nb * max_rows) + 1) * nb * width * 4 > TABLE_BYTES:
            break
        if score_mod.LIMBS * image_capacity * nb * 4 > score_mod.ACC_BYTES:
            break
        b = nb
    return min(b, 1 << max(0, (int(n_queries) - 1).bit_length()))  # powers of two: few compiled shapes


def layout(index: ivf_mod.Index) -> dict:
    """What batching needs to know of an index, as the keyword arguments of :func:`batches`."""
    res = index.reservation
    image_capacity = max([s.image_capacity for s in index.segments] or [1])
    if res is not None:  # the largest reserved segment: the batch size stays what it will be at the end of the run
        image_capacity = max(image_capacity, res.shape(res.levels - 1)[1])
    return {"n_words": index.n_words, "width": index.width, "idf": index.idf, "image_capacity": image_capacity,
            "query_rows": None if res is None else res.query_rows}


def rows_capacity(rows: int, n_queries: int, query_rows: int | None) -> int:
    """Padded row count of a batch of ``n_queries`` images holding ``rows`` rows (the ladder's, at least
    ``n_queries x query_rows`` when a reservation gives ``query_rows``)."""
    cap = ivf_mod.capacity(rows, minimum=64, steps=ROW_STEPS)
    if query_rows is not None:
        cap = max(cap, ivf_mod.capacity(n_queries * query_rows, minimum=64, steps=ROW_STEPS))
    return cap


def batches(agg: Aggregated, *, n_words: int, width: int, idf, image_capacity: int, query_rows: int | None = None):
    """Yield :class:`Batch` es of the query images in ``agg`` (rows grouped by image, ascending) for an index of
    ``n_words`` words, ``width``-wide rows, ``idf [K]`` and segments of at most ``image_capacity`` image slots
    (:func:`layout` gives these for an :class:`~jasmk.core.ivf.Index`; the sharded index passes its own);
    ``query_rows``: a reservation's rows per query image (:func:`rows_capacity`)."""
    bounds = np.flatnonzero(np.diff(agg.images)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    stops = np.concatenate([bounds, [agg.images.shape[0]]]).astype(np.int64)
    n_q = starts.size
    b = batch_size(n_q, int((stops - starts).max()), n_words=n_words, width=width, image_capacity=image_capacity)
    slot_of_row = np.repeat(np.arange(n_q), stops - starts)
    idf = np.asarray(idf, np.float32)
    row_width = agg.vecs.shape[1]
    sort_dtype = np.uint16 if n_words <= 1 << 16 else np.int32
    for i in range(0, n_q, b):
        j = min(i + b, n_q)
        s, e = starts[i], stops[j - 1]
        r = int(e - s)
        order = np.argsort(agg.words[s:e].astype(sort_dtype), kind="stable") + s
        cap = rows_capacity(r, b, query_rows)
        vecs = np.zeros((cap, row_width), agg.vecs.dtype)
        vecs[:r] = agg.vecs[order]
        words = np.zeros(cap, np.int32)
        words[:r] = agg.words[order]
        slots = np.full(cap, b, np.int32)
        slots[:r] = slot_of_row[order] - i
        yield Batch(agg.images[starts[i:j]], vecs, words, slots, r, int((stops[i:j] - starts[i:j]).max()), b,
                    query_scale_host(idf, words[:r], slots[:r], b))


def pairs_capacity(pairs: int) -> int:
    """The sparse XLA kernel's static pair count for ``pairs`` touched pairs (a coarse ladder)."""
    return ivf_mod.capacity(pairs, minimum=1024, steps=PAIR_STEPS)


def reserved_pairs_capacity(capacity: int, n_queries: int, width: int) -> int:
    """The sparse XLA kernel's pair count on a reserved segment shape (``capacity`` postings): fixed per shape,
    so no query compiles it again; a batch touching more pairs is scanned densely (:func:`jasmk.core.score.
    sparse_or_dense`, same scores)."""
    most = max(1024, PAIRS_BYTES // (3 * (width + 4) * 4))
    return pairs_capacity(min(max(1024, capacity * n_queries // 4), most))


def _cpu_kernel_serves(binary: bool) -> bool:
    """Whether the compiled CPU kernel can score here: the CPU backend, ASMK*, numba available."""
    return backend() == "cpu" and binary and cpu_kernel.available()


def choose_kernel(*, kernel: str, capacity: int, n_queries: int, max_rows: int, pairs: int, binary: bool,
                  width: int) -> str:
    """The kernel for one segment (``capacity`` postings) and one batch (``n_queries`` images, at most
    ``max_rows`` rows each, ``pairs`` touched posting-row pairs): the cost model's cheapest unless ``kernel`` forces
    one (``"auto"``, ``"sparse"``, or a kernel name)."""
    be = backend()
    cpu_ok = _cpu_kernel_serves(binary)
    if kernel in ("sparse", "auto") and cpu_ok:
        # on the CPU the compiled kernel beat both XLA kernels at every size measured
        return "sparse-cpu"
    if max_rows > score_mod.MAX_TERMS:
        if cpu_ok and kernel in ("auto", "sparse", "sparse-cpu"):
            return "sparse-cpu"
        raise ValueError(f"a query image has {max_rows} aggregated rows; the XLA kernels' fixed-point sums "
                         f"hold at most {score_mod.MAX_TERMS} per image (split the image's descriptors, or use "
                         "the CPU kernel for ASMK*)")
    if kernel == "sparse":
        return "sparse-xla"
    if kernel != "auto":
        return kernel
    c = COSTS[be]
    scale = max(1.0, width / 2)
    cost = {"dense": (c["dense-posting"] + c["dense-pair"] * n_queries) * capacity * scale
            + c["dense-fixed"]}
    xla_bytes = pairs_capacity(pairs) * (width + 4) * 4
    if xla_bytes <= PAIRS_BYTES:
        cost["sparse-xla"] = c["sparse-xla"] * pairs * scale + c["sparse-xla-fixed"]
    return min(cost, key=cost.get)


def _device_idf(index: ivf_mod.Index):
    """The index's idf on the device, cached on the index object."""
    if isinstance(index.idf, jax.Array):
        return index.idf
    cached = index.caches.get("device idf")
    if cached is None:
        cached = index.caches["device idf"] = jax.device_put(index.idf)
    return cached


@functools.lru_cache(maxsize=16)
def _kernel_table(alpha: float, threshold: float, bits: int) -> np.ndarray:
    return np.asarray(score_mod.kernel_table(np.float32(alpha), np.float32(threshold), bits=bits))


def segment_top_k_host(scores: np.ndarray, k: int):
    """Host twin of :func:`jasmk.core.score.segment_top_k` for ``[B, I]`` scores: ``(positions [B, k], scores)``,
    best first, equal scores in ascending position order."""
    b, n = scores.shape
    k = min(k, n)
    pos = np.empty((b, k), np.int64)
    top = np.empty((b, k), np.float32)
    for q in range(b):
        s = scores[q]
        if k < n:
            kth = np.partition(s, n - k)[n - k]  # the k-th largest value
            cand = np.flatnonzero(s >= kth)  # ascending positions, ties at the boundary included
        else:
            cand = np.arange(n)
        order = cand[np.argsort(-s[cand], kind="stable")[:k]]
        pos[q], top[q] = order, s[order]
    return pos, top


_SHAPES_SEEN: set = set()  # XLA kernel shapes this process has run (a few per capacity doubling)


def _note_shape(kind: str, seg: ivf_mod.Segment, batch: Batch) -> None:
    """Log at INFO the first time an XLA kernel runs on a new shape (it compiles then, ~0.1-1 s; a reservation,
    :func:`jasmk.reserve`, compiles them all before a run)."""
    key = (kind, seg.capacity, seg.image_capacity, batch.vecs.shape, batch.vecs.dtype.str, batch.n_queries)
    if key not in _SHAPES_SEEN:
        _SHAPES_SEEN.add(key)
        log.info("%s kernel on a new shape (%d postings, %d image slots, %d queries x %d rows): compiled once",
                 kind, seg.capacity, seg.image_capacity, batch.n_queries, batch.vecs.shape[0])


def score_segments(index: ivf_mod.Index, batch: Batch, alpha: float, threshold: float, *, kernel: str = "auto"):
    """Yield ``(segment, kernel, [B, I] scores)`` for each segment of ``index``, each from the kernel
    :func:`choose_kernel` picks (``"sparse-cpu"`` gives a host numpy array, the XLA kernels a JAX array)."""
    r = batch.n_rows
    words = batch.words[:r]
    alpha32, thr32 = np.float32(alpha), np.float32(threshold)
    ktable = None
    cpu_rows = None

    def xla_args(seg):
        return (ivf_mod.on_device(seg), _device_idf(index), batch.vecs, batch.words, batch.slots, batch.q_scale,
                alpha32, thr32)

    cpu_only = not xla_kernels(index, kernel)  # the CPU kernel scores every segment: no pair count needed
    for seg in index.segments:
        h = ivf_mod.host(seg)
        pairs = -1 if cpu_only else int((h.offsets[words + 1] - h.offsets[words]).sum(dtype=np.int64))
        kind = "sparse-cpu" if cpu_only else choose_kernel(
            kernel=kernel, capacity=seg.capacity, n_queries=batch.n_queries, max_rows=batch.max_rows, pairs=pairs,
            binary=index.binary, width=index.width)
        if kind == "sparse-cpu":
            if cpu_rows is None:
                ktable = _kernel_table(float(alpha32), float(thr32), 32 * index.width)
                idf = np.asarray(index.idf, np.float32)
                cpu_rows = (batch.vecs[:r], words, batch.slots[:r], idf[words])
            out = cpu_kernel.score_segment(h, *cpu_rows, ktable, batch.q_scale, n_queries=batch.n_queries)
        elif kind == "sparse-xla" and index.reservation is not None:
            cap = reserved_pairs_capacity(seg.capacity, batch.n_queries, index.width)
            memory.require(3 * cap * (index.width + 4) * 4, f"the sparse kernel's {cap} pairs",
                           hint="use kernel='dense' or 'auto', or fewer query images per call",
                           device=backend() != "cpu")
            out = score_mod.sparse_or_dense(*xla_args(seg), n_queries=batch.n_queries, pairs_cap=cap)
        elif kind == "sparse-xla":
            memory.require(3 * pairs_capacity(pairs) * (index.width + 4) * 4, f"the sparse kernel's {pairs} pairs",
                           hint="use kernel='dense' or 'auto', or fewer query images per call",
                           device=backend() != "cpu")
            out = score_mod.sparse_segment(*xla_args(seg), n_queries=batch.n_queries,
                                           pairs_cap=pairs_capacity(pairs))
        else:
            out = score_mod.dense_segment(*xla_args(seg), n_queries=batch.n_queries)
        log.debug("segment of %d postings, %d pairs: %s", seg.capacity, pairs, kind)
        if kind != "sparse-cpu":
            _note_shape(kind, seg, batch)
        yield seg, kind, out


def ranked(index: ivf_mod.Index, batch: Batch, alpha: float, threshold: float, *, topk: int | None,
           kernel: str = "auto"):
    """``(ranks [b, k] int64, scores [b, k] float32)`` of a batch: best first, ranks in image ids (names minus
    ``imid_offset``), equal scores in ascending id order, ``k = min(topk, n_images)``."""
    ids, scores = [], []
    for seg, kind, out in score_segments(index, batch, alpha, threshold, kernel=kernel):
        k = seg.image_capacity if topk is None else min(int(topk), seg.image_capacity)
        if kind == "sparse-cpu":  # scores on the host: rank on the host too
            pos, s = segment_top_k_host(out, k)
            i = pos + ivf_mod.host(seg).image_start
        else:
            i, s = score_mod.segment_top_k(out, ivf_mod.on_device(seg), k=k)
        ids.append(i)
        scores.append(s)
    b = len(batch.ids)
    ids = np.concatenate([np.asarray(x)[:b] for x in ids], axis=1).astype(np.int64)
    scores = np.concatenate([np.asarray(x)[:b] for x in scores], axis=1)
    n = int(index.n_images)
    k = n if topk is None else min(int(topk), n)
    if len(index.segments) > 1:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    return ivf_mod.public_ids(index, ids[:, :k]), scores[:, :k]


def _dummy_segment(postings: int, images: int, width: int, dtype, n_words: int) -> ivf_mod.Segment:
    """An empty segment of the given shape (what a compiled kernel keys on: shapes and dtypes)."""
    seg = ivf_mod.Segment(vecs=np.zeros((postings, width), dtype), words=np.zeros(postings, np.int32),
                          images=np.full(postings, PAD_IMAGE, np.int32), offsets=np.zeros(n_words + 1, np.int32),
                          norm_factor=np.zeros(images, np.float32), scale=np.zeros(images, np.float32),
                          image_start=np.asarray(0, np.int32), n_images=np.asarray(0, np.int32))
    return ivf_mod.on_device(seg)


def xla_kernels(index: ivf_mod.Index, kernel: str = "auto") -> tuple:
    """The XLA kernels a query of ``index`` with ``kernel`` may run on this backend (none where the CPU kernel
    scores everything)."""
    if kernel in ("auto", "sparse", "sparse-cpu") and _cpu_kernel_serves(index.binary):
        return ()
    return {"dense": ("dense",), "sparse-xla": ("sparse-xla",), "sparse": ("sparse-xla",)}.get(
        kernel, ("dense", "sparse-xla"))


def warm_up(index: ivf_mod.Index, *, n_queries=(1,), topk: int | None = None, kernel: str = "auto",
            padded_rows: tuple[int, int] | None = None) -> int:
    """Compile, for every segment shape of ``index``'s reservation, the XLA kernels that queries of ``n_queries``
    images (batch sizes) with ``topk`` and ``kernel`` will run, so that a run within the reservation compiles
    nothing; ``padded_rows``: also for :func:`jasmk.query_padded`'s ``(B, rows)`` batches (dense scan). Returns
    the number of kernel programs run (each compiled once, here or earlier)."""
    res = index.reservation
    if res is None:
        raise ValueError("the index has no reservation: jasmk.reserve(index, images=..., postings=...) first")
    kinds = xla_kernels(index, kernel)
    dtype = np.uint32 if index.binary else np.float32
    idf = _device_idf(index)
    alpha32, thr32 = np.float32(3.0), np.float32(0.0)
    n_layout = layout(index)
    runs = 0
    plans = []
    for nq in sorted({int(x) for x in n_queries}):
        b = batch_size(nq, 1, n_words=index.n_words, width=index.width, image_capacity=n_layout["image_capacity"])
        plans.append((b, rows_capacity(1, b, res.query_rows), kinds))
    if padded_rows is not None:
        plans.append((padded_rows[0], padded_rows[1], ("dense",)))
    for b, rows, plan_kinds in plans:
        q = (np.zeros((rows, index.width), dtype), np.zeros(rows, np.int32), np.full(rows, b, np.int32),
             np.zeros(b, np.float32))
        for postings, images in res.shapes():
            seg = _dummy_segment(postings, images, index.width, dtype, index.n_words)
            args = (seg, idf) + q[:3] + (q[3], alpha32, thr32)
            outs = []
            if "dense" in plan_kinds:
                outs.append(score_mod.dense_segment(*args, n_queries=b))
            if "sparse-xla" in plan_kinds:
                outs.append(score_mod.sparse_or_dense(*args, n_queries=b, pairs_cap=reserved_pairs_capacity(
                    postings, b, index.width)))
            for out in outs:
                k = images if topk is None else min(int(topk), images)
                jax.block_until_ready(score_mod.segment_top_k(out, seg, k=k))
                runs += 2
    log.info("warm-up: %d kernel programs for %d segment shapes", runs, res.levels)
    return runs


def dense_scores(index: ivf_mod.Index, batch: Batch, alpha: float, threshold: float, *, kernel: str = "auto"):
    """``[b, n_images] float32`` scores of a batch (column ``j``: the image in internal slot ``j``, whose id is
    ``index.image_ids[j]``)."""
    b = len(batch.ids)
    out = np.zeros((b, int(index.n_images)), np.float32)
    for seg, _, s in score_segments(index, batch, alpha, threshold, kernel=kernel):
        h = ivf_mod.host(seg)
        out[:, h.image_start:h.image_start + h.n_images] = np.asarray(s)[:b, :h.n_images]
    return out

# the 0.1 names of the host twins (host twins are named after their JAX function, plus _host)
query_scale = query_scale_host
top_k_host = segment_top_k_host

__all__ = ["Batch", "COSTS", "KERNELS", "MAX_BATCH", "PAIRS_BYTES", "PAIR_STEPS", "ROW_STEPS", "TABLE_BYTES",
           "backend", "batch_size", "batches", "check_kernel", "choose_kernel", "dense_scores", "kernel_arg", "layout",
           "pairs_capacity", "query_scale_host", "ranked", "reserved_pairs_capacity", "rows_capacity", "score_segments",
           "segment_top_k_host", "warm_up", "xla_kernels"]
