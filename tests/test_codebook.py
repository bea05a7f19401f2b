"""Quantizers: the JAX search against faiss (exact up to stated near-ties), full float32 precision asserted from
the jaxpr, the approximate HNSW option, asmk's gpu_id in the compat facade, and JAX starting only when needed."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jasmk
from jasmk import compat
from jasmk.core import codebook as cb_mod
from jasmk.head import whiten

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _dots(jaxpr):
    """Every dot_general equation in ``jaxpr``, nested jaxprs (map, jit, cond, scan) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for v in eqn.params.values():
            subs = v if isinstance(v, (list, tuple)) else [v]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_dots(inner))
    return found


def _highest(eqn) -> bool:
    prec = eqn.params.get("precision")
    if prec is None:
        return False
    precs = prec if isinstance(prec, tuple) else (prec, prec)
    return all(p == jax.lax.Precision.HIGHEST for p in precs)


def test_quantizer_and_whitening_matmuls_run_at_full_precision():
    c = jnp.ones((16, 8), jnp.float32)
    x = jnp.ones((10, 8), jnp.float32)
    jp = jax.make_jaxpr(lambda c, x: cb_mod.quantize_jax(c, x, multiple_assignment=2, chunk_size=4))(c, x)
    dots = _dots(jp.jaxpr)
    assert dots and all(_highest(e) for e in dots)
    jp = jax.make_jaxpr(whiten.whiten)(x, jnp.zeros((1, 8)), jnp.eye(8))
    dots = _dots(jp.jaxpr)
    assert dots and all(_highest(e) for e in dots)
    # the checker itself: a default-precision dot is caught
    dots = _dots(jax.make_jaxpr(lambda a, b: a @ b.T)(x, c).jaxpr)
    assert dots and not any(_highest(e) for e in dots)


def _sq_dist64(x, c):
    x = x.astype(np.float64)
    c = c.astype(np.float64)
    scale = (x * x).sum(1)[:, None] + (c * c).sum(1)[None, :]
    return scale - 2 * x @ c.T, scale


@pytest.mark.parametrize("k,d,ma", [(64, 16, 1), (300, 32, 5), (1024, 128, 3)])
def test_jax_quantizer_gives_faiss_words_up_to_near_ties(k, d, ma):
    rng = np.random.default_rng(k)
    cent = rng.standard_normal((k, d)).astype(np.float32)
    # descriptors near centroids (realistic) plus some far ones
    x = (cent[rng.integers(0, k, 700)] + 0.3 * rng.standard_normal((700, d))).astype(np.float32)
    x = np.concatenate([x, rng.standard_normal((77, d)).astype(np.float32) * 3])
    cb = jasmk.Codebook.from_centroids(cent)
    ref = jasmk.quantize(cb, x, multiple_assignment=ma, method="faiss")
    got = jasmk.quantize(cb, x, multiple_assignment=ma, method="jax", chunk_size=128)
    assert got.shape == ref.shape == (777, ma) and got.dtype == np.int32
    dist, scale = _sq_dist64(x, cent)
    rows, cols = np.nonzero(got != ref)
    # every disagreement is a near-tie: the words' exact distances differ by less than TIE_EPS of the terms
    gap = np.abs(dist[rows, got[rows, cols]] - dist[rows, ref[rows, cols]])
    assert np.all(gap <= cb_mod.TIE_EPS * np.maximum(scale[rows, got[rows, cols]], scale[rows, ref[rows, cols]]))
    assert len(rows) <= 0.01 * got.size
    # both return the set of the MA nearest (exact float64) words, up to near-ties at the boundary
    kth = np.sort(dist, axis=1)[:, ma - 1]
    i = np.arange(len(x))[:, None]
    assert np.all(dist[i, got] <= kth[:, None] + cb_mod.TIE_EPS * scale[i, got])


def test_jax_quantizer_exact_ties_go_to_the_lower_word():
    cent = np.array([[1, 0], [0, 1], [1, 0], [-1, 0]], np.float32)
    x = np.array([[1, 0], [0.5, 0.5]], np.float32)
    got = jasmk.quantize(jasmk.Codebook.from_centroids(cent), x, multiple_assignment=2, method="jax")
    np.testing.assert_array_equal(got[0], [0, 2])
    np.testing.assert_array_equal(got[1, 0], 0)  # 0 and 1 tie (and 2): the lowest id first


def test_jax_quantizer_reuses_compiled_code_for_varying_sizes():
    rng = np.random.default_rng(0)
    cb = jasmk.Codebook.from_centroids(rng.standard_normal((50, 8)).astype(np.float32))
    jasmk.quantize(cb, rng.standard_normal((200, 8)).astype(np.float32), method="jax", multiple_assignment=2)
    before = cb_mod.quantize_jax._cache_size()
    for n in (201, 205, 210, 215, 220):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        np.testing.assert_array_equal(jasmk.quantize(cb, x, method="jax", multiple_assignment=2)[:, 0],
                                      jasmk.quantize(cb, x, method="faiss", multiple_assignment=2)[:, 0])
    assert cb_mod.quantize_jax._cache_size() == before


def test_auto_quantizer_on_cpu_is_faiss_and_gpu_number_without_gpu_falls_back():
    rng = np.random.default_rng(1)
    cb = jasmk.Codebook.from_centroids(rng.standard_normal((40, 8)).astype(np.float32))
    x = rng.standard_normal((300, 8)).astype(np.float32)
    ref = jasmk.quantize(cb, x, multiple_assignment=3, method="faiss")
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=3), ref)
        np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=3, device=0), ref)
    for bad in [dict(method="kmeans"), dict(method="jax", chunk_size=0), dict(method="hnsw", ef_search=0),
                dict(method="auto", device="cuda:0")]:
        with pytest.raises(ValueError):
            jasmk.quantize(cb, x, **bad)


def test_hnsw_quantizer_is_close_to_exact_and_exact_with_a_wide_search():
    rng = np.random.default_rng(2)
    k, d = 2048, 32
    cent = rng.standard_normal((k, d)).astype(np.float32)
    x = (cent[rng.integers(0, k, 3000)] + 0.5 * rng.standard_normal((3000, d))).astype(np.float32)
    cb = jasmk.Codebook.from_centroids(cent)
    exact = jasmk.quantize(cb, x, multiple_assignment=1, method="faiss")[:, 0]
    fast = jasmk.quantize(cb, x, multiple_assignment=1, method="hnsw", ef_search=16)[:, 0]
    wide = jasmk.quantize(cb, x, multiple_assignment=1, method="hnsw", ef_search=1024)[:, 0]
    agree_fast, agree_wide = np.mean(fast == exact), np.mean(wide == exact)
    assert 0.8 <= agree_fast <= agree_wide
    assert agree_wide >= 0.995
    # the graph is built once per codebook array
    assert cb_mod.hnsw_index(cb.centroids) is cb_mod.hnsw_index(cb.centroids)
    # a miss is a real word, and never nearer than the exact one
    dist, _ = _sq_dist64(x, cent)
    i = np.arange(len(x))
    assert np.all(dist[i, fast] >= dist[i, exact] - 1e-4)


def _params(gpu_id="absent"):
    p = {"train_codebook": {"codebook": {"size": 32}},
         "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                       "quantize": {"multiple_assignment": 1}, "aggregate": {}},
         "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {},
                       "search": {"topk": None}, "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}
    if gpu_id != "absent":
        p["index"] = {"gpu_id": gpu_id}
    return p


def test_compat_gpu_id_quantizes_on_that_device_or_the_cpu(small_data):
    feats, ids = small_data["feats"], small_data["ids"]
    outs = []
    for gpu in (None, 0):
        m = compat.ASMKMethod.initialize_untrained(_params(gpu)).train_codebook(small_data["train"])
        ivf = m.build_ivf(feats, ids)
        outs.append(ivf.query_ivf(feats, ids))
    # on a machine without a JAX GPU, gpu_id 0 falls back to faiss on the CPU: the same results
    if jax.default_backend() == "cpu":
        for a, b in zip(outs[0][1:], outs[1][1:]):
            np.testing.assert_array_equal(a, b)
    for bad in ("0", -1, True, 1.5):
        with pytest.raises(ValueError, match="gpu_id"):
            compat.ASMKMethod.initialize_untrained(_params(bad))
    with pytest.raises(ValueError, match="unknown index"):
        compat.ASMKMethod.initialize_untrained({**_params(), "index": {"gpu": 0}})


@pytest.fixture()
def small_data():
    rng = np.random.default_rng(5)
    d = 16
    protos = rng.standard_normal((60, d)).astype(np.float32)
    ids = np.repeat(np.arange(12), 25)
    feats = (protos[rng.integers(0, 60, len(ids))] + 0.2 * rng.standard_normal((len(ids), d))).astype(np.float32)
    train = (protos[rng.integers(0, 60, 3000)] + 0.2 * rng.standard_normal((3000, d))).astype(np.float32)
    return {"feats": feats, "ids": ids, "train": train}


LAZY = textwrap.dedent(r"""
    import os, sys, warnings, pickle, numpy as np
    sys.path.insert(0, {root!r})
    import jasmk, jasmk.compat, jasmk.core.runtime as rt
    params = {params!r}
    path = os.path.join({tmp!r}, "cb.pkl")
    cent = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    with open(path, "wb") as f:
        pickle.dump({{"type": "Codebook", "params": {{"size": 32}}, "state": {{"centroids": cent}}}}, f)
    m = jasmk.compat.ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=path)
    cb = jasmk.Codebook.from_centroids(cent)
    assert not rt.backend_started(), "JAX started"
    print("PREALLOCATE", os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
    warnings.simplefilter("always")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print("OK", m.codebook.size)
""")


@pytest.mark.slow
@pytest.mark.parametrize("user_setting", [None, "true"])
def test_compat_and_codebook_load_start_no_jax_and_fork_cleanly(tmp_path, user_setting):
    code = LAZY.format(root=ROOT, params=_params(0), tmp=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT")}
    if user_setting:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = user_setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK 32" in out.stdout
    assert "fork" not in out.stderr.lower(), out.stderr
    assert f"PREALLOCATE {user_setting or 'false'}" in out.stdout


NO_FAISS = textwrap.dedent(r"""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "faiss" or name.startswith("faiss."):
                raise ModuleNotFoundError("No module named 'faiss'")
    sys.meta_path.insert(0, Block())
    sys.path.insert(0, {root!r})
    import numpy as np, jasmk
    from jasmk.core import codebook
    assert not codebook.have_faiss()
    rng = np.random.default_rng(0)
    cent = rng.standard_normal((40, 8)).astype(np.float32)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    words = jasmk.quantize(jasmk.Codebook.from_centroids(cent), x, multiple_assignment=2)
    d = ((x[:, None, :] - cent[None]) ** 2).sum(-1)
    assert (words[:, 0] == d.argmin(1)).all()
    cb = jasmk.train_codebook(x, size=4)  # JAX k-means
    assert cb.centroids.shape == (4, 8)
    try:
        jasmk.train_codebook(x, size=4, method="faiss")
    except ImportError as e:
        print("IMPORTERROR", e)
""")


@pytest.mark.slow
def test_without_faiss_quantization_and_training_use_jax_and_faiss_says_what_to_install():
    out = subprocess.run([sys.executable, "-c", NO_FAISS.format(root=ROOT)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR" in out.stdout and "pip install faiss-cpu" in out.stdout


@pytest.mark.parametrize("max_pairs", [None, 5000])
def test_real_valued_query_program_has_no_reduced_precision_dot(max_pairs):
    """The whole jitted query (quantize, aggregate, score) of real-valued ASMK: every dot at HIGHEST."""
    from jasmk import api

    rng = np.random.default_rng(0)
    f = rng.standard_normal((300, 16)).astype(np.float32)
    index = jasmk.build_index(f, np.repeat(np.arange(10), 30),
                              codebook=rng.standard_normal((32, 16)).astype(np.float32), binary=False)
    jp = jax.make_jaxpr(lambda i, a, b: api._query_padded(i, a, b, topk=3, max_pairs=max_pairs))(
        index, f[:60].reshape(2, 30, 16), np.ones((2, 30), bool))
    dots = _dots(jp.jaxpr)
    assert dots and all(_highest(e) for e in dots)


def test_jax_kmeans_fallback_is_a_real_kmeans():
    """Lloyd's fixed point: every centroid is the mean of the points nearest to it, and the objective is close
    to faiss's on the same data."""
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((20, 8)).astype(np.float32) * 4
    x = (centers[rng.integers(0, 20, 4000)] + rng.standard_normal((4000, 8))).astype(np.float32)
    cb = jasmk.train_codebook(x, size=20, method="jax", niter=30)
    c = np.asarray(cb.centroids)
    d = ((x[:, None] - c[None]) ** 2).sum(-1)
    w = d.argmin(1)
    for j in range(20):
        if np.any(w == j):
            np.testing.assert_allclose(c[j], x[w == j].mean(0), atol=2e-3)
    # a numpy re-derivation of the same recipe (seeded sample init, Lloyd steps) lands on the same centroids
    r = np.random.default_rng(1234)
    ref = x[r.choice(len(x), 20, replace=False)].astype(np.float64)
    for _ in range(30):
        a = ((x[:, None].astype(np.float64) - ref[None]) ** 2).sum(-1).argmin(1)
        ref = np.stack([x[a == j].mean(0) if np.any(a == j) else ref[j] for j in range(20)])
    np.testing.assert_allclose(c, ref, atol=1e-3)
    obj = lambda c: ((x[:, None] - c[None]) ** 2).sum(-1).min(1).mean()  # noqa: E731
    assert obj(c) < obj(x[np.random.default_rng(1234).choice(len(x), 20, replace=False)])
    with pytest.raises(ValueError, match="k-means method"):
        jasmk.train_codebook(x, size=4, method="sklearn")


def test_faiss_in_use_is_said_once_at_info(monkeypatch):
    import logging

    import faiss

    monkeypatch.setattr(cb_mod, "_faiss_said", False)
    info = cb_mod.faiss_info()
    assert faiss.__version__ in info and os.path.dirname(faiss.__file__) in info
    assert info.startswith("faiss-gpu" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("jasmk.core.codebook")
    handler = Keep(level=logging.INFO)
    old_level = logger.level
    logger.setLevel(logging.INFO)  # setLevel (not .level =) also clears the loggers' isEnabledFor caches
    logger.addHandler(handler)
    try:
        cb = jasmk.Codebook.from_centroids(np.eye(4, dtype=np.float32))
        for _ in range(2):
            jasmk.quantize(cb, np.eye(4, dtype=np.float32), method="faiss")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [m for m in records if "using faiss" in m] == [f"using {info}"]


def test_kmeans_progress_bar_gives_the_same_centroids_bit_for_bit(capsys):
    """One faiss iteration per call, each from the previous centroids, equals one call of niter iterations:
    on data that makes faiss subsample (n > 256 k) and split empty clusters."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40000, 16)).astype(np.float32)
    x[:20000] *= 0.01
    one = np.asarray(jasmk.train_codebook(x, size=128, niter=6, method="faiss").centroids)
    bar = np.asarray(jasmk.train_codebook(x, size=128, niter=6, method="faiss", progress=True).centroids)
    np.testing.assert_array_equal(bar, one)
    assert "k-means, 128 words" in capsys.readouterr().err
    # and it is not the trivial case: fewer iterations give other centroids
    assert not np.array_equal(np.asarray(jasmk.train_codebook(x, size=128, niter=5, method="faiss").centroids), one)
