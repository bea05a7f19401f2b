"""Word assignment: a codebook or bare centroids, words that do not depend on the other descriptors of the call
(float32 near-ties settled exactly, for every quantizer), and the rule behind ``quantizer="auto"``."""

import jax
import numpy as np
import pytest

import jasmk
from jasmk import compat
from jasmk.core import codebook as cb_mod

# rows per image: every count from 1 to 64 (faiss loops over the rows below 20 and calls BLAS above, with kernels
# that change with the shape), in a shuffled order
SIZES = np.random.default_rng(3).permutation(np.arange(1, 65))


def near_tie_data(seed, *, dim, anchors, per_anchor, plain=400):
    """``(centroids, descriptors)``: ``per_anchor`` words around each anchor, the first 2 to ``per_anchor`` of them
    equidistant (in the reals) from it and the others 2 % further each, and descriptors at the anchors, exactly or
    moved by float32-scale noise, so that squared distances tie up to float32 rounding at every rank and in bands
    of every width; then ``plain`` ordinary descriptors (no near-tie: the common path)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((anchors, dim)).astype(np.float32)
    u = rng.standard_normal((anchors, per_anchor, dim))
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    tied = rng.integers(2, per_anchor + 1, (anchors, 1))
    radius = rng.uniform(0.5, 2.0, (anchors, 1)) * (1 + 0.02 * np.maximum(0, np.arange(per_anchor) - tied + 1))
    cent = (a[:, None, :] + radius[:, :, None] * u).reshape(-1, dim).astype(np.float32)
    cent = np.ascontiguousarray(cent[rng.permutation(len(cent))])
    n = int(SIZES.sum()) - plain
    noise = rng.choice([0.0, 1e-7, 1e-6, 3e-6], n)[:, None] * rng.standard_normal((n, dim))
    ties = a[rng.integers(0, anchors, n)] + noise
    other = cent[rng.integers(0, len(cent), plain)] + 0.3 * rng.standard_normal((plain, dim))
    x = np.concatenate([ties, other])[rng.permutation(n + plain)]
    return cent, np.ascontiguousarray(x, np.float32)


def sq_dist64(x, cent):
    """``[N, K]`` float64 squared distances (of the float32 values), in row blocks."""
    c = cent.astype(np.float64)[None]
    return np.concatenate([((x[s:s + 64].astype(np.float64)[:, None, :] - c) ** 2).sum(axis=2)
                           for s in range(0, len(x), 64)])


def exact_words(d, ma):
    """The oracle: the ``ma`` words nearest by ``d`` (float64 squared distances ``[N, K]``), ties to the lower id."""
    return np.lexsort((np.broadcast_to(np.arange(d.shape[1]), d.shape), d), axis=-1)[:, :ma]


def near_tie_share(d, x, cent, ma):
    """Share of rows whose float64 distances ``d`` (the MA nearest and the next) are within float32 rounding."""
    d = np.sort(d, axis=1)
    scale = (x.astype(np.float64) ** 2).sum(1) + (cent.astype(np.float64) ** 2).sum(1).max()
    gaps = np.diff(d[:, :ma + 1], axis=1)
    return np.mean(np.any(gaps < 2 * cb_mod.rounding_bound(x.shape[1]) * scale[:, None], axis=1))


CASES = {"d128": (128, 24, 10), "d32": (32, 100, 10)}  # name: (dim, anchors, words per anchor)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    dim, anchors, per = CASES[request.param]
    cent, x = near_tie_data(11, dim=dim, anchors=anchors, per_anchor=per)
    d = sq_dist64(x, cent)
    truth = {ma: (exact_words(d, ma), near_tie_share(d, x, cent, ma)) for ma in (1, 5)}
    return jasmk.Codebook.from_centroids(cent), x, truth


def list_oracle(cb, x, ma, n_probe):
    """The "ivf" quantizer re-derived in float64 from its lists: each row's ``n_probe`` nearest list centres
    (ties to the lower list), then the ``ma`` nearest of their words (ties to the lower word id)."""
    lists = cb_mod.word_lists(cb.centroids)
    probed = exact_words(sq_dist64(x, lists.coarse), n_probe)
    member = np.zeros(cb.size, np.int64)
    member[lists.order] = np.repeat(np.arange(lists.n_lists), np.diff(lists.starts))
    d = sq_dist64(x, cb.centroids)
    d[~np.any(member[None, :, None] == probed[:, None, :], axis=2)] = np.inf
    return exact_words(d, ma)


@pytest.mark.parametrize("ma", [1, 5])
@pytest.mark.parametrize("method", ["faiss", "faiss-widen", "jax", "hnsw", "auto", "auto-hnsw", "ivf", "ivf-words",
                                    "auto-ivf"])
def test_words_do_not_depend_on_the_other_rows(case, method, ma, monkeypatch):
    """One call, one call per image (1 to 64 rows), or shuffled calls of 19 to 21 rows: the same words."""
    cb, x, truth = case
    oracle, share = truth[ma]
    assert share > 0.5  # the data is built to have near-ties everywhere
    if method == "auto-hnsw":  # "auto" where the rule picks HNSW (from 4096 words: here from any size)
        monkeypatch.setattr(cb_mod, "HNSW_MIN_WORDS", 1)
        monkeypatch.setattr(cb_mod, "IVF_MAX_WORDS", 0)
        method = "auto"
    if method in ("ivf", "auto-ivf"):  # lists of 8 words (30 and 125 lists here), 3 of them probed
        monkeypatch.setattr(cb_mod, "IVF_WORDS_PER_LIST", 8)
        monkeypatch.setattr(cb_mod, "IVF_PROBE", 3)
    if method == "auto-ivf":
        monkeypatch.setattr(cb_mod, "IVF_MIN_WORDS", 1)
        method = "auto"
    if method == "ivf-words":  # a list per word, MA of them probed: the coarse distances are the words' own, with
        # near-ties at the last probed list everywhere, and the probed lists are the words
        monkeypatch.setattr(cb_mod, "IVF_WORDS_PER_LIST", 1)
        monkeypatch.setattr(cb_mod, "IVF_PROBE", ma)
        method = "ivf"
        oracle = truth[ma][0]  # exact
    elif method == "ivf" or (method == "auto" and cb_mod.choose_quantizer(cb.size, cb.dim) == "ivf"):
        oracle = list_oracle(cb, x, ma, cb_mod.IVF_PROBE)
    if method == "faiss-widen":  # near-tie rows searched again by faiss, not on the host, however few
        monkeypatch.setattr(cb_mod, "WIDEN_MIN_ROWS", 1)
        method = "faiss"
    approximate = cb_mod.choose_quantizer(cb.size, cb.dim) == "hnsw" if method == "auto" else method == "hnsw"
    cb_mod._lists_cache.clear()  # lists of the size set above
    together = jasmk.quantize(cb, x, multiple_assignment=ma, method=method)
    starts = np.r_[0, np.cumsum(SIZES)[:-1]]
    alone = np.concatenate([jasmk.quantize(cb, x[s:s + n], multiple_assignment=ma, method=method)
                            for s, n in zip(starts, SIZES)])
    np.testing.assert_array_equal(together, alone)
    # any other grouping and order: a shuffle, in calls of 19, 20 and 21 rows (both sides of faiss's BLAS switch)
    perm = np.random.default_rng(ma).permutation(len(x))[:600]
    shuffled = np.concatenate([jasmk.quantize(cb, part, multiple_assignment=ma, method=method)
                               for part in np.split(x[perm], np.cumsum([19, 20, 21] * 10)[:-1])])
    np.testing.assert_array_equal(shuffled, together[perm])
    with monkeypatch.context() as mp:  # a large call is searched in blocks of SEARCH_ROWS rows: the same words
        mp.setattr(cb_mod, "SEARCH_ROWS", 37)
        mp.setattr(cb_mod, "IVF_ROWS", 37)
        np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=ma, method=method), together)
    if not approximate:  # the exact searches (and the list search, exact among its lists' words) give the float64
        # nearest words, ties to the lower id
        np.testing.assert_array_equal(together, oracle)
    elif jax.default_backend() == "cpu":  # HNSW: right where its candidates hold the nearest words
        assert np.mean(np.all(together == oracle, axis=1)) > 0.5


def test_exact_searches_agree_and_settle_exact_ties_to_the_lower_word():
    cent = np.array([[1, 0], [0, 1], [1, 0], [-1, 0], [0, -1]], np.float32)
    x = np.array([[1, 0], [0.5, 0.5], [0, 0]], np.float32)
    for method in ("faiss", "jax", "exact"):
        got = jasmk.quantize(cent, x, multiple_assignment=3, method=method)
        np.testing.assert_array_equal(got, [[0, 2, 1], [0, 1, 2], [0, 1, 2]])


def test_quantize_takes_a_codebook_or_centroids():
    rng = np.random.default_rng(0)
    cent = rng.standard_normal((300, 16)).astype(np.float32)
    x = (cent[rng.integers(0, 300, 500)] + 0.2 * rng.standard_normal((500, 16))).astype(np.float32)
    cb = jasmk.Codebook.from_centroids(cent)
    for method in ("auto", "exact", "faiss", "jax", "hnsw", "ivf"):
        ref = jasmk.quantize(cb, x, multiple_assignment=3, method=method)
        for c in (cent, cent.astype(np.float64), cent.tolist()):
            np.testing.assert_array_equal(jasmk.quantize(c, x, multiple_assignment=3, method=method), ref)
    # the jitted search too
    np.testing.assert_array_equal(jasmk.quantize_jax(cb, x, multiple_assignment=3),
                                  jasmk.quantize_jax(cent, x, multiple_assignment=3))
    with pytest.raises(ValueError, match="dimension"):
        jasmk.quantize(cent[:, :8], x)
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(ValueError, match="n_probe"):
            jasmk.quantize(cb, x, method="ivf", n_probe=bad)
    # a row whose probed lists hold fewer than MA words takes the MA nearest of every word: exact too
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cb_mod, "IVF_WORDS_PER_LIST", 1)
        cb_mod._lists_cache.clear()
        np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=3, method="ivf", n_probe=2),
                                      jasmk.quantize(cb, x, multiple_assignment=3, method="faiss"))
    cb_mod._lists_cache.clear()
    # probing every list is the exact search
    np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=3, method="ivf", n_probe=10**6),
                                  jasmk.quantize(cb, x, multiple_assignment=3, method="faiss"))
    with pytest.raises(ValueError, match="centroids"):
        jasmk.quantize(np.zeros((0, 16), np.float32), x)


def test_choose_quantizer_follows_the_measured_rule():
    def choose(*args, **kwargs):
        return cb_mod.choose_quantizer(*args, **{"faiss_available": True, "kernel_available": True, **kwargs})

    assert (cb_mod.HNSW_MIN_WORDS, cb_mod.HNSW_MAX_DIM) == (4096, 256)
    assert (cb_mod.IVF_MIN_WORDS, cb_mod.IVF_MAX_WORDS) == (4096, 16384)
    assert choose(1024, 128) == "faiss"
    assert choose(4095, 128) == "faiss"
    assert choose(4096, 128) == choose(16384, 256) == "ivf"
    assert choose(16385, 128) == choose(65536, 256) == "hnsw"  # the lists were not measured there
    assert choose(16384, 128, kernel_available=False) == "hnsw"  # no numba kernel: HNSW
    assert choose(16384, 128, kernel_available=False, faiss_available=False) == "jax"  # neither: exact
    assert choose(16384, 128, faiss_available=False) == "ivf"  # the lists need no faiss
    assert choose(65536, 257) == choose(16384, 257) == "faiss"
    assert choose(65536, 1024) == "faiss"  # MASt3R's features: not measured, exact
    assert choose(16384, 128, exact=True) == choose(65536, 128, exact=True) == "faiss"
    assert choose(65536, 128, faiss_available=False) == "jax"  # no faiss: no HNSW either
    assert choose(16384, 128, "gpu") == choose(16384, 128, "tpu") == "jax"


def test_auto_resolves_through_the_rule():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU rule")
    rng = np.random.default_rng(4)
    cb = jasmk.Codebook.from_centroids(rng.standard_normal((4096, 16)).astype(np.float32))
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    lists = jasmk.quantize(cb, x, multiple_assignment=5, method="ivf")
    exact = jasmk.quantize(cb, x, multiple_assignment=5, method="faiss")
    assert np.mean(np.all(lists == exact, axis=1)) < 0.9  # they differ on this data: which one ran shows
    np.testing.assert_array_equal(lists, list_oracle(cb, x, 5, cb_mod.IVF_PROBE))  # and what ran is right
    np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=5), lists)
    hnsw = jasmk.quantize(cb, x, multiple_assignment=5, method="hnsw")
    assert not np.array_equal(hnsw, lists)
    with pytest.MonkeyPatch.context() as mp:  # above the lists' measured sizes: HNSW
        mp.setattr(cb_mod, "IVF_MAX_WORDS", 4095)
        np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=5), hnsw)
    np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=5, method="exact"), exact)
    # a GPU asked for by number (asmk's gpu_id) but absent: the exact CPU search it stands in for
    np.testing.assert_array_equal(jasmk.quantize(cb, x, multiple_assignment=5, device=0), exact)
    # build_index / query take the same quantizer: aggregate_images resolves it through quantize
    ids = np.repeat(np.arange(30), 100)
    got = jasmk.aggregate_images(cb, x, ids, binary=True, multiple_assignment=5)
    ref = jasmk.aggregate_images(cb, x, ids, binary=True, multiple_assignment=5, word_ids=lists)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_compat_never_quantizes_approximately(monkeypatch):
    """asmk's drop-in keeps asmk's exact assignment, gpu_id None or a number, even where "auto" would be HNSW."""
    monkeypatch.setattr(cb_mod, "HNSW_MIN_WORDS", 1)  # "auto" would pick HNSW or the lists for any codebook on
    monkeypatch.setattr(cb_mod, "IVF_MIN_WORDS", 1)  # the CPU

    def no_hnsw(*args, **kwargs):
        raise AssertionError("compat used an approximate quantizer")

    monkeypatch.setattr(cb_mod, "hnsw_index", no_hnsw)
    monkeypatch.setattr(cb_mod, "word_lists", no_hnsw)
    rng = np.random.default_rng(5)
    protos = rng.standard_normal((60, 16)).astype(np.float32)
    ids = np.repeat(np.arange(12), 25)
    feats = (protos[rng.integers(0, 60, len(ids))] + 0.2 * rng.standard_normal((len(ids), 16))).astype(np.float32)
    train = (protos[rng.integers(0, 60, 2000)] + 0.2 * rng.standard_normal((2000, 16))).astype(np.float32)
    params = {"train_codebook": {"codebook": {"size": 32}},
              "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                            "quantize": {"multiple_assignment": 1}, "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {},
                            "search": {"topk": None}, "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}
    for gpu in (None, 0):
        m = compat.ASMKMethod.initialize_untrained({**params, "index": {"gpu_id": gpu}}).train_codebook(train)
        m.build_ivf(feats, ids).query_ivf(feats, ids)
    with pytest.raises(AssertionError, match="approximate"):  # the trap works: "auto" now reaches it
        jasmk.quantize(m.codebook, feats)


def test_the_list_search_holds_openblas_to_one_thread_and_restores_it():
    """The list search's many small products run with OpenBLAS on one thread (its idle threads spinning between
    them halved the speed on two cores); the thread counts come back after the last concurrent user."""
    from jasmk.core import cpu_kernel

    pools = cpu_kernel._openblas_pools()
    if not pools:
        pytest.skip("no OpenBLAS found in /proc/self/maps")
    before = [get() for get, _ in pools]
    for _, put in pools:
        put(2)
    try:
        with cpu_kernel.one_blas_thread():
            assert [get() for get, _ in pools] == [1] * len(pools)
            with cpu_kernel.one_blas_thread():  # nested (the search's own threads, or a caller's)
                assert [get() for get, _ in pools] == [1] * len(pools)
            assert [get() for get, _ in pools] == [1] * len(pools)
        assert [get() for get, _ in pools] == [2] * len(pools)
        with pytest.raises(RuntimeError), cpu_kernel.one_blas_thread():
            raise RuntimeError("restored on errors too")
        assert [get() for get, _ in pools] == [2] * len(pools)
    finally:
        for (_, put), n in zip(pools, before):
            put(n)
