"""The compiled CPU kernel is compiled once per machine: a later process loads it from the user cache folder,
and nothing is written into the package's folder."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

import jasmk  # noqa: E402

SCRIPT = textwrap.dedent("""
    import numpy as np
    import jasmk
    from jasmk.core import cpu_kernel
    rng = np.random.default_rng(0)
    f = rng.standard_normal((600, 16)).astype(np.float32)
    ids = np.repeat(np.arange(20), 30)
    index = jasmk.build_index(f, ids, codebook=f[:32])  # small: aggregated by the compiled kernel too
    jasmk.query(index, f, ids, topk=3, kernel="sparse-cpu")
    jasmk.query(index, f, ids, topk=3, kernel="dense")
    import jax
    print(*cpu_kernel.cache_stats(), jax.config.jax_compilation_cache_dir)
""")


@pytest.mark.slow
def test_a_second_process_loads_the_kernel_from_the_user_cache(tmp_path):
    package = pathlib.Path(jasmk.__file__).parent
    before = {p for p in package.rglob("*") if p.suffix in (".nbi", ".nbc") and "numba_kernel" in p.name}
    env = {**os.environ, "JASMK_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    # the scoring and the aggregation kernels: compiled by the first process, loaded from the cache by the second
    # (and the library never turns on JAX's persistent compilation cache in a user's process: only the CLI does)
    assert runs[0].stdout.split() == ["0", "2", "None"], runs[0].stdout
    assert runs[1].stdout.split() == ["2", "0", "None"], runs[1].stdout
    cached = list((tmp_path / "cache" / "numba").rglob("*.nbi"))
    assert cached, "no kernel index in the user cache folder"
    after = {p for p in package.rglob("*") if p.suffix in (".nbi", ".nbc") and "numba_kernel" in p.name}
    assert after == before  # nothing written into the package folder
