"""Sharded index: query throughput and memory per device against the number of (virtual) devices.

    python experiments/bench_shard.py --devices 1 2 4 8 --images 20000 --rows 200

For each device count ``n`` a fresh Python process is started with ``XLA_FLAGS=--xla_force_host_platform_
device_count=n`` (the flag must be set before JAX starts). It fills an ASMK* index of ``--images`` images with
synthetic aggregated rows (``--rows`` per image, ``--bits``-bit codes, a 64k-word codebook with Zipf-skewed
word frequencies, images in scenes of 5 that share words), shards it over a 1-D mesh of the ``n`` devices, and
times, after a warm-up (compilation excluded):

* batches of ``--batch`` queries (database images' own rows, top 100), dense and sparse XLA kernels;
* the single-device index on the same rows with the same kernel (``n = 1`` row only, as the reference), and
  the results of both compared (ranks and scores must be equal);
* bytes of the index held by each device (``ShardedIndex.device_bytes``), and the largest shard's postings.

What virtual CPU devices can show: that the data is split (bytes per device fall as 1/n plus the replicated
codebook / idf), that results do not change with the mesh, and the overhead of ``shard_map`` + the all-gather
merge. What they cannot show: speed-up. All virtual devices share this machine's cores (the XLA CPU client runs
the per-device programs on one thread pool), so throughput with n virtual devices is at best the 1-device
figure; real scaling needs n accelerators (or hosts), where each device scans 1/n of the postings.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

K = 1 << 16


def make_rows(rng, n_images, rows, width, *, scene=5, zipf=0.5):
    """Aggregated rows (vecs [n*rows, W] uint32, words [n*rows] int32, images [n*rows] int32), grouped by image,
    distinct words per image."""
    p = np.arange(1, K + 1, dtype=np.float64) ** -zipf
    p /= p.sum()
    perm = rng.permutation(K)
    vecs, words = [], []
    for s in range(-(-n_images // scene)):
        pool = np.unique(perm[rng.choice(K, size=4 * rows, p=p)])
        bits = rng.integers(0, 2**32, size=(pool.size, width), dtype=np.uint32)
        for _ in range(min(scene, n_images - s * scene)):
            pick = np.sort(rng.choice(pool.size, min(rows, pool.size), replace=False))
            noise = rng.random((pick.size, width)) < 0.1
            vecs.append(bits[pick] ^ np.where(noise, rng.integers(0, 2**32, (pick.size, width), dtype=np.uint32), 0))
            words.append(pool[pick].astype(np.int32))
    counts = [w.size for w in words]
    images = np.repeat(np.arange(n_images, dtype=np.int32), counts)
    return np.concatenate(vecs), np.concatenate(words), images


def child(args):
    import jax
    from jax.sharding import Mesh

    import jasmk
    from jasmk import shard
    from jasmk.core import aggregate as agg_mod
    from jasmk.core import ivf

    n = len(jax.devices())
    width = args.bits // 32
    rng = np.random.default_rng(0)
    vecs, words, images = make_rows(rng, args.images, args.rows, width)
    agg = agg_mod.Aggregated(vecs, words, images)
    cent = np.zeros((K, 32 * width), np.float32)
    mesh = Mesh(np.array(jax.devices()), ("s",))
    t = time.perf_counter()
    sidx = shard.add(shard.empty(cent, mesh=mesh, binary=True, use_idf=False), agg)
    build_s = time.perf_counter() - t
    qimg = np.random.default_rng(1).choice(args.images, args.batch * args.reps, replace=False)
    qimg.sort()
    out = {"devices": n, "images": args.images, "postings": int(sidx.n_entries),
           "max_shard_postings": int(sidx.shard_entries.max()), "build_s": build_s}
    held = sidx.device_bytes()
    out["bytes_per_device_max"] = int(max(held.values()))
    out["bytes_total"] = int(sum(held.values()))
    replicated = sum(x.nbytes for x in (sidx.centroids, sidx.counts, sidx.idf, sidx.image_slots))
    out["shard_bytes_per_device_max"] = int(max(held.values())) - replicated  # postings, norms, ids
    ref = ivf.add(ivf.empty(cent, binary=True, use_idf=False), agg)
    for eng in args.engines:
        batches = []
        for r in range(args.reps):
            sel = np.isin(images, qimg[r * args.batch:(r + 1) * args.batch])
            batches.append(agg_mod.Aggregated(vecs[sel], words[sel], images[sel]))
        for q in batches:  # compile every shape the timed loop meets (pair counts step on a ladder)
            shard.query_aggregated(sidx, q, topk=100, kernel=eng)
        t = time.perf_counter()
        for q in batches:
            res = shard.query_aggregated(sidx, q, topk=100, kernel=eng)
        dt = time.perf_counter() - t
        out[f"{eng}_queries_per_s"] = args.batch * args.reps / dt
        for q in batches:
            jasmk.query_aggregated(ref, q, topk=100, kernel=eng)
        t = time.perf_counter()
        for q in batches:
            want = jasmk.query_aggregated(ref, q, topk=100, kernel=eng)
        if n == 1:  # the single-device index's speed, measured once
            out[f"{eng}_single_device_queries_per_s"] = args.batch * args.reps / (time.perf_counter() - t)
        out[f"{eng}_same_results"] = bool(np.array_equal(res.ranks, want.ranks)
                                          and np.array_equal(res.scores, want.scores))
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--engines", nargs="+", default=["dense", "sparse-xla"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    for n in args.devices:
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()}
        cmd = [sys.executable, __file__, "--child", "--images", str(args.images), "--rows", str(args.rows),
               "--bits", str(args.bits), "--batch", str(args.batch), "--reps", str(args.reps), "--engines",
               *args.engines]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"the {n}-device run failed")
        rows.append(json.loads(line[0][7:]))
        print(json.dumps(rows[-1]), flush=True)
    print()
    head = (["devices", "max shard postings", "shard MiB/device (max)", "MiB/device incl. replicated",
             "MiB total"] + [f"{e} q/s" for e in args.engines]
            + ["same results as one device"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["devices"], r["max_shard_postings"], f"{r['shard_bytes_per_device_max'] / 2**20:.1f}",
                 f"{r['bytes_per_device_max'] / 2**20:.1f}",
                 f"{r['bytes_total'] / 2**20:.1f}"] + [f"{r[f'{e}_queries_per_s']:.1f}" for e in args.engines] + [
                     all(r[f"{e}_same_results"] for e in args.engines)]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    one = [r for r in rows if r["devices"] == 1]
    for e in args.engines:
        if one and f"{e}_single_device_queries_per_s" in one[0]:
            print(f"single-device index (jasmk.query_aggregated), {e}: "
                  f"{one[0][f'{e}_single_device_queries_per_s']:.1f} q/s")


if __name__ == "__main__":
    main()
