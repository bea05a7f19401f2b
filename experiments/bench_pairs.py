"""MASt3R-SfM ``retrieval-Na-k`` pairs straight from an index against the dense score matrix path, in one run.

    python experiments/bench_pairs.py --sizes 2000 20000 100000

For each of ``--sizes``, an ASMK* inverted file is filled with the synthetic postings of
``experiments/bench_scale.py`` (64k-word codebook, Zipf-skewed words, scenes of 5 images sharing words and
codes, ``--rows`` aggregated rows per image with ``--bits``-bit codes; nothing is quantized). The query side of
each image is its own rows with a further ``--query-flip`` of the bits flipped, so the score matrix is not
symmetric (as MASt3R's, whose queries use 5 assignments and the index 1). Then, each in a fresh process (so
that the peak resident memory, ``getrusage`` ``ru_maxrss``, is that method's alone):

* ``index``: ``jasmk.pairs.retrieval_pairs_from_index(index, query_rows, na=Na, k=k)``;
* ``dense`` (sizes up to ``--dense-max``): ``retrieval_pairs(jasmk.score_matrix_aggregated(index, query_rows))``,
  MASt3R's way (its Retriever builds the dense matrix).

Each process builds the same index (same seed), warms the kernels up on the first 64 images, and reports the
build time, the peak RSS after building, the pair time and the peak RSS at the end; where both methods ran, the
pairs and key images are compared (they must be identical).
"""

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

log = logging.getLogger("bench_pairs")

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kiB on Linux


def one(args) -> dict:
    """Build the index of ``args.n`` images and run one method (in this process); returns the figures."""
    sys.path.insert(0, HERE)
    from bench_scale import K, make_postings

    import jasmk
    from jasmk import pairs
    from jasmk.core import aggregate as agg_mod
    from jasmk.core import ivf as ivf_mod

    width = args.bits // 32
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    vecs, words, images = make_postings(rng, args.n, args.rows, width)
    index = ivf_mod.add(ivf_mod.empty(np.zeros((K, 32 * width), np.float32), binary=True, use_idf=False),
                        agg_mod.Aggregated(vecs, words, images))
    qvecs = vecs.copy()
    for lo in range(0, vecs.shape[0], 1 << 20):  # bounded temporaries
        flips = rng.random((min(vecs.shape[0] - lo, 1 << 20), 32 * width)) < args.query_flip
        qvecs[lo:lo + flips.shape[0]] ^= np.packbits(flips, axis=1, bitorder="big").view(">u4").astype(np.uint32)
    qagg = agg_mod.Aggregated(qvecs, words, images)
    out = {"n": args.n, "method": args.method, "postings": int(words.size), "build_s": time.perf_counter() - t0}
    warm = images < min(64, args.n)
    jasmk.query_aggregated(index, agg_mod.Aggregated(qvecs[warm], words[warm], images[warm]), topk=10,
                           kernel=args.engine)
    jasmk.query_aggregated(index, agg_mod.Aggregated(qvecs[:args.rows], words[:args.rows], images[:args.rows]),
                           topk=10, kernel=args.engine)
    out["rss_built_gib"] = _rss_gib()
    t0 = time.perf_counter()
    if args.method == "index":
        p, keys = pairs.retrieval_pairs_from_index(index, qagg, na=args.na, k=args.k, seed=args.seed,
                                                   kernel=args.engine)
        out["pairs_s"] = time.perf_counter() - t0
    else:
        s = jasmk.score_matrix_aggregated(index, qagg, kernel=args.engine)
        out["matrix_s"] = time.perf_counter() - t0
        p, keys = pairs.retrieval_pairs(s, na=args.na, k=args.k, seed=args.seed)
        out["pairs_s"] = time.perf_counter() - t0
    out["rss_peak_gib"] = _rss_gib()
    out["n_pairs"] = int(len(p))
    if args.save:
        np.savez(args.save, pairs=p, keys=keys)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    ap.add_argument("--na", type=int, default=20, help="key images (MASt3R-SfM's retrieval-20-10: 20)")
    ap.add_argument("--k", type=int, default=10, help="neighbours per image (retrieval-20-10: 10)")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--bits", type=int, default=64, choices=[32, 64, 128, 256])
    ap.add_argument("--query-flip", type=float, default=0.05, help="share of query bits flipped")
    ap.add_argument("--dense-max", type=int, default=20000, help="largest size for the dense path")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one size
    ap.add_argument("--method", choices=["index", "dense"], default="index", help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.one is not None:
        args.n = args.one
        print("RESULT " + json.dumps(one(args)), flush=True)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            got = {}
            for method in ("index", "dense"):
                if method == "dense" and n > args.dense_max:
                    continue
                save = os.path.join(tmp, f"{method}-{n}.npz")
                cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--method", method, "--save", save,
                       "--na", str(args.na), "--k", str(args.k), "--rows", str(args.rows), "--bits", str(args.bits),
                       "--query-flip", str(args.query_flip), "--engine", args.engine, "--seed", str(args.seed)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    log.info("%d images, %s: failed (exit %d): %s", n, method, proc.returncode,
                             proc.stderr.strip().splitlines()[-1:] or "")
                    continue
                r = json.loads(lines[-1][7:])
                got[method] = save
                rows.append(r)
                extra = f", of which the dense matrix {r['matrix_s']:.1f}s" if "matrix_s" in r else ""
                log.info("%d images (%.1fM postings), %s: pairs in %.1fs%s; peak RSS %.2f GiB (%.2f GiB after the "
                         "build); %d pairs", n, r["postings"] / 1e6, method, r["pairs_s"], extra, r["rss_peak_gib"],
                         r["rss_built_gib"], r["n_pairs"])
            if len(got) == 2:
                a, b = np.load(got["index"]), np.load(got["dense"])
                same = np.array_equal(a["pairs"], b["pairs"]) and np.array_equal(a["keys"], b["keys"])
                log.info("%d images: index and dense pairs %s", n, "IDENTICAL" if same else "DIFFER")
                rows[-1]["identical"] = rows[-2]["identical"] = bool(same)
    log.info("")
    log.info("| images | method | pairs time | peak RSS (after build) | pairs | identical |")
    log.info("| --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        log.info("| %d | %s | %.1f s | %.2f GiB (%.2f) | %d | %s |", r["n"], r["method"], r["pairs_s"],
                 r["rss_peak_gib"], r["rss_built_gib"], r["n_pairs"], r.get("identical", "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
