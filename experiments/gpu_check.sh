#!/usr/bin/env bash
# The GPU checks in one command, sized for a 15-minute device lease (at most 10 minutes: the timeouts add up to 600 s):
# the tests marked gpu (DLPack into the SLAM database, the compile-free reserved loop, parity), then the head and
# SLAM-loop benchmarks on the GPU, and the jitted ASMK* aggregation on the GPU against the host kernel (where
# aggregate.COMPILED_HOST_PAIRS should stop on a GPU). Run from the repository root on a machine
# with JAX (CUDA), flax, optax, orbax, torch and pytest; faiss-cpu and asmk are installed from wheels/ when they
# are not importable (carry a folder of wheels there: pip download faiss-cpu -d wheels/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import faiss" 2>/dev/null || python3 -m pip install -q --no-index --find-links wheels faiss-cpu
python3 -c "import asmk" 2>/dev/null || python3 -m pip install -q --no-index --no-build-isolation --find-links wheels asmk
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 300 python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py
timeout 120 python3 experiments/bench_head.py --device cuda --repeat 20
timeout 120 python3 experiments/bench_slam.py --sizes 200 2000 --words 1024 --steps 20 --threads 16
timeout 60 python3 experiments/bench_aggregate.py --sizes 10x2900x4096x5 148x2900x4096x5 1000x1000x65536x1
