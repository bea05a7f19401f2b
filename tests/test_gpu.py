"""Checks that need a GPU (marked ``gpu``; skipped where JAX has none). Run them on a GPU machine with
``python -m pytest -m gpu`` (the ``cuda`` extra installed, JAX_PLATFORMS unset)."""

import jax
import numpy as np
import pytest
from helpers import asmk_params, asmk_with_centroids, assert_same_ranking, clustered_data, count_compilations

import jasmk
from jasmk import compat
from jasmk.core import codebook as cb_mod


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
    res = jasmk.query(index, feats, ids, quantizer="faiss", kernel=engine)
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


def test_gpu_head_whitens_in_float64_at_mast3r_size():
    """MASt3R's head at its sizes (768 tokens of 1024 channels, a 1024_1024 projector, whitening conditioned ~1e7)
    on the GPU: the whitened features equal the float64 formula, and the time per frame is reported."""
    import time

    import jax.numpy as jnp

    from jasmk import head

    rng = np.random.default_rng(0)
    c, n = 1024, 768
    q, _ = np.linalg.qr(rng.standard_normal((c, c)))
    m, p = rng.standard_normal((1, c)), q * np.logspace(0, 7, c)[None, :] / np.sqrt(c)
    config = head.HeadConfig(backbone_dim=c, hdims=(), postwhiten=True, nfeat=300)
    variables = head.device_variables(head.variables_from_state_dict({"postwhiten.m": m, "postwhiten.p": p}, config),
                                      _gpus()[0])
    assert variables["whitening"]["postwhiten"]["p"].dtype == jnp.float64
    x = rng.standard_normal((1, n, c)).astype(np.float32)
    model = head.RetrievalHead(config)
    feat = jax.jit(lambda v, a: model.apply(v, a, method=lambda mdl, y: mdl.features_and_attention(y)[0]))
    xg = jax.device_put(x, _gpus()[0])
    got = np.asarray(feat(variables, xg))[0]
    ref = ((x[0].astype(np.float64) - m) @ p).astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    fwd = jax.jit(lambda v, a: model.apply(v, a, method=head.RetrievalHead.forward_local))
    jax.block_until_ready(fwd(variables, xg))
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(variables, xg))
        times.append(time.perf_counter() - t0)
    print(f"\nhead on {jax.devices()[0].device_kind}: {np.median(times) * 1e3:.2f} ms per 512x384 frame "
          "(768 x 1024 tokens, float64 post-whitening, 300 features)")


def test_slam_database_takes_cuda_tensors_through_dlpack_and_keeps_nothing_of_them(tmp_path):
    """A CUDA torch tensor reaches the head through DLPack (no host copy), and overwriting it after ``update``
    returns changes nothing (the head's result was computed before the return)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    import types

    from helpers import make_mast3r_checkpoint

    from jasmk import mast3r
    from jasmk.storage import asmk_format

    ckpt = str(tmp_path / "gpu_retrieval_trainingfree.pth")
    make_mast3r_checkpoint(ckpt, c=64, hdims="", residual=False, prewhiten=None, postwhiten=-1, nfeat=50,
                           nclusters=64)
    rng = np.random.default_rng(0)
    asmk_format.write_pickle(str(tmp_path / "gpu_retrieval_codebook.pkl"), {
        "type": "Codebook", "params": {"size": 64},
        "state": {"centroids": rng.standard_normal((64, 64)).astype(np.float32)}})
    frames = [torch.randn((1, 200, 64), device="cuda") for _ in range(30)]
    ref_db = mast3r.RetrievalDatabase(ckpt, device="cuda")
    ref = [ref_db.update(types.SimpleNamespace(feat=f.cpu()), True, k=3) for f in frames]
    db = mast3r.RetrievalDatabase(ckpt, device="cuda")
    got = []
    for f in frames:
        buf = f.clone()
        got.append(db.update(types.SimpleNamespace(feat=buf), True, k=3))
        buf.fill_(1e6)  # MASt3R-SLAM reuses the buffer
    assert got == ref
    x = mast3r.features_to_jax(frames[0])
    assert isinstance(x, jax.Array) and x.devices().pop().platform == "gpu"


def test_a_reserved_slam_loop_compiles_nothing_on_the_gpu():
    """The add-then-query loop on the GPU's XLA kernels: no compilation after the first query."""
    rng = np.random.default_rng(1)
    cb = jasmk.Codebook.from_centroids(rng.standard_normal((1024, 128)).astype(np.float32))
    index = jasmk.reserve(jasmk.empty_index(cb), images=400, postings=400 * 128)
    with count_compilations() as compiles:
        for i in range(300):
            f = rng.standard_normal((128, 128)).astype(np.float32)
            ids = np.full(128, i)
            if index.n_images:
                jasmk.query(index, f, ids, topk=3)
            index = jasmk.add_images(index, f, ids)
            if i == 1:
                compiles.clear()
    assert compiles == [], f"{len(compiles)} compilations on the GPU"
