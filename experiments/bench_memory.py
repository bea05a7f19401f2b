"""Peak memory (RSS) of a small jasmk process against asmk 0.1.1, step by step, each step in a fresh process.

    JAX_PLATFORMS=cpu python experiments/bench_memory.py [--images 148 --per-image 2900 --words 4096]
        [--variants] [--contributors]

Every measurement is its own subprocess (``JAX_PLATFORMS=cpu``), which reports its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) and its current RSS (``VmRSS`` of ``/proc/self/status``, split into
anonymous memory and file pages, ``RssAnon`` / ``RssFile``) at the end:

* python + numpy; ``import faiss``; ``import jax`` and a first ``jnp`` operation (which starts the CPU backend);
  ``import jasmk`` against ``import asmk``;
* the data alone (``--images`` x ``--per-image`` float32 descriptors, L2-normalized, images of shared scenes);
* end to end: a ``--words`` codebook loaded from a ``.npy`` file (the same centroids for both), an index of every
  image (MA 1), then every image queried (MA ``--ma``): asmk's ``ASMKMethod.build_ivf`` / ``query_ivf`` against
  ``jasmk.build_index(codebook=...)`` / ``jasmk.query``; the peak after the build and after the query are both
  shown, and jasmk's query runs a second time (warm: nothing left to compile).

jasmk's process then queries single images (``jasmk.query``, and ``jasmk.query_padded`` on a first, a repeated and a
new padded shape), timing each call and counting its XLA compilations.

``--variants`` also runs jasmk's end to end with settings that change its memory: glibc's arena count
(``MALLOC_ARENA_MAX=2``), one XLA CPU thread, ASMK* aggregation jitted (as on a GPU) and smaller
staging buffers for it (module constants of ``jasmk.core.aggregate`` set in the child), a cold
numba kernel cache, the JAX quantizer (``quantizer="jax"``) at two values of ``jasmk.core.codebook.CHUNK_BYTES``,
and a persistent XLA compilation cache (a second process, whose programs are loaded from the cache).
``--contributors`` lists what ``import jasmk`` imports, the RSS of each heavy package imported alone, the slowest
imports (``python -X importtime``) and what a first ``save_index`` / ``load_index`` adds (orbax, tensorstore).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HEAVY = ("jax", "jaxlib", "faiss", "numba", "llvmlite", "scipy", "flax", "orbax", "tensorstore", "torch", "h5py",
         "yaml", "tqdm", "ml_dtypes", "optax", "matplotlib")


# ---------------------------------------------------------------------------------------------------------
# the child: one measurement


def rss_mb() -> tuple[float, float]:
    """``(peak, current)`` RSS of this process in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    cur = float("nan")
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
    return peak, cur


def make_data(n_images: int, per_image: int, dim: int, seed: int = 0):
    """``(feats [n_images * per_image, dim] float32 L2-normalized, ids)``: image ``i`` sees a noisy subset of the
    points of scene ``i % (n_images // 3)``; generated image by image into one array (no float64 temporaries), so
    that the data costs its own size and nothing more."""
    import numpy as np

    n_scenes = max(2, n_images // 3)
    feats = np.empty((n_images * per_image, dim), np.float32)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        scene = np.random.default_rng((seed, i % n_scenes)).standard_normal((2 * per_image, dim), dtype=np.float32)
        block = feats[i * per_image:(i + 1) * per_image]
        block[:] = scene[rng.choice(2 * per_image, per_image, replace=False)]
        block += 0.5 * rng.standard_normal((per_image, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return feats, np.repeat(np.arange(n_images), per_image)


def make_centroids(path: str, words: int, n_images: int, per_image: int, dim: int, seed: int = 0) -> None:
    """Write ``words`` unit centroids near the points of :func:`make_data`'s scenes (taken in turn) to ``path``
    (``.npy``): a stand-in for a codebook trained on such data, which both libraries load."""
    import numpy as np

    n_scenes = max(2, n_images // 3)
    rng = np.random.default_rng(seed + 1)
    c = np.empty((words, dim), np.float32)
    for s in range(n_scenes):
        rows = np.arange(s, words, n_scenes)
        scene = np.random.default_rng((seed, s)).standard_normal((2 * per_image, dim), dtype=np.float32)
        c[rows] = scene[rng.choice(2 * per_image, rows.size, replace=rows.size > 2 * per_image)]
    c += 0.3 * rng.standard_normal((words, dim), dtype=np.float32)
    np.save(path, (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32))


def compile_counter():
    """A list that collects the seconds of every XLA program this process gets (compiled, or loaded from the
    persistent compilation cache: each cache hit also adds a ``None``)."""
    import jax

    seconds = []

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seconds.append(duration)

    def hit(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            seconds.append(None)

    jax.monitoring.register_event_duration_secs_listener(listen)
    jax.monitoring.register_event_listener(hit)
    return seconds


def compiled(seconds, start=0) -> str:
    """``"N"`` programs compiled since ``start`` (``"N (+H from the cache)"`` with cache hits)."""
    part = seconds[start:]
    hits = part.count(None)
    n = sum(x is not None for x in part) - hits  # a hit also records the duration of its (cached) backend step
    return f"{n}" + (f" (+{hits} from the cache)" if hits else "")


def child(args) -> dict:
    import time

    out = {}
    step = args.child
    if step == "numpy":
        import numpy  # noqa: F401
    elif step == "faiss":
        import faiss  # noqa: F401
        import numpy  # noqa: F401
    elif step == "jax":
        import jax.numpy as jnp

        jnp.ones(8).sum().block_until_ready()  # starts the CPU backend (its client and thread pools)
    elif step == "import":
        before = set(sys.modules)
        __import__(args.lib)
        out["modules"] = sorted({m.split(".")[0] for m in set(sys.modules) - before} & set(HEAVY))
    elif step == "module":  # one package alone, after numpy (and jax, for the packages built on it)
        import importlib

        import numpy  # noqa: F401

        if args.base:
            importlib.import_module(args.base)
        out["base_peak"], _ = rss_mb()
        importlib.import_module(args.lib)
    elif step == "data":
        __import__(args.lib)
        make_data(args.images, args.per_image, args.dim)
    elif step == "checkpoint":  # an index of random postings (no quantization), then saved and loaded
        checkpoint_step(args, out)
    elif step == "centroids":  # the parent imports no numpy: a child's peak starts at its parent's RSS
        make_centroids(args.centroids, args.words, args.images, args.per_image, args.dim)
    elif step == "e2e":
        e2e(args, out, time)
    else:
        raise SystemExit(f"unknown step {step}")
    out["peak"], out["cur"] = rss_mb()
    with open("/proc/self/status") as handle:  # the high-water mark of this process's own memory map
        status = {x.split(":")[0]: x.split()[1] for x in handle if x.startswith(("VmHWM:", "RssAnon:", "RssFile:"))}
    out["hwm"] = int(status["VmHWM"]) / 1024
    # of the current RSS: anonymous memory (heap, arrays) against file pages (shared libraries: shared by every
    # process that maps them, and given back by the kernel under pressure)
    out["anon"], out["file"] = int(status["RssAnon"]) / 1024, int(status["RssFile"]) / 1024
    return out


def e2e(args, out, time):
    import numpy as np

    if args.lib == "asmk":
        from asmk import asmk_method
        from asmk import codebook as cdb_pkg
        from asmk import index as idx_pkg

        feats, ids = make_data(args.images, args.per_image, args.dim)
        out["data"] = rss_mb()[0]
        centroids = np.load(args.centroids)
        params = {
            "index": {"gpu_id": None},
            "train_codebook": {"codebook": {"size": len(centroids)}},
            "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                          "quantize": {"multiple_assignment": 1}, "aggregate": {}},
            "query_ivf": {"quantize": {"multiple_assignment": args.ma}, "aggregate": {}, "search": {"topk": None},
                          "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}},
        }
        cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=len(centroids))
        cdb.index(np.ascontiguousarray(centroids))
        method = asmk_method.ASMKMethod(params, {}, codebook=cdb)
        t = time.perf_counter()
        built = method.build_ivf(feats, ids)
        out["build_s"], out["build"] = time.perf_counter() - t, rss_mb()[0]
        t = time.perf_counter()
        built.query_ivf(feats, ids)
        out["query_s"], out["query"] = time.perf_counter() - t, rss_mb()[0]
        return
    import jax

    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compiles = compile_counter()
    import jasmk
    from jasmk.core import aggregate as agg_mod
    from jasmk.core import codebook as cb_mod

    if args.chunk_mb:
        cb_mod.CHUNK_BYTES = args.chunk_mb * 2**20
    if args.call_rows:
        agg_mod._CALL_ROWS = args.call_rows  # the aggregation's staging rows (read per call; jitted path only)
    if args.jit_aggregation:  # ASMK* aggregation by the jitted path (as on a GPU), not the compiled CPU kernel
        agg_mod.host_serves = lambda n_pairs, **_: False
    feats, ids = make_data(args.images, args.per_image, args.dim)
    out["data"] = rss_mb()[0]
    cb = jasmk.Codebook.from_centroids(np.load(args.centroids))
    t = time.perf_counter()
    index = jasmk.build_index(feats, ids, codebook=cb, quantizer=args.quantizer)
    out["build_s"], out["build"], out["build_compiles"] = time.perf_counter() - t, rss_mb()[0], compiled(compiles)
    t = time.perf_counter()
    jasmk.query(index, feats, ids, multiple_assignment=args.ma, quantizer=args.quantizer)
    out["query_s"], out["query"] = time.perf_counter() - t, rss_mb()[0]
    out["compiles"], out["compile_s"] = compiled(compiles), sum(x for x in compiles if x is not None)
    n_before = len(compiles)
    t = time.perf_counter()
    jasmk.query(index, feats, ids, multiple_assignment=args.ma, quantizer=args.quantizer)
    out["query2_s"], out["query2"] = time.perf_counter() - t, rss_mb()[0]
    out["compiles2"] = compiled(compiles, n_before)
    out["numba"] = "numba" in sys.modules
    if args.single:  # one image at a time: the first call of a kind against the next (warm) one
        for name, fn in single_queries(jasmk, index, feats, ids, args):
            n0 = len(compiles)
            t = time.perf_counter()
            fn()
            out.setdefault("single", []).append((name, time.perf_counter() - t, compiled(compiles, n0), rss_mb()[0]))


def checkpoint_step(args, out):
    import numpy as np

    import jasmk
    from jasmk.core import ivf

    rng = np.random.default_rng(0)
    rows = 2000  # aggregated rows per image (about what 2,900 descriptors give at MA 1)
    words = np.sort(rng.integers(0, args.words, (args.images, rows)), axis=1).astype(np.int32).ravel()
    agg = jasmk.Aggregated(rng.integers(0, 2**32, (args.images * rows, -(-args.dim // 32)), dtype=np.uint32), words,
                           np.repeat(np.arange(args.images, dtype=np.int32), rows))
    index = ivf.add(ivf.empty(np.load(args.centroids), binary=True, use_idf=False, codebook_size_param=args.words),
                    agg)
    if args.lib == "save":
        import tempfile

        before = set(sys.modules)
        with tempfile.TemporaryDirectory() as tmp:
            jasmk.save_index(os.path.join(tmp, "index"), index)
            jasmk.load_index(os.path.join(tmp, "index"))
        out["modules"] = sorted(({m.split(".")[0] for m in sys.modules} - {m.split(".")[0] for m in before})
                                & set(HEAVY))


def single_queries(jasmk, index, feats, ids, args):
    """``(name, call)`` of single-image queries: ``jasmk.query`` on two images, then ``jasmk.query_padded`` on one
    image padded to 4096 rows (first call, the same shape again, another image) and to 3072 rows (a new shape)."""
    import numpy as np

    p = args.per_image

    def padded(i, rows):
        f = np.zeros((1, rows, args.dim), np.float32)
        f[0, :p] = feats[i * p:(i + 1) * p]
        valid = np.zeros((1, rows), bool)
        valid[0, :p] = True
        return lambda: jax_ready(jasmk.query_padded(index, f, valid, multiple_assignment=args.ma))

    def one(i):
        return lambda: jasmk.query(index, feats[i * p:(i + 1) * p], ids[i * p:(i + 1) * p],
                                   multiple_assignment=args.ma)

    return [("query image 0 (jasmk.query)", one(0)), ("query image 1", one(1)),
            ("query_padded image 0, 4096 rows (first)", padded(0, 4096)),
            ("query_padded image 1, 4096 rows (warm)", padded(1, 4096)),
            ("query_padded image 2, 3072 rows (new shape)", padded(2, 3072)),
            ("query_padded image 3, 3072 rows (warm)", padded(3, 3072))]


def jax_ready(tree):
    import jax

    return jax.block_until_ready(tree)


# ---------------------------------------------------------------------------------------------------------
# the parent: one subprocess per measurement


def run(args, step, lib="", env=None, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", step, "--lib", lib, "--words", str(args.words),
           "--images", str(args.images),
           "--per-image", str(args.per_image), "--dim", str(args.dim), "--ma", str(args.ma),
           "--centroids", args.centroids, *extra]
    e = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    done = subprocess.run(cmd, env=e, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{step} {lib} failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a, b):
    return f"{b / a:.2f}" if a else ""


def contributors(args):
    """What ``import jasmk`` brings in, and what each heavy package costs imported alone."""
    got = run(args, "import", "jasmk")
    print(f"\n`import jasmk` imports these heavy packages: {', '.join(got['modules']) or 'none'}\n")
    print("| package | imported after | peak MB | + MB |")
    print("|---|---|---|---|")
    for mod, base in (("jax", ""), ("faiss", ""), ("llvmlite.binding", ""), ("numba", ""), ("scipy", ""),
                      ("tensorstore", ""), ("asmk", ""), ("jasmk", "jax"), ("jasmk.core.numba_kernel", "jasmk"),
                      ("flax", "jax"), ("orbax.checkpoint", "jax"), ("torch", "")):
        try:
            r = run(args, "module", mod, extra=("--base", base) if base else ())
        except SystemExit:
            print(f"| {mod} | | (not importable) | |")
            continue
        print(f"| {mod} | numpy{' + ' + base if base else ''} | {r['peak']:.0f} | {r['peak'] - r['base_peak']:.0f} |")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import jasmk"], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].strip()))
    print("\n`python -X importtime -c 'import jasmk'`, the largest imports (cumulative):\n")
    for us, name in sorted(rows, reverse=True)[:8]:
        print(f"    {us / 1000:8.0f} ms  {name}")
    before, saved = run(args, "checkpoint", "before"), run(args, "checkpoint", "save")
    print(f"\nsave_index + load_index of a {args.images}-image index (orbax, tensorstore imported on the first "
          f"save): peak {before['peak']:.0f} MB before, {saved['peak']:.0f} MB after "
          f"(+{saved['peak'] - before['peak']:.0f} MB; brings {', '.join(saved['modules'])})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=148)
    ap.add_argument("--per-image", type=int, default=2900)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--words", type=int, default=4096)
    ap.add_argument("--ma", type=int, default=5, help="multiple assignment of the queries")
    ap.add_argument("--variants", action="store_true", help="also jasmk's end to end under other settings")
    ap.add_argument("--contributors", action="store_true", help="also what import jasmk costs, package by package")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--lib", default="", help=argparse.SUPPRESS)
    ap.add_argument("--centroids", default="", help=argparse.SUPPRESS)
    ap.add_argument("--quantizer", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--jax-cache", default="", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-mb", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--call-rows", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--jit-aggregation", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.centroids = os.path.join(tmp, "centroids.npy")
        run(args, "centroids")
        n = args.images * args.per_image
        print(f"{args.images} images x {args.per_image} x {args.dim}-d float32 = {n * args.dim * 4 / 2**20:.0f} MB of "
              f"descriptors; {args.words} words; query MA {args.ma}; JAX_PLATFORMS=cpu; one process per cell\n")
        rows = []
        base = run(args, "numpy")
        rows.append(("python + numpy", base["peak"], base["peak"]))
        faiss = run(args, "faiss")
        rows.append(("+ import faiss", faiss["peak"], faiss["peak"]))
        jx = run(args, "jax")
        rows.append(("import jax + first jnp op", None, jx["peak"]))
        ia, ij = run(args, "import", "asmk"), run(args, "import", "jasmk")
        rows.append((f"import asmk / import jasmk (jasmk brings: {', '.join(ij['modules'])})", ia["peak"],
                     ij["peak"]))
        da, dj = run(args, "data", "asmk"), run(args, "data", "jasmk")
        rows.append(("import + the data", da["peak"], dj["peak"]))
        ea, ej = run(args, "e2e", "asmk"), run(args, "e2e", "jasmk", extra=("--single",))
        rows.append(("end to end: after the build (MA 1)", ea["build"], ej["build"]))
        rows.append((f"end to end: after the query of all images (MA {args.ma})", ea["query"], ej["query"]))
        rows.append(("end to end: after a second (warm) query", None, ej["query2"]))
        rows.append(("end to end: current RSS at exit (data and index freed)", ea["cur"], ej["cur"]))
        rows.append(("  of which anonymous (RssAnon: heap, arrays)", ea["anon"], ej["anon"]))
        rows.append(("  of which file pages (RssFile: shared libraries, shared between processes)", ea["file"],
                     ej["file"]))
        print("| step | asmk peak MB | jasmk peak MB | ratio |")
        print("|---|---|---|---|")
        for name, a, j in rows:
            print(f"| {name} | {'' if a is None else f'{a:.0f}'} | {j:.0f} | {ratio(a, j) if a else ''} |")
        print(f"\nseconds: asmk build {ea['build_s']:.1f}, query {ea['query_s']:.1f}; jasmk build "
              f"{ej['build_s']:.1f}, query {ej['query_s']:.1f} (warm {ej['query2_s']:.1f}); jasmk XLA compilations: "
              f"{ej['build_compiles']} in the build, {ej['compiles']} in all ({ej['compile_s']:.1f} s), "
              f"{ej['compiles2']} in the warm query; numba loaded: {ej['numba']}")

        print(f"\nthen one image at a time (jasmk, same process; MA {args.ma}):\n")
        print("| call | seconds | XLA compilations | peak MB after |")
        print("|---|---|---|---|")
        for name, sec, comp, peak in ej["single"]:
            print(f"| {name} | {sec:.3f} | {comp} | {peak:.0f} |")

        if args.variants:
            cache = os.path.join(tmp, "xla-cache")
            variants = [
                ("default", {}, ()),
                ("MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"}, ()),
                ("one XLA CPU thread (--xla_cpu_multi_thread_eigen=false "
                 "intra_op_parallelism_threads=1)",
                 {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}, ()),
                ("ASMK* aggregation jitted, as on a GPU (aggregate.host_serves false)", {},
                 ("--jit-aggregation",)),
                ("numba kernel cache cold (compiled in this process; JASMK_CACHE_DIR empty)",
                 {"JASMK_CACHE_DIR": os.path.join(tmp, "jasmk-cache")}, ()),
                ("ASMK* aggregation jitted with 16k staging rows (aggregate._CALL_ROWS, default 128k)", {},
                 ("--jit-aggregation", "--call-rows", "16384")),
                ("quantizer='jax', CHUNK_BYTES 64 MiB (default)", {}, ("--quantizer", "jax")),
                ("quantizer='jax', CHUNK_BYTES 8 MiB", {}, ("--quantizer", "jax", "--chunk-mb", "8")),
            ]
            print("\njasmk end to end under other settings (peak MB after build / after query / after the warm "
                  "query; XLA compilations; seconds build / query / warm query):\n")
            print("| setting | build | query | warm query | compilations | s build / query / warm |")
            print("|---|---|---|---|---|---|")

            def row(name, r):
                print(f"| {name} | {r['build']:.0f} | {r['query']:.0f} | {r['query2']:.0f} | {r['compiles']} | "
                      f"{r['build_s']:.1f} / {r['query_s']:.1f} / {r['query2_s']:.1f} |")

            for name, env, extra in variants:
                row(name, ej if name == "default" else run(args, "e2e", "jasmk", env, extra))
            run(args, "e2e", "jasmk", extra=("--jax-cache", cache, "--single"))  # fills the cache
            cached = run(args, "e2e", "jasmk", extra=("--jax-cache", cache, "--single"))
            row("persistent XLA compilation cache, 2nd process (jax_compilation_cache_dir)", cached)
            print("\nthe single-image calls in that 2nd process: " + "; ".join(
                f"{name}: {sec:.3f} s, {comp} compiled" for name, sec, comp, _ in cached["single"]))
        if args.contributors:
            contributors(args)


if __name__ == "__main__":
    main()
