"""Scoring and adding at scale: jasmk against asmk 0.1.1 on the same postings, in one run.

    python experiments/bench_scale.py --sizes 2000 20000 100000 --rows 300 --bits 64

ASMK* inverted files of ``--sizes`` images are filled with the same synthetic postings in both libraries: a
64k-word codebook with Zipf-skewed word frequencies, images in scenes of 5 that share words and (noisy) codes,
``--rows`` aggregated rows per image with ``--bits``-bit codes. Nothing is quantized: the postings are given as
aggregated rows (jasmk: ``ivf.add(ivf.empty(...), Aggregated(...))``; asmk: its ``IVF`` state filled from the
same per-word arrays), and the queries are database images' own rows (top 100 kept). Printed per size:

* one query at a time: asmk ``IVF.search`` and ``jasmk.query_aggregated`` with a batch of one image;
* batches of 64 queries (jasmk; asmk has no batches: its per-query time is the reference);
* ns per touched (query row, posting) pair, for each jasmk kernel (``--engines``);
* all-vs-all ``score_matrix`` on the sizes up to ``--all-vs-all-max`` (asmk: every image searched with all
  results, as MASt3R's Retriever does);
* adding one image (``--rows`` rows) to the index, jasmk and asmk, and an online loop (add one image, then
  query with it) with the number of XLA compilations inside the loop;
* building in 10 chunks (``ivf.add`` 10 times) against one build of the same rows.

Ranks are compared with asmk's over the top 100 (positions that differ must be ties in asmk's own scores).
"""

import argparse
import gc
import logging
import sys
import time

import numpy as np

import jasmk
from jasmk.core import aggregate as agg_mod
from jasmk.core import cpu_kernel
from jasmk.core import ivf as ivf_mod

log = logging.getLogger("bench_scale")

K = 1 << 16


def make_postings(rng, n_images, rows, width, *, scene=5, zipf=0.5):
    """Aggregated rows ``(vecs [n*rows, W] uint32, words [n*rows] int32, images [n*rows] int32)``, grouped by
    image; images of one scene draw their words from the scene's pool and flip 10 % of the scene's bits."""
    ranks = np.arange(1, K + 1, dtype=np.float64)
    p = ranks ** -zipf
    p /= p.sum()
    perm = rng.permutation(K)
    n_scenes = -(-n_images // scene)
    pool = 2 * rows
    vecs = np.empty((n_images * rows, width), np.uint32)
    words = np.empty(n_images * rows, np.int32)
    chunk = 2000  # scenes per step (bounded temporaries)
    for s0 in range(0, n_scenes, chunk):
        s1 = min(n_scenes, s0 + chunk)
        ns = s1 - s0
        scene_words = perm[rng.choice(K, size=(ns, pool), p=p)]  # repeats allowed; deduplicated per image below
        scene_bits = rng.integers(0, 2**32, size=(ns, pool, width), dtype=np.uint32)
        for i in range(s0 * scene, min(n_images, s1 * scene)):
            sc = i // scene - s0
            pick = rng.choice(pool, rows, replace=False)
            w = scene_words[sc, pick]
            w, first = np.unique(w, return_index=True)
            extra = rows - w.size  # top up duplicates with fresh words so every image has exactly `rows` rows
            if extra:
                fresh = np.setdiff1d(rng.choice(K, 4 * extra + 8, replace=False), w)[:extra]
                w = np.concatenate([w, fresh])
                first = np.concatenate([first, rng.choice(rows, extra)])
            flips = (rng.random((rows, width * 32)) < 0.1)
            flip_words = np.packbits(flips, axis=1, bitorder="big").view(">u4").astype(np.uint32)
            vecs[i * rows:(i + 1) * rows] = scene_bits[sc, pick[first]] ^ flip_words
            words[i * rows:(i + 1) * rows] = w
    images = np.repeat(np.arange(n_images, dtype=np.int32), rows)
    return vecs, words, images


def asmk_ivf(vecs, words, images, n_images):
    """asmk 0.1.1's ``IVF`` holding the postings (its state, filled per word in image order, as its add does)."""
    from asmk import inverted_file

    order = np.argsort(words, kind="stable")
    w_sorted = words[order]
    counts = np.bincount(words, minlength=K).astype(np.int32)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    ivf_vecs, ivf_ids = [None] * K, [None] * K
    for w in np.flatnonzero(counts):
        sel = order[bounds[w]:bounds[w + 1]]
        ivf_vecs[w] = vecs[sel]
        ivf_ids[w] = images[sel].astype(np.int64)
    del w_sorted
    norm = np.bincount(images, minlength=n_images).astype(np.float64)
    return inverted_file.IVF(norm_factor=norm, n_images=n_images, ivf_vecs=ivf_vecs, ivf_image_ids=ivf_ids,
                             counts=counts, idf=np.ones(K, np.float32), imid_offset=0, use_idf=False)


def asmk_similarity(width):
    from asmk import kernel as kern_pkg

    class _Cdb:
        centroids = np.zeros((K, 32 * width), np.float32)

    kern = kern_pkg.ASMKKernel(_Cdb, binary=True)
    return lambda *x: kern.similarity(*x, alpha=3.0, similarity_threshold=0.0)


def timed(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


class CompileCounter:
    """Counts XLA compilations (jax.monitoring events) while active."""

    def __init__(self):
        import jax

        self.n = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kw):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.n += 1


def agg_of(vecs, words, images, sel_images, rows):
    """The rows of the images ``sel_images`` (ascending); every image has ``rows`` rows, stored in order."""
    m = (np.asarray(sel_images)[:, None] * rows + np.arange(rows)).ravel()
    return agg_mod.Aggregated(vecs[m], words[m], images[m])


def pairs_of(index, agg):
    counts = np.asarray(index.counts)
    return int(counts[agg.words].sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--bits", type=int, default=64, choices=[32, 64, 128, 256])
    ap.add_argument("--queries", type=int, default=64, help="query images per size (database images' own rows)")
    ap.add_argument("--asmk-queries", type=int, default=20, help="of those, searched by asmk one at a time")
    ap.add_argument("--single", type=int, default=20, help="of those, searched by jasmk one at a time")
    ap.add_argument("--engines", nargs="+", default=["auto", "dense", "sparse-xla", "sparse-cpu"])
    ap.add_argument("--all-vs-all-max", type=int, default=20000)
    ap.add_argument("--no-asmk", action="store_true", help="skip asmk (for sizes it cannot hold in memory)")
    ap.add_argument("--no-chunked", action="store_true", help="skip the build in 10 adds (it holds a second index)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from jasmk import configure_logging

    configure_logging(prefix="bench_scale")  # libraries' load-time INFO off; jasmk's own warnings on stderr
    width = args.bits // 32
    counter = CompileCounter()
    table = []
    for n in args.sizes:
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        vecs, words, images = make_postings(rng, n, args.rows, width)
        log.info("== %d images x %d rows (%d-bit codes): %d postings, made in %.1fs", n, args.rows, args.bits,
                 len(words), time.perf_counter() - t0)
        cent = np.zeros((K, 32 * width), np.float32)
        t_build, index = timed(lambda: ivf_mod.add(ivf_mod.empty(cent, binary=True, use_idf=False),
                                                    agg_mod.Aggregated(vecs, words, images)), 1)
        log.info("jasmk build: %.2fs, %d segments, word imbalance factor %.2f, %.1f bytes per posting", t_build,
                 len(index.segments), index.stats()["imbalance_factor_of_vw"],
                 sum(s.vecs.nbytes + s.words.nbytes + s.images.nbytes for s in index.segments) / len(words))
        q_imgs = rng.choice(n, args.queries, replace=False)
        q_imgs.sort()
        qagg = agg_of(vecs, words, images, q_imgs, args.rows)
        row = {"n": n, "postings": len(words)}
        ref = None
        if not args.no_asmk:
            t0 = time.perf_counter()
            a_ivf = asmk_ivf(vecs, words, images, n)
            log.info("asmk IVF filled in %.1fs", time.perf_counter() - t0)
            sim = asmk_similarity(width)
            aq = q_imgs[: args.asmk_queries]
            t0 = time.perf_counter()
            ref = [a_ivf.search(vecs[i * args.rows:(i + 1) * args.rows], words[i * args.rows:(i + 1) * args.rows],
                                similarity_func=sim, topk=100) for i in aq]
            row["asmk_ms"] = 1e3 * (time.perf_counter() - t0) / len(aq)
            log.info("asmk search: %.2f ms/query", row["asmk_ms"])
        pairs = pairs_of(index, qagg) / args.queries
        row["pairs_per_query"] = pairs
        for eng in args.engines:
            if eng == "sparse-cpu" and not cpu_kernel.available():
                continue
            sq = q_imgs[: args.single]
            singles = [agg_of(vecs, words, images, [i], args.rows) for i in sq]
            for a in singles:  # compile (once per shape on the capacity ladders) and warm up
                jasmk.query_aggregated(index, a, topk=100, kernel=eng)
            t0 = time.perf_counter()
            for a in singles:
                jasmk.query_aggregated(index, a, topk=100, kernel=eng)
            t1 = 1e3 * (time.perf_counter() - t0) / len(singles)
            jasmk.query_aggregated(index, qagg, topk=100, kernel=eng)  # compile
            tb, resb = timed(lambda: jasmk.query_aggregated(index, qagg, topk=100, kernel=eng), 2)
            tb = 1e3 * tb / args.queries
            row[f"{eng}_single_ms"], row[f"{eng}_batch_ms"] = t1, tb
            msg = (f"jasmk {eng:10s}: one at a time {t1:7.2f} ms/query, batch of {args.queries} {tb:7.2f} ms/query"
                   f" ({1e6 * t1 / pairs:5.1f} / {1e6 * tb / pairs:5.1f} ns per touched pair)")
            if ref is not None:
                a_ms = row["asmk_ms"]
                msg += f"; vs asmk {a_ms / t1:5.2f}x / {a_ms / tb:5.2f}x"
                # agreement with asmk over the top 100
                agree = tot = 0
                for j, (r, s) in enumerate(ref):
                    ours = resb.ranks[j]
                    for p, (x, y) in enumerate(zip(ours, r)):
                        tot += 1
                        agree += x == y or abs(resb.scores[j, p] - s[p]) <= 1e-6  # same image or a tie
                msg += f"; top-100 agreement {100 * agree / tot:.1f}%"
            log.info(msg)
        if n <= args.all_vs_all_max:
            allagg = agg_mod.Aggregated(vecs, words, images)
            t_s, S = timed(lambda: jasmk.score_matrix_aggregated(index, allagg), 1)
            row["all_vs_all_s"] = t_s
            log.info("jasmk all-vs-all score_matrix: %.1fs (%.2f ms/query), %s", t_s, 1e3 * t_s / n, S.shape)
            if ref is not None:
                est = row["asmk_ms"] * n / 1e3
                row["asmk_all_vs_all_s"] = est
                log.info("asmk all-vs-all (per-query search x %d, estimated from the timed queries): %.1fs; %.1fx",
                         n, est, est / t_s)
            del S
        # adding one image, and the online loop
        new = agg_mod.Aggregated(vecs[: args.rows], words[: args.rows], np.full(args.rows, n, np.int32))
        t_add, grown = timed(lambda: ivf_mod.add(index, new), 3)
        row["jasmk_add_ms"] = 1e3 * t_add
        msg = f"add one image: jasmk {1e3 * t_add:.2f} ms"
        if ref is not None:
            def asmk_add():
                a_ivf.add(new.vecs, new.words, np.full(args.rows, a_ivf.n_images, np.int64))
            t_aadd, _ = timed(asmk_add, 3)
            row["asmk_add_ms"] = 1e3 * t_aadd
            msg += f", asmk {1e3 * t_aadd:.2f} ms ({t_aadd / t_add:.2f}x)"
        log.info(msg)
        cur = grown
        jasmk.query_aggregated(cur, new, topk=10)
        counter.n, counter.active = 0, True
        t0 = time.perf_counter()
        steps = 50
        for s in range(steps):
            lo, hi = (s + 1) * args.rows, (s + 2) * args.rows  # image s + 1's rows, again as a new image
            frame = agg_mod.Aggregated(vecs[lo:hi], words[lo:hi], np.full(args.rows, int(cur.n_images), np.int32))
            cur = ivf_mod.add(cur, frame)
            res = jasmk.query_aggregated(cur, frame, topk=10)
            assert res.ranks[0, 0] == int(cur.n_images) - 1 or res.scores[0, 0] == res.scores[0, 1]
        counter.active = False
        row["online_ms"] = 1e3 * (time.perf_counter() - t0) / steps
        row["online_compiles"] = counter.n
        log.info("online loop (add one image, query it), %d steps: %.2f ms per step, %d XLA compilations, "
                 "%d segments at the end", steps, row["online_ms"], counter.n, len(cur.segments))
        a_ivf = grown = cur = None  # free asmk's copy before building a second index
        gc.collect()
        if args.no_chunked:
            table.append(row)
            index = None
            gc.collect()
            continue
        # build in 10 chunks vs one build
        cuts = np.linspace(0, n, 11).astype(int)

        def chunked():
            idx = ivf_mod.empty(cent, binary=True, use_idf=False)
            for a, b in zip(cuts[:-1], cuts[1:]):
                lo, hi = a * args.rows, b * args.rows
                idx = ivf_mod.add(idx, agg_mod.Aggregated(vecs[lo:hi], words[lo:hi], images[lo:hi]))
            return idx

        t_chunk, _ = timed(chunked, 1)
        row["chunked_ratio"] = t_chunk / t_build
        log.info("build in 10 adds: %.2fs, %.2fx one build", t_chunk, t_chunk / t_build)
        table.append(row)
        index = None  # free this size's arrays before the next
        gc.collect()
    import resource

    log.info("peak resident memory of this run: %.2f GiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    log.info("")
    log.info("| images | postings | asmk ms/query | jasmk auto, one at a time | jasmk auto, batch of 64 | "
             "add one image jasmk / asmk (ms) |")
    for r in table:
        a = r.get("asmk_ms", float("nan"))
        log.info("| %d | %.1fM | %.2f | %.2f ms (%.1fx) | %.2f ms (%.1fx) | %.2f / %s |", r["n"], r["postings"] / 1e6,
                 a, r["auto_single_ms"], a / r["auto_single_ms"], r["auto_batch_ms"], a / r["auto_batch_ms"],
                 r["jasmk_add_ms"], f"{r['asmk_add_ms']:.2f}" if "asmk_add_ms" in r else "-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
