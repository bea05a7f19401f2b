"""Unit checks of the core pieces against numpy re-derivations, and the input errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import asmk_params, assert_same_ranking

import jasmk
from jasmk.core import aggregate as agg_mod
from jasmk.core import cpu_kernel, ivf
from jasmk.core import engine as engine_mod
from jasmk.core import score as score_mod


def numpy_pack(x):
    """Reference packing: bits x > 0, MSB first, 32 per uint32, zero-padded."""
    bits = (x > 0).astype(np.uint8)
    d = bits.shape[1]
    w = -(-d // 32)
    bits = np.pad(bits, ((0, 0), (0, 32 * w - d)))
    by = np.packbits(bits, axis=1).reshape(len(x), w, 4).astype(np.uint64)
    return ((by[..., 0] << 24) | (by[..., 1] << 16) | (by[..., 2] << 8) | by[..., 3]).astype(np.uint32)


@pytest.mark.parametrize("dim", [1, 5, 31, 32, 33, 64, 100, 128])
def test_binarize_and_pack_matches_numpy(dim):
    x = np.random.default_rng(dim).standard_normal((7, dim)).astype(np.float32)
    x[0, 0] = 0.0  # zero is not > 0
    np.testing.assert_array_equal(np.asarray(agg_mod.binarize_and_pack(jnp.asarray(x))), numpy_pack(x))


@pytest.mark.parametrize("chunk", [100, 8192])
def test_aggregate_matches_numpy(small_data, chunk):
    feats, ids, centroids = small_data
    words = jasmk.quantize(jasmk.Codebook.from_centroids(centroids), feats, multiple_assignment=3)
    agg = agg_mod.aggregate(centroids, feats, words, ids, binary=False, chunk_descriptors=chunk)
    rows = []
    for img in np.unique(ids):
        m = ids == img
        for w in np.unique(words[m]):
            sel = (words[m] == w).any(axis=1)
            r = (feats[m][sel] - centroids[w]).sum(0)
            rows.append((img, w, r / (np.linalg.norm(r) + 1e-6)))
    np.testing.assert_array_equal(agg.images, [r[0] for r in rows])
    np.testing.assert_array_equal(agg.words, [r[1] for r in rows])
    np.testing.assert_allclose(agg.vecs, np.stack([r[2] for r in rows]), atol=2e-6)
    bagg = agg_mod.aggregate(centroids, feats, words, ids, binary=True, chunk_descriptors=chunk)
    np.testing.assert_array_equal(bagg.vecs, numpy_pack(np.stack([r[2] for r in rows])))
    # unsorted rows (what the index and the scorer use): the same rows, grouped by image, in first-seen order on
    # the jitted path (device centroids; host centroids take the host path for inputs this small, rows sorted)
    raw = agg_mod.aggregate(jnp.asarray(centroids), feats, words, ids, binary=True, chunk_descriptors=chunk,
                            sort=False)
    assert (np.diff(raw.images) >= 0).all()
    for img in np.unique(ids):
        m = ids == img
        first_seen = list(dict.fromkeys(words[m].reshape(-1).tolist()))
        np.testing.assert_array_equal(raw.words[raw.images == img], first_seen)
    order = np.lexsort((raw.words, raw.images))
    np.testing.assert_array_equal(raw.vecs[order], bagg.vecs)


@pytest.mark.parametrize("dim,k,n,ma", [(40, 8, 600, 3), (100, 16, 300, 5), (1024, 64, 128, 5), (128, 4096, 9, 1)])
def test_host_aggregation_gives_the_jitted_bits(dim, k, n, ma):
    """Small ASMK* inputs are aggregated in numpy (one query image): the same rows and bits as the jitted path,
    also with cells of many members (sums in descriptor order), components summing to about zero, unassigned
    (negative) words and a dimension that is not a multiple of 32."""
    rng = np.random.default_rng(dim + n)
    centroids = rng.standard_normal((k, dim)).astype(np.float32)
    feats = (centroids[rng.integers(0, k, n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)
    feats[: n // 2, 0] = centroids[0, 0] + np.float32(1e-7) * rng.standard_normal(n // 2).astype(np.float32)
    ids = np.sort(rng.integers(0, 3, n))
    words = jasmk.quantize(jasmk.Codebook.from_centroids(centroids), feats, multiple_assignment=ma)
    words[rng.random(words.shape) < 0.05] = -1
    assert n * ma <= agg_mod.HOST_PAIRS
    host = agg_mod.aggregate(centroids, feats, words, ids, binary=True)  # numpy centroids: the host path
    jitted = agg_mod.aggregate(jnp.asarray(centroids), feats, words, ids, binary=True)
    for a, b in zip(host, jitted):
        np.testing.assert_array_equal(a, b)
    numpy_only = agg_mod.aggregate_host(centroids, feats, words, ids, compiled=False)
    np.testing.assert_array_equal(numpy_only.vecs, host.vecs)  # numpy's loop and the compiled one


def test_large_asmk_star_on_the_cpu_is_summed_on_the_host_in_chunks_with_the_jitted_bits():
    """On the CPU backend ASMK* of any size is aggregated by the compiled kernel, a bounded chunk of whole images at
    a time: the rows and bits of the jitted path (which GPUs run), across chunk borders and with bursty cells."""
    if not cpu_kernel.available():
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(5)
    k, dim, ma = 256, 128, 3
    centroids = rng.standard_normal((k, dim)).astype(np.float32)
    sizes = rng.integers(1, 900, 120)  # uneven images, a few single-descriptor ones
    sizes[::17] = 1
    ids = np.repeat(np.arange(0, 3 * len(sizes), 3), sizes)  # gapped ids
    n = len(ids)
    feats = (centroids[rng.integers(0, 16, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    words = jasmk.quantize(jasmk.Codebook.from_centroids(centroids), feats, multiple_assignment=ma)
    assert n * ma > agg_mod.COMPILED_HOST_PAIRS and agg_mod.host_serves(n * ma, binary=True, centroids=centroids)
    host = agg_mod.aggregate(centroids, feats, words, ids, binary=True)
    chunked = agg_mod.aggregate_host_chunked(centroids, feats, words, ids, chunk_pairs=5000)
    jitted = agg_mod.aggregate(jnp.asarray(centroids), feats, words, ids, binary=True)
    assert np.unique(jitted.images).size == len(sizes)
    for a, b, c in zip(host, chunked, jitted):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_aggregate_burst_overflow_is_redone(small_data):
    """A chunk whose repeated (image, word) members exceed the compact buffer is recomputed exactly."""
    feats, ids, centroids = small_data
    words = np.zeros((len(feats), 2), np.int32)  # every descriptor in words 0 and 1: all members but two are extra
    words[:, 1] = 1
    agg = agg_mod.aggregate(centroids, feats, words, ids, binary=False)
    for img in np.unique(ids):
        m = ids == img
        for w in (0, 1):
            r = (feats[m] - centroids[w]).sum(0)
            got = agg.vecs[(agg.images == img) & (agg.words == w)]
            np.testing.assert_allclose(got[0], r / (np.linalg.norm(r) + 1e-6), atol=2e-6)


def test_jax_quantizer_matches_faiss(small_data):
    feats, _, centroids = small_data
    cb = jasmk.Codebook.from_centroids(centroids)
    for ma in (1, 5):
        a = jasmk.quantize(cb, feats, multiple_assignment=ma, method="faiss")
        b = jasmk.quantize(cb, feats, multiple_assignment=ma, method="jax", chunk_size=256)
        # numpy oracle on the exact squared distances
        d = ((feats[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
        oracle = np.argsort(d, axis=1, kind="stable")[:, :ma]
        assert (a == oracle).mean() > 0.999 and (b == oracle).mean() > 0.999
        np.testing.assert_array_equal(a[:, 0], b[:, 0])


def test_index_built_with_jax_quantizer_gives_same_scores(small_data):
    feats, ids, centroids = small_data
    i1 = jasmk.build_index(feats, ids, codebook=centroids, quantizer="faiss")
    i2 = jasmk.build_index(feats, ids, codebook=centroids, quantizer="jax")
    r1 = jasmk.query(i1, feats, ids, quantizer="faiss")
    r2 = jasmk.query(i2, feats, ids, quantizer="jax")
    np.testing.assert_allclose(r1.scores, r2.scores, atol=1e-5)


def test_train_codebook_matches_asmk(small_data):
    from asmk import asmk_method

    feats = small_data[0]
    ref = asmk_method.ASMKMethod.initialize_untrained(asmk_params(size=32)).train_codebook(feats)
    cb = jasmk.train_codebook(feats, size=32)
    np.testing.assert_array_equal(np.asarray(cb.centroids), ref.codebook.centroids)
    assert cb.size == 32 and cb.size_param == 32


def test_parse_size():
    assert jasmk.parse_size("64k") == 65536
    assert jasmk.parse_size("1M") == 1024**2
    assert jasmk.parse_size(1000) == 1000
    for bad in ("lots", 0, -3, "k", 1.5, True):
        with pytest.raises(ValueError):
            jasmk.parse_size(bad)


def _oracle_scores(index, q_vecs, q_words, alpha, threshold, binary):
    """float64 numpy re-derivation of one query's scores over every image slot, by an explicit loop over the
    query rows and each word's postings (taken from the word-major entries)."""
    vecs, words, images = ivf.entries(index)
    idf = np.asarray(index.idf, np.float64)
    norm = index.norm_factor.astype(np.float64)
    ref = np.zeros(int(index.n_images))
    for v, w in zip(q_vecs, q_words):
        e = np.flatnonzero(words == w)
        if binary:
            ham = np.array([sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(v, vecs[i])) for i in e])
            sim = 1 - 2 * ham / (32 * len(v))
        else:
            sim = vecs[e].astype(np.float64) @ v.astype(np.float64)
        keep = sim >= threshold
        k = np.where(keep, np.power(np.where(keep, sim, 1.0), alpha), 0.0)
        np.add.at(ref, images[e], k * idf[w])
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.where(norm > 0, ref / np.sqrt(norm), 0.0)
    return ref / np.sqrt(idf[q_words].sum())


@pytest.mark.parametrize("engine", ["dense", "sparse-xla", "sparse-cpu"])
def test_each_engine_matches_a_numpy_loop(small_data, engine, monkeypatch):
    """Every kernel, on an index of several segments, gives the scores of an explicit float64 loop."""
    monkeypatch.setattr(ivf, "MAX_SEGMENT_IMAGES", 7)
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats[ids < 9], ids[ids < 9], codebook=centroids, use_idf=True)
    for lo, hi in [(9, 10), (10, 11), (11, 24)]:
        m = (ids >= lo) & (ids < hi)
        index = jasmk.add_images(index, feats[m], ids[m])
    assert len(index.segments) >= 4
    agg = jasmk.aggregate_images(centroids, feats, ids, binary=True, multiple_assignment=5)
    S = jasmk.score_matrix(index, feats, ids, kernel=engine)
    for q in (0, 5, 9, 23):
        m = agg.images == q
        ref = _oracle_scores(index, agg.vecs[m], agg.words[m], 3.0, 0.0, True)
        np.testing.assert_allclose(S[q], ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("binary", [True, False])
def test_scores_do_not_depend_on_batching_or_engine(small_data, binary, monkeypatch):
    """A query scored alone ranks exactly as inside any batch, with every engine (for ASMK* also with auto); all
    kernels agree to the bit for ASMK* (the same float32 terms in order-free fixed point), the real-valued
    kernels (dot products reduced in different shapes) within float32 rounding."""
    monkeypatch.setattr(ivf, "MAX_SEGMENT_IMAGES", 10)
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats[ids < 12], ids[ids < 12], codebook=centroids, binary=binary, use_idf=True)
    index = jasmk.add_images(index, feats[ids >= 12], ids[ids >= 12])
    agg = jasmk.aggregate_images(centroids, feats, ids, binary=binary, multiple_assignment=5, sort=False)
    engines = ["dense", "sparse-xla", "auto"] + (["sparse-cpu"] if binary else [])
    ref = jasmk.query_aggregated(index, agg, alpha=2.0, similarity_threshold=0.05, kernel="dense")
    for engine in engines:
        together = jasmk.query_aggregated(index, agg, alpha=2.0, similarity_threshold=0.05, kernel=engine)
        if binary:  # fixed-point sums: every kernel gives the same bits
            np.testing.assert_array_equal(together.scores, ref.scores)
            np.testing.assert_array_equal(together.ranks, ref.ranks)
        else:
            assert_same_ranking(together.ranks, together.scores, ref.ranks, ref.scores, atol=3e-7, tie_tol=3e-7)
        if engine == "auto" and not binary:
            continue  # the cost model may pick another kernel for one query than for the batch
        for q in (0, 7, 23):
            m = agg.images == q
            alone = jasmk.query_aggregated(index, jasmk.Aggregated(agg.vecs[m], agg.words[m], agg.images[m]),
                                           alpha=2.0, similarity_threshold=0.05, kernel=engine)
            np.testing.assert_array_equal(alone.scores[0], together.scores[q])
            np.testing.assert_array_equal(alone.ranks[0], together.ranks[q])
    # rows of a query in another order (a permutation within each image) give the same bits
    perm = np.concatenate([np.flatnonzero(agg.images == i)[::-1] for i in range(24)])
    shuffled = jasmk.Aggregated(agg.vecs[perm], agg.words[perm], agg.images[perm])
    again = jasmk.query_aggregated(index, shuffled, alpha=2.0, similarity_threshold=0.05, kernel=engines[-1])
    np.testing.assert_array_equal(again.scores, jasmk.query_aggregated(
        index, agg, alpha=2.0, similarity_threshold=0.05, kernel=engines[-1]).scores)


def test_bad_input_errors(small_data):
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    nan = feats.copy()
    nan[3, 1] = np.nan
    inf = feats.copy()
    inf[5, 0] = np.inf
    cases = [
        (lambda: jasmk.build_index(nan, ids, codebook=centroids), "NaN or inf"),
        (lambda: jasmk.build_index(inf, ids, codebook=centroids), "NaN or inf"),
        (lambda: jasmk.query(index, nan, ids), "NaN or inf"),
        (lambda: jasmk.build_index(feats[:, :10], ids, codebook=centroids), "dimension 10"),
        (lambda: jasmk.query(index, feats[:, :10], ids), "dimension 10"),
        (lambda: jasmk.build_index(np.zeros((0, 32), np.float32), np.zeros(0, int), codebook=centroids), "empty"),
        (lambda: jasmk.build_index(feats, ids[::-1].copy(), codebook=centroids), "not grouped"),
        (lambda: jasmk.build_index(feats, ids[:-1], codebook=centroids), "entries but there are"),
        (lambda: jasmk.build_index(feats, ids - 5, codebook=centroids), "non-negative"),
        (lambda: jasmk.build_index(feats, ids, codebook=centroids, multiple_assignment=0), "multiple_assignment"),
        (lambda: jasmk.build_index(feats, ids, codebook=None), "codebook is required"),
        (lambda: jasmk.build_index(feats, ids, codebook=centroids, quantizer="kmeans"), "quantizer"),
        (lambda: jasmk.query(index, feats, ids, topk=0), "topk"),
        (lambda: jasmk.query(index, feats, ids, alpha=float("nan")), "alpha"),
        (lambda: jasmk.train_codebook(feats[:10], size=64), "only 10 descriptors"),
        (lambda: jasmk.build_index(feats[:, :1].reshape(-1), ids, codebook=centroids), "2-D"),
        (lambda: jasmk.build_index(feats.astype(str), ids, codebook=centroids), "numeric"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_compat_facade_mast3r_flow(tmp_path, small_data):
    """MASt3R's Retriever flow, with one import changed, against asmk; codebook pickles are interchangeable."""
    from asmk import asmk_method as ref_method

    from jasmk.compat import asmk_method

    feats, ids, _ = small_data
    params = asmk_params(size=64, binary=True)
    params["index"] = {"gpu_id": 0}  # MASt3R asks for a GPU; jasmk uses whatever JAX runs on
    ref_params = asmk_params(size=64, binary=True)
    path = str(tmp_path / "cb_codebook.pkl")
    trained = asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(feats, cache_path=path)
    ref = ref_method.ASMKMethod.initialize_untrained(ref_params).train_codebook(None, cache_path=path)
    np.testing.assert_array_equal(np.asarray(trained.codebook.centroids), ref.codebook.centroids)

    loaded = asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=path)
    dataset = loaded.build_ivf(feats, ids)
    metadata, images, ranks, scores = dataset.query_ivf(feats, ids)
    _, ref_images, ref_ranks, ref_scores = ref.build_ivf(feats, ids.copy()).query_ivf(feats, ids)
    from helpers import assert_same_ranking

    np.testing.assert_array_equal(images, ref_images)
    assert_same_ranking(ranks, scores, ref_ranks, ref_scores)
    assert ranks.dtype == np.int64 and scores.dtype == np.float64 and "query_avg_time" in metadata
    assert dataset.metadata["build_ivf"]["ivf_stats"]["images"] == 24

    bad = asmk_params(size=128)
    with pytest.raises(ValueError, match="size"):
        asmk_method.ASMKMethod.initialize_untrained(bad).train_codebook(None, cache_path=path)
    with pytest.raises(ValueError, match="unknown"):
        p = asmk_params(size=64)
        p["query_ivf"]["similarity"]["beta"] = 1
        dataset.query_ivf(feats, ids, step_params=p["query_ivf"])
    with pytest.raises(ValueError, match="no training descriptors"):
        asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=str(tmp_path / "x.pkl"))


def test_query_padded_fully_jitted_matches_query(small_data):
    """The one-jit padded query (vmapped over images) gives jasmk.query's ranking, and asmk's scores."""
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids, use_idf=True)
    sel = [2, 3, 11]
    n_max = 70
    padded = np.zeros((len(sel), n_max, feats.shape[1]), np.float32)
    valid = np.zeros((len(sel), n_max), bool)
    for t, img in enumerate(sel):
        f = feats[ids == img]
        padded[t, :len(f)], valid[t, :len(f)] = f, True
    ranks, scores = jasmk.query_padded(index, padded, valid, multiple_assignment=5, topk=10)
    m = np.isin(ids, sel)
    ref = jasmk.query(index, feats[m], ids[m], multiple_assignment=5, topk=10)
    from helpers import assert_same_ranking

    assert_same_ranking(np.asarray(ranks), np.asarray(scores), ref.ranks, ref.scores)
    # and under an outer jit + vmap over single images
    one = jax.jit(jax.vmap(lambda f, v: jasmk.query_padded(index, f[None], v[None], topk=10)))
    r2, s2 = one(padded, valid)
    np.testing.assert_allclose(np.asarray(s2)[:, 0], np.asarray(scores), atol=1e-6)


def test_compat_quantizes_the_indexed_set_once(monkeypatch, small_data):
    """Querying the indexed descriptors reuses their quantization (at the query MA); changed data does not."""
    import jasmk.api
    import jasmk.compat
    from jasmk.compat import asmk_method

    feats, ids, centroids = small_data
    calls = []
    real = jasmk.core.codebook.quantize

    def counting(cb, x, **kw):
        calls.append(kw["multiple_assignment"])
        return real(cb, x, **kw)

    monkeypatch.setattr(jasmk.compat, "quantize", counting)
    monkeypatch.setattr(jasmk.api, "quantize", counting)
    method = asmk_method.ASMKMethod(asmk_params(size=64), {}, codebook=jasmk.Codebook.from_centroids(centroids))
    built = method.build_ivf(feats, ids)
    _, _, ranks, scores = built.query_ivf(feats, ids)
    assert calls == [5]
    own = jasmk.query(jasmk.build_index(feats, ids, codebook=centroids), feats, ids)
    np.testing.assert_array_equal(ranks, own.ranks)
    np.testing.assert_allclose(scores, own.scores, atol=1e-6)
    calls.clear()
    changed = feats.copy()
    changed[0] += 1.0
    built.query_ivf(changed, ids)
    assert calls == [5]


def test_scores_close_to_float64_oracle_with_many_query_rows():
    """Scores summed over ~1300 query rows and ~1000 postings per image stay within 1e-7 of a float64 numpy
    re-derivation (8 partial sums per score), with both real-valued kernels."""
    rng = np.random.default_rng(1)
    k, n_img, per = 2048, 300, 1000
    feats = rng.standard_normal((n_img * per, 32), dtype=np.float32)
    ids = np.repeat(np.arange(n_img), per)
    cent = rng.standard_normal((k, 32), dtype=np.float32)
    index = jasmk.build_index(feats, ids, codebook=cent, word_ids=rng.integers(0, k, (len(feats), 1)), binary=False)
    q = jasmk.aggregate_images(cent, feats[ids == 0], ids[ids == 0], binary=False, multiple_assignment=5)
    vecs, words, images = ivf.entries(index)
    idf, norm = np.asarray(index.idf).astype(np.float64), index.norm_factor.astype(np.float64)
    ref = np.zeros(int(index.n_images))
    for v, w in zip(q.vecs.astype(np.float64), q.words):
        e = np.flatnonzero(words == w)
        np.add.at(ref, images[e], (vecs[e].astype(np.float64) @ v) * idf[w])
    ref = ref / np.sqrt(norm) / np.sqrt(idf[q.words].sum())
    assert len(q.words) > 1000
    for engine in ("dense", "sparse-xla"):
        got = jasmk.score_matrix_aggregated(index, q, alpha=1.0, similarity_threshold=-1.0, kernel=engine)[0]
        np.testing.assert_allclose(got, ref, atol=1e-7, rtol=0)


def test_aggregation_is_bit_exact_with_asmk_kernel():
    """Residual sums in asmk's order: the packed ASMK* bits equal asmk's exactly, also for bursty words and MA 5."""
    from asmk import kernel as kern_pkg

    rng = np.random.default_rng(5)
    feats = rng.standard_normal((3000, 64)).astype(np.float32)
    ids = np.repeat(np.arange(30), 100)
    cent = feats[rng.choice(3000, 128, replace=False)] + 0.01
    cb = jasmk.Codebook.from_centroids(cent)
    for ma in (1, 5):
        words = jasmk.quantize(cb, feats, multiple_assignment=ma)

        class _Cdb:
            centroids = cent

        for binary in (True, False):
            ref_vecs, ref_words, ref_imgs = kern_pkg.ASMKKernel(_Cdb, binary=binary).aggregate(feats, words, ids)
            for chunk in (150, 8192):
                agg = agg_mod.aggregate(cent, feats, words, ids, binary=binary, chunk_descriptors=chunk)
                np.testing.assert_array_equal(agg.words, ref_words)
                np.testing.assert_array_equal(agg.images, ref_imgs)
                if binary:
                    np.testing.assert_array_equal(agg.vecs, ref_vecs)
                else:
                    np.testing.assert_allclose(agg.vecs, ref_vecs, rtol=1e-6, atol=1e-7)


def _sizes(index):
    """The index sizes batch_size takes (engine.layout without the idf and the reservation's rows)."""
    sizes = engine_mod.layout(index)
    del sizes["idf"], sizes["query_rows"]
    return sizes


def test_batch_size_respects_memory_budgets(small_data):
    """The query batch is a power of two, at most the queries there are, and keeps the dense word table and the
    accumulator of the largest segment bounded."""
    feats, ids, centroids = small_data
    for binary in (True, False):
        index = jasmk.build_index(feats, ids, codebook=centroids, binary=binary)
        for n_q, rows in [(1, 10), (3, 10), (1000, 5000), (1000, 50)]:
            b = engine_mod.batch_size(n_q, rows, **_sizes(index))
            assert b & (b - 1) == 0 and 1 <= b <= max(1, 1 << (n_q - 1).bit_length()) and b <= 64
            assert (min(index.n_words, b * rows) + 1) * b * index.width * 4 <= 64 * 2**20
        assert engine_mod.batch_size(3, 10, **_sizes(index)) == 4
    seg = index.segments[0]
    big = dataclasses.replace(index, segments=(dataclasses.replace(
        seg, norm_factor=np.zeros(ivf.MAX_SEGMENT_IMAGES, np.float32)),))  # only the image capacity matters
    b = engine_mod.batch_size(1000, 10, **_sizes(big))
    assert score_mod.LIMBS * ivf.MAX_SEGMENT_IMAGES * b * 4 <= score_mod.ACC_BYTES
    assert b == 64 or score_mod.LIMBS * ivf.MAX_SEGMENT_IMAGES * 2 * b * 4 > score_mod.ACC_BYTES


def test_cache_fields_are_neither_leaves_nor_static_metadata(small_data):
    """Host and device copies live in a declared ``caches`` field that PyTree transforms, jit cache keys and
    checkpoints do not see."""
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    leaves, treedef = jax.tree_util.tree_flatten(index)
    ivf.on_device(index)
    ivf.host(index.segments[0])
    jasmk.query(index, feats[ids < 2], ids[ids < 2], kernel="sparse-xla")
    assert index.caches and index.segments[0].caches
    leaves2, treedef2 = jax.tree_util.tree_flatten(index)
    assert treedef2 == treedef and len(leaves2) == len(leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.caches == {} and rebuilt.segments[0].caches == {}
    assert "caches" not in repr(index)


def test_reprs_are_short(small_data):
    feats, ids, centroids = small_data
    cb = jasmk.Codebook.from_centroids(centroids)
    index = jasmk.build_index(feats, ids, codebook=cb)
    assert repr(cb) == f"Codebook(size={cb.size}, dim={cb.dim}, size_param={cb.size_param!r})"
    text = repr(index)
    assert text.startswith("Index(ASMK*, images=") and f"postings={index.n_entries}" in text
    assert "\n" not in text and len(text) < 200
