"""Time jasmk against asmk 0.1.1 in one run, on the same data and the same centroids.

    python experiments/bench_vs_asmk.py --images 2000 --per-image 1000 --dim 128 --codebook 64k

Three views are timed:
  * quantize: the exact nearest-centroid search (faiss flat L2, as asmk; and jasmk's jitted JAX search).
    Both libraries spend the same matrix product here, so it is shown on its own.
  * engine: everything after quantization, given the same word assignments: aggregation + inverted
    file (build) and aggregation + scoring + ranking (query: every image queries the whole database).
  * end to end: asmk's ``build_ivf`` / ``query_ivf`` against ``jasmk.build_index`` / ``jasmk.query``
    (``--e2e``; long at full size since both quantize 2 x N descriptors against K centroids).
The ranks of the two libraries are compared (top ``--check-topk``), and the index sizes are printed.
Each timing is the best of ``--repeat`` runs (after one warm-up for jasmk's jit compilation).
"""

import argparse
import gc
import logging
import os
import pickle
import sys
import time

import numpy as np

import jasmk
from jasmk import aggregate as agg_mod
from jasmk import ivf as ivf_mod


def make_data(rng, *, n_images, per_image, dim, n_scenes):
    """Images of shared scenes: each image sees a noisy subset of its scene's points."""
    scenes = rng.standard_normal((n_scenes, 2 * per_image, dim), dtype=np.float32)
    feats = np.empty((n_images * per_image, dim), np.float32)
    for i in range(n_images):
        pick = rng.choice(2 * per_image, per_image, replace=False)
        feats[i * per_image:(i + 1) * per_image] = scenes[i % n_scenes, pick] + 0.5 * rng.standard_normal(
            (per_image, dim), dtype=np.float32)
    return feats, np.repeat(np.arange(n_images), per_image)


def best_of(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def asmk_method_with(centroids, *, binary, ma_build, ma_query, topk):
    from asmk import asmk_method, codebook as cdb_pkg, index as idx_pkg

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
    agg = agg_mod.aggregate(centroids, feats, words, ids, binary=binary)
    index = ivf_mod.add(ivf_mod.empty(centroids, binary=binary, use_idf=False), agg)
    index.entry_vecs.block_until_ready()
    return index


def rank_agreement(ranks, scores, ref_ranks, ref_scores, tie_tol=1e-5):
    """Fraction of rank positions equal to asmk's, or tied in asmk's own scores; max score difference."""
    ref = {}
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
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--binary", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ma-build", type=int, default=1)
    ap.add_argument("--ma-query", type=int, default=5)
    ap.add_argument("--topk", type=int, default=100, help="results kept per query (both libraries)")
    ap.add_argument("--check-topk", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--e2e", action="store_true", help="also time full build_ivf/query_ivf vs build_index/query")
    ap.add_argument("--jax-quantize", action=argparse.BooleanOptionalAction, default=True,
                    help="also time jasmk's jitted JAX quantizer")
    ap.add_argument("--cache-dir", default=None,
                    help="keep the faiss word assignments here and reuse them in later runs of the same setup")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(args.seed)
    k = jasmk.parse_size(args.codebook)
    feats, ids = make_data(rng, n_images=args.images, per_image=args.per_image, dim=args.dim, n_scenes=args.scenes)
    # Both libraries use these centroids (k-means at 64k words is out of scope for a speed test).
    centroids = feats[rng.choice(len(feats), k, replace=False)] + 0.1 * rng.standard_normal((k, args.dim),
                                                                                            dtype=np.float32)
    cb = jasmk.Codebook.from_centroids(centroids)
    print(f"data: {args.images} images x {args.per_image} x {args.dim}-d = {len(feats)} descriptors; "
          f"codebook {k} words; binary={args.binary}; MA build {args.ma_build}, query {args.ma_query}; "
          f"topk {args.topk}", flush=True)
    rows = []

    # quantization (shared cost)
    def faiss_words(ma):
        tag = f"{args.images}_{args.per_image}_{args.dim}_{k}_{args.scenes}_{args.seed}_ma{ma}.npy"
        path = os.path.join(args.cache_dir, tag) if args.cache_dir else None
        if path and os.path.exists(path):
            return float("nan"), np.load(path)
        t, words = best_of(lambda: jasmk.quantize(cb, feats, multiple_assignment=ma, method="faiss"), 1)
        if path:
            os.makedirs(args.cache_dir, exist_ok=True)
            np.save(path, words)
        return t, words

    t_fq, words_db = faiss_words(args.ma_build)
    t_fq5, words_q = faiss_words(args.ma_query)
    print(f"quantize MA={args.ma_build}: faiss {t_fq:.1f}s; MA={args.ma_query}: faiss {t_fq5:.1f}s", flush=True)
    if args.jax_quantize:
        jasmk.quantize(cb, feats[:8192], multiple_assignment=args.ma_query, method="jax")  # compile
        t_jq5, words_jq = best_of(lambda: jasmk.quantize(cb, feats, multiple_assignment=args.ma_query, method="jax"),
                                  1)
        print(f"quantize MA={args.ma_query}: jax {t_jq5:.1f}s (same first word as faiss for "
              f"{100 * np.mean(words_jq[:, 0] == words_q[:, 0]):.3f}%)", flush=True)
        rows.append(("quantize MA query (faiss / jax)", t_fq5, t_jq5))

    # engine: build
    method = asmk_method_with(centroids, binary=args.binary, ma_build=args.ma_build, ma_query=args.ma_query,
                              topk=args.topk)
    t_ab, built = best_of(lambda: asmk_engine_build(method, feats, words_db, ids), args.repeat)
    print(f"asmk engine build: {t_ab:.1f}s", flush=True)
    jasmk_engine_build(centroids, feats, words_db, ids, binary=args.binary)  # warm-up (jit)
    t_jb, index = best_of(lambda: jasmk_engine_build(centroids, feats, words_db, ids, binary=args.binary),
                          args.repeat)
    print(f"jasmk engine build: {t_jb:.2f}s", flush=True)
    rows.append(("engine build (aggregate + ivf)", t_ab, t_jb))

    # engine: query every image against the database
    t_aq, (a_ranks, a_scores) = best_of(lambda: asmk_engine_query(built, feats, words_q, ids, args.topk), args.repeat)
    print(f"asmk engine query: {t_aq:.1f}s", flush=True)

    def jq():
        return jasmk.query(index, feats, ids, multiple_assignment=args.ma_query, topk=args.topk, word_ids=words_q)

    jq()  # warm-up (jit)
    t_jqe, res = best_of(jq, args.repeat)
    print(f"jasmk engine query: {t_jqe:.2f}s", flush=True)
    rows.append((f"engine query ({args.images} queries)", t_aq, t_jqe))
    c = min(args.check_topk, args.topk)
    agree, maxdiff = rank_agreement(res.ranks[:, :c], res.scores[:, :c], a_ranks[:, :c], a_scores[:, :c])

    if args.e2e:
        t_a, a_built = best_of(lambda: method.build_ivf(feats, ids.copy()), 1)
        t_j, j_index = best_of(lambda: jasmk.build_index(feats, ids, codebook=cb, binary=args.binary,
                                                         multiple_assignment=args.ma_build), 1)
        rows.append(("end-to-end build_ivf / build_index", t_a, t_j))
        t_a, _ = best_of(lambda: a_built.query_ivf(feats, ids), 1)
        t_j, _ = best_of(lambda: jasmk.query(j_index, feats, ids, multiple_assignment=args.ma_query,
                                             topk=args.topk), 1)
        rows.append(("end-to-end query_ivf / query", t_a, t_j))

    asmk_bytes = len(pickle.dumps(built.inverted_file.state_dict(), protocol=4))
    jasmk_bytes = sum(int(np.asarray(x).nbytes) for x in
                      (index.entry_vecs, index.entry_words, index.entry_images, index.word_offsets, index.counts,
                       index.idf, index.norm_factor))
    print()
    print(f"{'stage':40s} {'asmk [s]':>10s} {'jasmk [s]':>10s} {'speed-up':>9s}")
    for name, ta, tj in rows:
        print(f"{name:40s} {ta:10.2f} {tj:10.2f} {ta / tj:8.1f}x")
    print(f"{'index size (asmk pickle / jasmk arrays)':40s} {asmk_bytes / 2**20:9.1f}M {jasmk_bytes / 2**20:9.1f}M "
          f"{asmk_bytes / jasmk_bytes:8.2f}x")
    print(f"rank agreement with asmk over top-{c}: {100 * agree:.3f}% (ties counted as agreeing); "
          f"max score difference {maxdiff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
