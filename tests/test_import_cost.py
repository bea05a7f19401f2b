"""``import jasmk`` costs what JAX costs and no more: the heavy packages it uses only for some calls (faiss for
k-means and the faiss quantizer, numba for the CPU kernel, orbax and tensorstore for checkpoints, flax and optax
for the head, torch, h5py, matplotlib...) are imported on first use, and no JAX backend starts (its client and
thread pools are about 50 MB of the process). experiments/bench_memory.py measures what each of them costs; this
test keeps the saving from regressing silently."""

import json
import os
import subprocess
import sys

# imported on use only (python + numpy 29 MB, jax +131 MB; numba +64, orbax + tensorstore +28 to +36, torch +191)
DEFERRED = ("faiss", "numba", "llvmlite", "scipy", "flax", "optax", "orbax", "tensorstore", "torch", "h5py", "yaml",
            "matplotlib", "cv2", "PIL", "asmk")

SCRIPT = """
import json, sys
import jasmk
from jasmk.core import runtime
names = (jasmk.save_index, jasmk.load_index, jasmk.save_codebook, jasmk.load_codebook, jasmk.train_codebook,
         jasmk.quantize, jasmk.build_index, jasmk.query)  # reaching the public names imports nothing either
print(json.dumps({"loaded": sorted({m.split(".")[0] for m in sys.modules}), "backend": runtime.backend_started()}))
"""


def test_import_jasmk_imports_no_heavy_optional_package_and_starts_no_backend():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(set(DEFERRED) & set(got["loaded"])) == []
    assert got["backend"] is False
    assert "jax" in got["loaded"]  # the engine's one framework (sanity: the script ran jasmk)
