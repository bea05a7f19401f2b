"""ASMK* aggregation: the compiled host kernel (what jasmk runs on the CPU backend) against the jitted path (what an
accelerator runs), at the sizes users build and query.

    JAX_PLATFORMS=cpu python experiments/bench_aggregate.py [--sizes 10x2900x4096x5 148x2900x4096x1 ...]

Without ``JAX_PLATFORMS=cpu`` on a GPU machine the jitted path runs on the GPU (``experiments/gpu_check.sh``), which
measures where the host kernel stops paying there (``aggregate.COMPILED_HOST_PAIRS``).

Each size is ``images x descriptors per image x words x multiple assignment`` of 128-d unit descriptors whose
words follow a Zipf law (bursty cells, as real images have). For each size it prints the seconds of the jitted
path's first call (XLA compilation included) and of a warm call, the host kernel's seconds (chunks of whole
images of ``aggregate.HOST_CHUNK_PAIRS`` pairs; its compiled kernel comes from the cache folder, warmed before the
first size), the ratio jitted warm / host (above 1: the host is faster) and whether both give the same rows
and bits. Both run in this process with the same threads; the median of ``--repeat`` calls is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jasmk.core import aggregate as agg_mod
from jasmk.core import cpu_kernel


def make(n_images: int, per_image: int, n_words: int, ma: int, dim: int = 128, seed: int = 0):
    """``(centroids [K, D], vecs [N, D], words [N, MA] int32, image ids [N])``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_images * per_image, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.standard_normal((n_words, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    words = (rng.zipf(1.3, size=(n_images * per_image, ma)) % n_words).astype(np.int32)
    return c, x, words, np.repeat(np.arange(n_images), per_image)


def timed(fn, repeat: int):
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1x2900x4096x5", "10x2900x4096x5", "148x2900x4096x1",
                                                   "148x2900x4096x5", "1000x1000x65536x1", "100x3000x65536x5"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not cpu_kernel.available():
        raise SystemExit("numba is not installed: the host kernel cannot run")
    c, x, w, ids = make(2, 100, 64, 2)
    agg_mod.aggregate_host_chunked(c, x, w, ids)  # load the compiled kernel once
    print(f"jitted path on {jax.devices()[0].device_kind} ({jax.default_backend()}); host kernel on the CPU\n")
    print("| images x desc x words x MA | pairs | jitted first call s | jitted warm s | host s | jitted / host "
          "| same |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for size in args.sizes:
        n_img, per, k, ma = (int(v) for v in size.split("x"))
        c, x, w, ids = make(n_img, per, k, ma)
        cj = jnp.asarray(c)  # device centroids: the jitted path whatever the size
        t = time.perf_counter()
        agg_mod.aggregate(cj, x, w, ids, binary=True)
        first = time.perf_counter() - t
        jitted, warm = timed(lambda: agg_mod.aggregate(cj, x, w, ids, binary=True), args.repeat)
        host, th = timed(lambda: agg_mod.aggregate_host_chunked(c, x, w, ids), args.repeat)
        same = all(np.array_equal(a, b) for a, b in zip(host, jitted))
        print(f"| {size} | {x.shape[0] * ma:,} | {first:.3f} | {warm:.3f} | {th:.3f} | {warm / th:.1f}x | "
              f"{'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
