"""Word assignment on the CPU: exact faiss against the approximate options, HNSW and the list search (and JAX).

Prints, per codebook size: time per 1,000 descriptors, the speed-up over exact faiss measured in the same run,
the share of descriptors whose nearest word matches the exact one (MA = 1) and the share of the exact 5 nearest
words found (MA = 5), and the one-off build time of the HNSW graph or of the word lists. Descriptors are RootSIFT
(128-d) from real photos (opencv-doc's examples/data when installed, scikit-image's photos otherwise), or
Gaussian-cluster stand-ins of MASt3R's 1024-d features with ``--dim 1024``. Codebooks are sampled descriptors plus
noise (k-means for 64k words would take hours on a CPU; what matters here is the cost of the search and how often
the approximate searches miss).

    python experiments/bench_quantize.py [--sizes 1024 16384 65536] [--dim 1024] [--queries 20000]
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jasmk  # noqa: E402
from jasmk.core import codebook as cb_mod  # noqa: E402

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"


def rootsift_corpus(limit: int) -> np.ndarray:
    """RootSIFT descriptors of every photo found (opencv-doc, then scikit-image), up to ``limit``."""
    import cv2

    paths = sorted(glob.glob(os.path.join(OPENCV_DATA, "*.jpg")) + glob.glob(os.path.join(OPENCV_DATA, "*.png")))
    images = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in paths]
    try:
        import skimage.data as sd

        for name in ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "rocket"):
            img = getattr(sd, name)()
            images.append(img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
    except ImportError:
        pass
    sift = cv2.SIFT_create(nfeatures=3000)
    out = []
    for img in images:
        if img is None or min(img.shape) < 32:
            continue
        _, d = sift.detectAndCompute(img.astype(np.uint8), None)
        if d is not None:
            d = d / np.maximum(d.sum(1, keepdims=True), 1e-12)
            out.append(np.sqrt(d).astype(np.float32))
    x = np.concatenate(out)
    return x[np.random.default_rng(0).permutation(len(x))[:limit]]


def clusters(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((4096, dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn, repeat: int = 2):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384, 65536])
    ap.add_argument("--dim", type=int, default=128, help="128: RootSIFT of real photos; other: synthetic")
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--ef", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--probe", type=int, nargs="+", default=[8, 12, 24], help="lists searched (the list search)")
    ap.add_argument("--jax", action="store_true", help="also time the JAX search on this machine's default device")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("faiss").setLevel(logging.WARNING)

    if args.dim == 128:
        x = rootsift_corpus(max(args.sizes) + args.queries)
        source = "RootSIFT of real photos"
    else:
        x = clusters(max(args.sizes) + args.queries, args.dim, 0)
        source = f"synthetic {args.dim}-d clusters"
    rng = np.random.default_rng(1)
    print(f"{len(x)} descriptors ({source}), {jasmk.core.codebook.faiss_info()}")
    print("| words | method | ms / 1k desc | speed-up | top-1 agreement | MA-5 recall | build s |")
    print("|---|---|---|---|---|---|---|")
    for k in args.sizes:
        if k + 1000 > len(x):
            print(f"| {k} | skipped: only {len(x)} descriptors |")
            continue
        pick = rng.permutation(len(x))
        cent = x[pick[:k]] + 0.05 * rng.standard_normal((k, x.shape[1])).astype(np.float32)
        q = x[pick[k:k + args.queries]]
        cb = jasmk.Codebook.from_centroids(cent)
        t_exact, exact = timed(lambda: jasmk.quantize(cb, q, multiple_assignment=5, method="faiss"))
        per = 1000 * t_exact / len(q) * 1000
        print(f"| {k} | faiss exact | {per:.2f} | 1.0x | 1 | 1 | - |", flush=True)
        searches = (("hnsw", cb_mod.hnsw_index, "ef_search", args.ef),
                    ("ivf", cb_mod.word_lists, "n_probe", args.probe))
        for method, prepare, knob, values in searches:
            t0 = time.perf_counter()
            prepare(cb.centroids)  # the one-off graph or lists, timed apart from the searches
            build = time.perf_counter() - t0
            for value in values:
                t, approx = timed(lambda: jasmk.quantize(cb, q, multiple_assignment=5, method=method, **{knob: value}))
                top1 = np.mean(approx[:, 0] == exact[:, 0])
                recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approx, exact)])
                print(f"| {k} | {method} {knob}={value} | {1e6 * t / len(q):.2f} | {t_exact / t:.1f}x | {top1:.4f} | "
                      f"{recall:.4f} | {build:.1f} |", flush=True)
        if args.jax:
            jasmk.quantize(cb, q[:1000], multiple_assignment=5, method="jax")
            t, got = timed(lambda: jasmk.quantize(cb, q, multiple_assignment=5, method="jax"))
            print(f"| {k} | jax exact | {1e6 * t / len(q):.2f} | {t_exact / t:.1f}x | "
                  f"{np.mean(got[:, 0] == exact[:, 0]):.4f} | {np.mean(got == exact):.4f} | - |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
