"""Checks that need a GPU (marked ``gpu``; skipped where JAX has none). Run them on a GPU machine with
``python -m pytest -m gpu`` (the ``cuda`` extra installed, JAX_PLATFORMS unset)."""

import jax
import numpy as np
import pytest

import jasmk
from jasmk import codebook as cb_mod
from jasmk import compat

from conftest import asmk_params, asmk_with_centroids, assert_same_ranking, clustered_data


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpus(), reason="JAX sees no GPU")]


def test_gpu_quantizer_matches_faiss_at_mast3r_size():
    rng = np.random.default_rng(0)
    k, d = 8192, 1024
    cent = rng.standard_normal((k, d)).astype(np.float32)
    x = (cent[rng.integers(0, k, 4000)] + 0.5 * rng.standard_normal((4000, d))).astype(np.float32)
    cb = jasmk.Codebook.from_centroids(cent)
    ref = jasmk.quantize(cb, x, multiple_assignment=5, method="faiss")
    got = jasmk.quantize(cb, x, multiple_assignment=5, method="auto", device=0)
    x64, c64 = x.astype(np.float64), cent.astype(np.float64)
    rows, cols = np.nonzero(got != ref)
    dist = lambda r, w: ((x64[r] - c64[w]) ** 2).sum(-1)  # noqa: E731
    scale = (x64[rows] ** 2).sum(-1) + (c64[ref[rows, cols]] ** 2).sum(-1)
    assert np.all(np.abs(dist(rows, got[rows, cols]) - dist(rows, ref[rows, cols])) <= cb_mod.TIE_EPS * scale)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("engine", ["sparse-xla", "dense"])
def test_gpu_scores_match_asmk(binary, engine):
    rng = np.random.default_rng(3)
    feats, ids = clustered_data(rng, n_images=40, per_image=50, dim=64)
    cb = jasmk.train_codebook(feats, size=128)
    cent = np.asarray(cb.centroids)
    params = asmk_params(size=128, binary=binary)
    ref = asmk_with_centroids(params, cent).build_ivf(feats, ids)
    _, _, rranks, rscores = ref.query_ivf(feats, ids)
    index = jasmk.build_index(feats, ids, codebook=cb, binary=binary, quantizer="faiss")
    res = jasmk.query(index, feats, ids, quantizer="faiss", engine=engine)
    assert jax.devices()[0].platform == "gpu"
    # full float32 precision: TF32 would be off by ~1e-3 for real-valued ASMK
    assert_same_ranking(res.ranks, res.scores, rranks, rscores, atol=2e-5)


def test_compat_gpu_id_on_the_gpu_gives_the_cpu_results():
    rng = np.random.default_rng(4)
    feats, ids = clustered_data(rng, n_images=30, per_image=40, dim=32)
    train = clustered_data(rng, n_images=60, per_image=40, dim=32)[0]
    out = []
    for gpu in (None, 0):
        p = asmk_params(size=64)
        p["index"] = {"gpu_id": gpu}
        m = compat.ASMKMethod.initialize_untrained(p).train_codebook(train).build_ivf(feats, ids)
        out.append(m.query_ivf(feats, ids))
    assert_same_ranking(out[1][2], out[1][3], out[0][2], out[0][3], atol=1e-6)
