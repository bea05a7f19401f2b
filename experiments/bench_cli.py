"""Cold and warm ``jasmk query`` from the command line: 20 query images against a 200-image index, and where the
time goes.

Each run is a fresh process, as a user's shell runs it. "cold": empty user caches (``JASMK_CACHE_DIR`` for the
compiled CPU kernel, ``JAX_COMPILATION_CACHE_DIR`` for XLA's programs), as on a new machine or after an upgrade;
"warm": the same command again, the caches filled by the cold run. The parts are measured in their own fresh
processes with the same caches: ``import jasmk`` (the CLI imports it all), the CPU kernel's first call (compiled
or loaded from the cache), and a query with XLA's compile time summed from JAX's monitoring events.

Usage: python experiments/bench_cli.py [--repeat 3]
Prints a table of medians in seconds.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PARTS = r"""
import sys, time
t0 = time.perf_counter()
import jax, numpy as np
import jasmk, jasmk.cli
t1 = time.perf_counter()
from jasmk.core import cpu_kernel
ok = cpu_kernel.available()
rng = np.random.default_rng(0)  # a tiny ASMK* query, words given: the CPU kernels' first calls and nothing else
c = rng.standard_normal((16, 32)).astype(np.float32)
tiny = jasmk.build_index(c[:8], np.arange(8), codebook=c, word_ids=np.arange(8)[:, None])
jasmk.query(tiny, c[:4], np.zeros(4), word_ids=np.arange(4)[:, None], multiple_assignment=1)
t2 = time.perf_counter()
compile_s = []
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **k: compile_s.append(d) if e == "/jax/core/compile/backend_compile_duration" else None)
jasmk.cli._persistent_compilation_cache()
index = jasmk.load_index(sys.argv[1])
q = np.load(sys.argv[2])
t3 = time.perf_counter()
jasmk.query(index, q["feats"], q["ids"])
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t4 - t3, sum(compile_s), ok)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="cold/warm pairs to take the median of")
    args = ap.parse_args(argv)
    import numpy as np

    work = tempfile.mkdtemp(prefix="jasmk-bench-cli-")
    try:
        rng = np.random.default_rng(0)
        scenes = rng.standard_normal((50, 400, 128)).astype(np.float32)
        db = np.concatenate([scenes[i % 50, rng.choice(400, 200, replace=False)] for i in range(200)])
        ids = np.repeat(np.arange(200), 200)
        np.savez(os.path.join(work, "db.npz"), feats=db, ids=ids)
        q = np.concatenate([scenes[i, rng.choice(400, 200, replace=False)] for i in range(20)])
        np.savez(os.path.join(work, "q.npz"), feats=q + 0.1 * rng.standard_normal(q.shape).astype(np.float32),
                 ids=np.repeat(np.arange(20), 200))
        jasmk = [sys.executable, "-m", "jasmk.cli", "--quiet"]
        setup_env = dict(os.environ, JASMK_CACHE_DIR=os.path.join(work, "setup-cache"),
                         JAX_COMPILATION_CACHE_DIR=os.path.join(work, "setup-xla"))
        subprocess.run(jasmk + ["codebook", os.path.join(work, "db.npz"), "--size", "1024", "--out",
                                os.path.join(work, "cb")], check=True, env=setup_env)
        subprocess.run(jasmk + ["index", os.path.join(work, "db.npz"), "--codebook", os.path.join(work, "cb"),
                                "--out", os.path.join(work, "idx")], check=True, env=setup_env)
        rows = {k: [] for k in ("cold", "warm", "import", "kernel cold", "kernel warm", "query cold", "xla cold",
                                "query warm", "xla warm")}
        for r in range(args.repeat):
            env = dict(os.environ, JASMK_CACHE_DIR=os.path.join(work, f"cache{r}"),
                       JAX_COMPILATION_CACHE_DIR=os.path.join(work, f"xla{r}"))
            cmd = jasmk + ["query", os.path.join(work, "idx"), os.path.join(work, "q.npz"), "--topk", "10",
                           "--out", os.path.join(work, f"res{r}.npz")]
            for kind in ("cold", "warm"):
                t = time.perf_counter()
                subprocess.run(cmd, check=True, env=env)
                rows[kind].append(time.perf_counter() - t)
            # the parts, in fresh processes with fresh caches (cold), then again (warm)
            penv = dict(env, JASMK_CACHE_DIR=os.path.join(work, f"pcache{r}"),
                        JAX_COMPILATION_CACHE_DIR=os.path.join(work, f"pxla{r}"))
            for kind in ("cold", "warm"):
                out = subprocess.run([sys.executable, "-c", PARTS, os.path.join(work, "idx"),
                                      os.path.join(work, "q.npz")], check=True, env=penv, capture_output=True,
                                     text=True).stdout.split()
                if kind == "cold":
                    rows["import"].append(float(out[0]))
                rows[f"kernel {kind}"].append(float(out[1]))
                rows[f"query {kind}"].append(float(out[2]))
                rows[f"xla {kind}"].append(float(out[3]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# bench_cli: jasmk query, 20 query images x 200 descriptors (128-d) against 200 images, 1024 words; "
          f"median of {args.repeat}, seconds")
    print("| step | seconds |")
    print("| --- | --- |")
    for name, label in (("cold", "`jasmk query`, cold caches (whole process)"),
                        ("warm", "`jasmk query`, warm caches (whole process)"),
                        ("import", "import jasmk (+ jax, numpy)"),
                        ("kernel cold", "CPU kernels: compile (cold)"), ("kernel warm", "CPU kernels: load (warm)"),
                        ("query cold", "query call (cold)"), ("xla cold", "  of which XLA compiles (cold)"),
                        ("query warm", "query call (warm)"), ("xla warm", "  of which XLA compiles (warm)")):
        print(f"| {label} | {statistics.median(rows[name]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
