"""MASt3R-SLAM's retrieval loop: jasmk against asmk 0.1.1, in the same run, on MASt3R-sized keyframes.

Each step is what MASt3R-SLAM's backend does for a new keyframe: assign its local features to words (five per
feature; SLAM's float32 expanded distances), query the database with them, then add the keyframe with its first
word per feature. The database is filled first with ``N`` keyframes (200, 2,000, 20,000); the timed steps then
query and add ``--steps`` more. Word assignment is timed apart from the inverted-file part (query + add), which is
what the two libraries do differently: jasmk's host aggregation, ``score_matrix_aggregated`` and ``ivf.add``
against asmk's ``aggregate_image``, ``IVF.search``, ``aggregate`` and ``IVF.add`` (as MASt3R-SLAM calls them).
Word assignment: jasmk's JAX quantizer against torch's expansion (MASt3R-SLAM's own code path), both float32.

The fixed cost of a one-image ``jasmk.query`` is timed on a tiny index (10 images of 10 descriptors), given words.

Usage: python experiments/bench_slam.py [--sizes 200 2000 20000] [--words 512 4096 65536] [--steps 50] [--threads 1]
Prints one table row per (words, keyframes) with medians in ms and the ratio asmk / jasmk.
"""

import argparse
import os
import statistics
import sys
import time


def _threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1 and "multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 20000], help="keyframes in the database")
    ap.add_argument("--words", type=int, nargs="+", default=[512, 4096, 65536], help="codebook sizes")
    ap.add_argument("--dim", type=int, default=1024, help="local feature dimension (MASt3R: 1024)")
    ap.add_argument("--feats", type=int, default=128, help="local features per keyframe")
    ap.add_argument("--steps", type=int, default=50, help="timed query+add steps per size")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of every library (default 1)")
    ap.add_argument("--no-asmk", action="store_true", help="time jasmk only")
    args = ap.parse_args(argv)
    _threads(args.threads)

    import numpy as np
    import torch

    import jasmk
    from jasmk import api
    from jasmk.core import aggregate as agg_mod
    from jasmk.core import ivf

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"# bench_slam: dim {args.dim}, {args.feats} features per keyframe, MA 5 / 1, {args.steps} steps, "
          f"{args.threads} thread(s); jasmk {jasmk.__version__}; ms per keyframe (median)")
    print("| words | keyframes | words: jasmk | words: torch (SLAM) | IVF query+add: jasmk (aggregate query / score "
          "/ aggregate add / add) | IVF: asmk | asmk / jasmk |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k in args.words:
        centroids = rng.standard_normal((k, args.dim)).astype(np.float32)
        cb = jasmk.Codebook.from_centroids(centroids)
        c_torch = torch.from_numpy(centroids)
        for n in args.sizes:
            # the database: n keyframes of feats distinct words with random codes, built at once
            words = np.stack([rng.choice(k, args.feats, replace=False) for _ in range(n)]).astype(np.int32)
            codes = rng.integers(0, 2**32, (n * args.feats, agg_mod.packed_width(args.dim)), dtype=np.uint32)
            images = np.repeat(np.arange(n), args.feats).astype(np.int32)
            index = api.empty_index(cb)
            index = api.reserve(index, images=n + args.steps + 1, postings=(n + args.steps + 1) * args.feats)
            index = ivf.add(index, agg_mod.Aggregated(codes, words.reshape(-1), images))
            ref = None
            if not args.no_asmk:
                ref = _asmk_database(centroids, codes, words.reshape(-1), images)
            t_words, t_torch, t_ivf, t_asmk, parts = [], [], [], [], []
            for step in range(args.steps + 3):
                kf = n + step
                x = (centroids[rng.integers(0, k, args.feats)]
                     + 0.1 * rng.standard_normal((args.feats, args.dim))).astype(np.float32)
                ids = np.full(args.feats, kf, np.int64)
                # each library right after its own word assignment, as in MASt3R-SLAM (the assignment streams the
                # codebook through the caches, so neither inverted file starts with the other's data in cache)
                t0 = time.perf_counter()
                w5 = jasmk.quantize(cb, x, multiple_assignment=5, method="jax")
                t1 = time.perf_counter()
                agg = api.aggregate_images(cb, x, ids, binary=True, multiple_assignment=5, word_ids=w5)
                ta = time.perf_counter()
                scores = api.score_matrix_aggregated(index, agg)[0]
                np.argsort(-scores, kind="stable")[:3]
                tb = time.perf_counter()
                add = api.aggregate_images(cb, x, ids, binary=True, multiple_assignment=1, word_ids=w5[:, :1])
                tc = time.perf_counter()
                index = ivf.add(index, add)
                t2 = time.perf_counter()
                xt = torch.from_numpy(x)
                dist = (xt ** 2).sum(1)[:, None] + (c_torch ** 2).sum(1)[None, :] - 2 * (xt @ c_torch.mT)
                w_torch = torch.topk(dist, 5, dim=1, largest=False).indices.numpy()
                t3 = time.perf_counter()
                if ref is not None:
                    ref_scores = _asmk_step(ref, x, w_torch, kf)
                    t4 = time.perf_counter()
                    if step == 0 and np.array_equal(w_torch, w5):
                        assert np.abs(ref_scores - scores).max() < 1e-5, "asmk and jasmk disagree"
                if step >= 3:  # warm-up steps first
                    t_words.append(t1 - t0)
                    t_ivf.append(t2 - t1)
                    parts.append((ta - t1, tb - ta, tc - tb, t2 - tc))
                    t_torch.append(t3 - t2)
                    if ref is not None:
                        t_asmk.append(t4 - t3)
            med = {name: 1e3 * statistics.median(v) if v else float("nan")
                   for name, v in (("w", t_words), ("t", t_torch), ("j", t_ivf), ("a", t_asmk))}
            split = " / ".join(f"{1e3 * statistics.median(p):.2f}" for p in zip(*parts))
            print(f"| {k} | {n} | {med['w']:.2f} | {med['t']:.2f} | {med['j']:.2f} ({split}) | {med['a']:.2f} | "
                  f"{med['a'] / med['j']:.1f} |", flush=True)
    print(f"# fixed cost of a one-image jasmk.query (tiny index, words given): {_fixed_cost(np, jasmk):.3f} ms")
    return 0


def _asmk_database(centroids, codes, words, images):
    """asmk 0.1.1's kernel and inverted file with MASt3R's parameters, holding the same postings."""
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from helpers import asmk_params, asmk_with_centroids

    method = asmk_with_centroids(asmk_params(size=centroids.shape[0]), centroids)
    builder = method.create_ivf_builder()
    builder.ivf.add(codes.copy(), words.astype(np.int64), images.astype(np.int64))  # asmk packs bits as jasmk does
    return method, builder


def _asmk_step(ref, x, w5, kf):
    """MASt3R-SLAM's query then add of one keyframe, with asmk."""
    import numpy as np

    method, builder = ref
    kern, ivf = builder.kernel, builder.ivf
    sim = method.params["query_ivf"]["similarity"]
    ades, uwords = kern.aggregate_image(x, w5)
    ranks, ranked = ivf.search(ades, uwords, topk=None, similarity_func=lambda *a: kern.similarity(*a, **sim))
    scores = np.empty_like(ranked)
    scores[ranks] = ranked
    ivf.add(*kern.aggregate(x, w5[:, :1], np.full(x.shape[0], kf, np.int64)))
    return scores


def _fixed_cost(np, jasmk, repeat=2000):
    rng = np.random.default_rng(1)
    c = rng.standard_normal((64, 128)).astype(np.float32)
    feats = rng.standard_normal((100, 128)).astype(np.float32)
    ids = np.repeat(np.arange(10), 10)
    cb = jasmk.Codebook.from_centroids(c)
    index = jasmk.build_index(feats, ids, codebook=cb)
    q, qi = feats[:10], np.zeros(10, np.int64)
    w = jasmk.quantize(cb, q, multiple_assignment=5)
    for _ in range(20):
        jasmk.query(index, q, qi, word_ids=w)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        jasmk.query(index, q, qi, word_ids=w)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
