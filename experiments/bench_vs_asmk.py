"""Time jasmk against asmk 0.1.1 in one run, on the same data and the same centroids.

    python experiments/bench_vs_asmk.py --images 2000 --per-image 1000 --dim 128 --codebook 64k --scenes 400

Three views are timed:
  * quantize: the exact nearest-centroid search. asmk calls faiss ``IndexFlatL2.search``; jasmk's default
    quantizer makes the same faiss call, so this cost is shared and printed on its own (``--jax-quantize`` also
    times jasmk's jitted JAX search).
  * engine: everything after quantization, given the same word assignments: aggregation + inverted file
    (build) and aggregation + scoring + ranking of every image against the whole database (query).
    asmk runs its own kernel and IVF code (``ASMKKernel.aggregate`` + ``IVF.add``; per image
    ``aggregate_image`` + ``IVF.search``, as ``query_ivf`` does), jasmk ``aggregate`` + ``ivf.add`` and
    ``jasmk.query(word_ids=...)``.
  * end to end (``--e2e``): asmk's ``build_ivf`` / ``query_ivf`` against ``jasmk.build_index`` / ``jasmk.query``,
    quantization included (long at full size: both quantize 2 x N descriptors against K centroids).
The ranks of the two libraries are compared over the top ``--check-topk`` (positions that differ must be ties in
asmk's own scores), and the index sizes are printed. asmk's engine steps run ``--repeat`` times, jasmk's
``--repeat-jasmk`` times after one warm-up run for jit compilation; the best run counts (the median is shown too).
"""

import argparse
import gc
import logging
import os
import pickle
import sys
import time

import jax
import numpy as np

import jasmk
from jasmk.core import aggregate as agg_mod
from jasmk.core import ivf as ivf_mod
from jasmk.storage import index_format

log = logging.getLogger("bench")


def make_data(rng, *, n_images, per_image, dim, n_scenes):
    """Images of shared scenes: each image sees a noisy subset of its scene's points."""
    scenes = rng.standard_normal((n_scenes, 2 * per_image, dim), dtype=np.float32)
    feats = np.empty((n_images * per_image, dim), np.float32)
    for i in range(n_images):
        pick = rng.choice(2 * per_image, per_image, replace=False)
        feats[i * per_image:(i + 1) * per_image] = scenes[i % n_scenes, pick] + 0.5 * rng.standard_normal(
            (per_image, dim), dtype=np.float32)
    return feats, np.repeat(np.arange(n_images), per_image)


def timed(fn, repeat, warmup=False):
    """``(best seconds, median seconds, last result)`` over ``repeat`` runs (plus an untimed warm-up run)."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(max(1, repeat)):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times)), out


def asmk_method_with(centroids, *, binary, ma_build, ma_query, topk):
    from asmk import asmk_method
    from asmk import codebook as cdb_pkg
    from asmk import index as idx_pkg

    params = {
        "index": {"gpu_id": None},
        "train_codebook": {"codebook": {"size": int(centroids.shape[0])}},
        "build_ivf": {"kernel": {"binary": binary}, "ivf": {"use_idf": False},
                      "quantize": {"multiple_assignment": ma_build}, "aggregate": {}},
        "query_ivf": {"quantize": {"multiple_assignment": ma_query}, "aggregate": {}, "search": {"topk": topk},
                      "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}},
    }
    cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=int(centroids.shape[0]))
    cdb.index(np.ascontiguousarray(centroids))
    return asmk_method.ASMKMethod(params, {}, codebook=cdb)


def asmk_engine_build(method, feats, words, ids):
    """asmk's IvfBuilder.add minus quantization: its kernel aggregates, its IVF adds."""
    builder = method.create_ivf_builder()
    agg = builder.kernel.aggregate(feats, words, ids.copy())
    builder.ivf.add(*agg)
    return method.add_ivf_builder(builder)


def asmk_engine_query(built, feats, words, ids, topk):
    """asmk's per-image query loop minus quantization, calling its kernel and IVF."""
    sim_params = built.params["query_ivf"]["similarity"]
    kern, ivf = built.kernel, built.inverted_file
    ranks, scores = [], []
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for s, e in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(ids)]])):
        ades, awords = kern.aggregate_image(feats[s:e], words[s:e])
        r, sc = ivf.search(ades, awords, topk=topk, similarity_func=lambda *x: kern.similarity(*x, **sim_params))
        ranks.append(r)
        scores.append(sc)
    return np.vstack(ranks), np.vstack(scores)


def jasmk_engine_build(centroids, feats, words, ids, *, binary):
    agg = agg_mod.aggregate(centroids, feats, words, ids, binary=binary, sort=False)
    return ivf_mod.add(ivf_mod.empty(centroids, binary=binary, use_idf=False), agg)


def rank_agreement(ranks, scores, ref_ranks, ref_scores, tie_tol=1e-5):
    """Fraction of rank positions equal to asmk's, or tied in asmk's own scores; max score difference."""
    same = 0
    for q in range(ranks.shape[0]):
        ref = dict(zip(ref_ranks[q].tolist(), ref_scores[q].tolist()))
        for p in range(ranks.shape[1]):
            a, b = ranks[q, p], ref_ranks[q, p]
            if a == b or (a in ref and abs(ref[a] - ref_scores[q, p]) <= tie_tol):
                same += 1
    return same / ranks.size, float(np.abs(scores - ref_scores).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-image", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--codebook", default="64k")
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--binary", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ma-build", type=int, default=1)
    ap.add_argument("--ma-query", type=int, default=5)
    ap.add_argument("--topk", type=int, default=100, help="results kept per query (both libraries)")
    ap.add_argument("--check-topk", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of asmk's engine steps")
    ap.add_argument("--repeat-jasmk", type=int, default=5, help="timed runs of jasmk's engine steps")
    ap.add_argument("--e2e", action="store_true", help="also time full build_ivf/query_ivf vs build_index/query")
    ap.add_argument("--jax-quantize", action="store_true", help="also time jasmk's jitted JAX quantizer")
    ap.add_argument("--cache-dir", default=None,
                    help="keep the faiss word assignments here and reuse them in later runs of the same setup")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from jasmk import configure_logging

    configure_logging(prefix="bench_vs_asmk")  # libraries' load-time INFO off; jasmk's own warnings on stderr

    rng = np.random.default_rng(args.seed)
    k = jasmk.parse_size(args.codebook)
    feats, ids = make_data(rng, n_images=args.images, per_image=args.per_image, dim=args.dim, n_scenes=args.scenes)
    # Both libraries use these centroids (k-means at 64k words is out of scope for a speed test).
    centroids = feats[rng.choice(len(feats), k, replace=False)] + 0.1 * rng.standard_normal((k, args.dim),
                                                                                            dtype=np.float32)
    cb = jasmk.Codebook.from_centroids(centroids)
    log.info("data: %d images x %d x %d-d = %d descriptors; codebook %d words; binary=%s; MA build %d, query %d; "
             "topk %d", args.images, args.per_image, args.dim, len(feats), k, args.binary, args.ma_build,
             args.ma_query, args.topk)
    rows = []

    # quantization (shared cost: the same faiss call in both libraries)
    def faiss_words(ma):
        tag = f"{args.images}_{args.per_image}_{args.dim}_{k}_{args.scenes}_{args.seed}_ma{ma}.npy"
        path = os.path.join(args.cache_dir, tag) if args.cache_dir else None
        if path and os.path.exists(path):
            return float("nan"), np.load(path)
        t, _, words = timed(lambda: jasmk.quantize(cb, feats, multiple_assignment=ma, method="faiss"), 1)
        if path:
            os.makedirs(args.cache_dir, exist_ok=True)
            np.save(path, words)
        return t, words

    t_fq, words_db = faiss_words(args.ma_build)
    t_fq5, words_q = faiss_words(args.ma_query)
    log.info("quantize (faiss IndexFlatL2, both libraries): MA=%d %.1fs, MA=%d %.1fs (nan: from --cache-dir)",
             args.ma_build, t_fq, args.ma_query, t_fq5)
    rows.append((f"quantize MA {args.ma_build} / MA {args.ma_query} (faiss, shared)", f"{t_fq:.1f} / {t_fq5:.1f}",
                 f"{t_fq:.1f} / {t_fq5:.1f}", "1x"))
    if args.jax_quantize:
        jasmk.quantize(cb, feats[:8192], multiple_assignment=args.ma_query, method="jax")  # compile
        t_jq5, _, words_jq = timed(lambda: jasmk.quantize(cb, feats, multiple_assignment=args.ma_query,
                                                          method="jax"), 1)
        log.info("quantize MA=%d: jax %.1fs (same first word as faiss for %.3f%%)", args.ma_query, t_jq5,
                 100 * np.mean(words_jq[:, 0] == words_q[:, 0]))
        rows.append((f"quantize MA {args.ma_query}: faiss / jasmk JAX search", f"{t_fq5:.1f}", f"{t_jq5:.1f}",
                     f"{t_fq5 / t_jq5:.2f}x"))

    # engine: build
    method = asmk_method_with(centroids, binary=args.binary, ma_build=args.ma_build, ma_query=args.ma_query,
                              topk=args.topk)
    t_ab, _, built = timed(lambda: asmk_engine_build(method, feats, words_db, ids), args.repeat)
    log.info("asmk engine build: %.2fs", t_ab)
    t_jb, m_jb, index = timed(lambda: jasmk_engine_build(centroids, feats, words_db, ids, binary=args.binary),
                              args.repeat_jasmk, warmup=True)
    log.info("jasmk engine build: best %.3fs, median %.3fs", t_jb, m_jb)
    rows.append(("engine build: aggregate + inverted file", f"{t_ab:.2f}", f"{t_jb:.3f} ({m_jb:.3f})",
                 f"{t_ab / t_jb:.1f}x ({t_ab / m_jb:.1f}x)"))

    # engine: query every image against the database
    t_aq, _, (a_ranks, a_scores) = timed(lambda: asmk_engine_query(built, feats, words_q, ids, args.topk),
                                         args.repeat)
    log.info("asmk engine query: %.1fs", t_aq)

    def jq():
        return jasmk.query(index, feats, ids, multiple_assignment=args.ma_query, topk=args.topk, word_ids=words_q)

    t_jq, m_jq, res = timed(jq, args.repeat_jasmk, warmup=True)
    log.info("jasmk engine query: best %.2fs, median %.2fs", t_jq, m_jq)
    rows.append((f"engine query: {args.images} queries, aggregate + score + rank", f"{t_aq:.1f}",
                 f"{t_jq:.2f} ({m_jq:.2f})", f"{t_aq / t_jq:.1f}x ({t_aq / m_jq:.1f}x)"))
    c = min(args.check_topk, args.topk)
    agree, maxdiff = rank_agreement(res.ranks[:, :c], res.scores[:, :c], a_ranks[:, :c], a_scores[:, :c])

    if args.e2e:
        t_a, _, a_built = timed(lambda: method.build_ivf(feats, ids.copy()), 1)
        t_j, _, j_index = timed(lambda: jasmk.build_index(feats, ids, codebook=cb, binary=args.binary,
                                                          multiple_assignment=args.ma_build), 1)
        rows.append(("end to end: build_ivf / build_index", f"{t_a:.1f}", f"{t_j:.1f}", f"{t_a / t_j:.2f}x"))
        t_a, _, _ = timed(lambda: a_built.query_ivf(feats, ids), 1)
        t_j, _, _ = timed(lambda: jasmk.query(j_index, feats, ids, multiple_assignment=args.ma_query,
                                              topk=args.topk), 1)
        rows.append(("end to end: query_ivf / query", f"{t_a:.1f}", f"{t_j:.1f}", f"{t_a / t_j:.2f}x"))

    asmk_bytes = len(pickle.dumps(built.inverted_file.state_dict(), protocol=4))
    # postings and per-word arrays; the centroids are not in asmk's IVF either
    arrays = index_format.to_arrays(index)[0]
    jasmk_bytes = sum(int(np.asarray(x).nbytes) for k, v in arrays.items() if k != "centroids"
                      for x in jax.tree_util.tree_leaves(v))
    log.info("")
    log.info("%-58s %12s %18s %16s", "stage [seconds]", "asmk 0.1.1", "jasmk best (med)", "speed-up")
    for name, ta, tj, ratio in rows:
        log.info("%-58s %12s %18s %16s", name, ta, tj, ratio)
    log.info("%-58s %11.1fM %17.1fM %15.2fx", "index size: asmk IVF pickle / jasmk arrays", asmk_bytes / 2**20,
             jasmk_bytes / 2**20, asmk_bytes / jasmk_bytes)
    log.info("rank agreement with asmk over top-%d: %.3f%% (ties counted as agreeing); max score difference %.2e",
             c, 100 * agree, maxdiff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
