"""Unit checks of the core pieces against numpy re-derivations, and the input errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jasmk
from jasmk import aggregate as agg_mod
from jasmk import score as score_mod
from conftest import asmk_params, asmk_with_centroids


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
    # unsorted rows (what the index and the scorer use): the same rows, grouped by image, in first-seen order
    raw = agg_mod.aggregate(centroids, feats, words, ids, binary=True, chunk_descriptors=chunk, sort=False)
    assert (np.diff(raw.images) >= 0).all()
    for img in np.unique(ids):
        m = ids == img
        first_seen = list(dict.fromkeys(words[m].reshape(-1).tolist()))
        np.testing.assert_array_equal(raw.words[raw.images == img], first_seen)
    order = np.lexsort((raw.words, raw.images))
    np.testing.assert_array_equal(raw.vecs[order], bagg.vecs)


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


def test_jitted_vmapped_scoring_equals_per_query(small_data):
    """score_dense (one batch) equals score_image per query and a numpy loop; the index is a PyTree under jit."""
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    leaves, treedef = jax.tree_util.tree_flatten(index)
    assert jax.tree_util.tree_unflatten(treedef, leaves).n_images == index.n_images
    agg = jasmk.aggregate_images(centroids, feats, ids, binary=True, multiple_assignment=5)
    q = 64
    vecs = np.zeros((3, q, agg.vecs.shape[1]), np.uint32)
    words = np.zeros((3, q), np.int32)
    valid = np.zeros((3, q), bool)
    for t, img in enumerate([0, 5, 9]):
        m = agg.images == img
        k = min(int(m.sum()), q)
        vecs[t, :k], words[t, :k], valid[t, :k] = agg.vecs[m][:k], agg.words[m][:k], True
    batch = score_mod.score_dense(index, vecs, words, valid, 3.0, 0.0)
    for t in range(3):
        one = score_mod.score_image(index, vecs[t], words[t], valid[t], 3.0, 0.0)
        np.testing.assert_allclose(batch[t], one, atol=1e-6)
    # numpy oracle for one query: explicit loop over query rows and postings
    counts, offs = np.asarray(index.counts), np.asarray(index.word_offsets)
    ev, ei = np.asarray(index.entry_vecs), np.asarray(index.entry_images)
    idf, norm = np.asarray(index.idf), np.asarray(index.norm_factor)
    ref = np.zeros(index.n_images)
    for v, w in zip(vecs[1][valid[1]], words[1][valid[1]]):
        for e in range(offs[w], offs[w] + counts[w]):
            ham = sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(v, ev[e]))
            s = 1 - 2 * ham / (32 * len(v))
            if s >= 0:
                ref[ei[e]] += s**3 * idf[w] / np.sqrt(norm[ei[e]])
    ref /= np.sqrt(idf[words[1][valid[1]]].sum())
    np.testing.assert_allclose(batch[1], ref, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_scores_do_not_depend_on_batching(small_data, binary):
    """Flat rows in any order, any batch size and any scan block give the same scores (and empty slots 0)."""
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids, binary=binary, use_idf=True)
    agg = jasmk.aggregate_images(centroids, feats, ids, binary=binary, multiple_assignment=5, sort=False)
    ref = np.stack([np.asarray(score_mod.score_image(index, agg.vecs[agg.images == i], agg.words[agg.images == i],
                                                     np.ones(int((agg.images == i).sum()), bool), 2.0, 0.05))
                    for i in range(index.n_images)])
    perm = np.random.default_rng(0).permutation(len(agg.words))
    for b, block in [(32, 64), (32, 4096), (64, 512)]:
        slots = np.concatenate([agg.images, np.full(7, b)])[np.concatenate([perm, len(perm) + np.arange(7)])]
        vecs = np.concatenate([agg.vecs, agg.vecs[:7]])[np.concatenate([perm, len(perm) + np.arange(7)])]
        words = np.concatenate([agg.words, agg.words[:7]])[np.concatenate([perm, len(perm) + np.arange(7)])]
        got = np.asarray(score_mod.score_rows(index, vecs, words, slots.astype(np.int32), 2.0, 0.05, n_queries=b,
                                              block=block))
        np.testing.assert_allclose(got[: index.n_images], ref, atol=1e-6)
        assert np.all(got[index.n_images:] == 0)  # slots with no rows score 0
    with pytest.raises(ValueError, match="block"):
        score_mod.score_rows(index, vecs, words, slots.astype(np.int32), 2.0, 0.05, n_queries=4, block=3000)


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
        (lambda: jasmk.build_index(feats, ids, codebook=centroids, quantizer="hnsw"), "quantizer"),
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
    from conftest import assert_same_ranking

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
    from conftest import assert_same_ranking

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
    real = jasmk.codebook.quantize

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
    re-derivation."""
    rng = np.random.default_rng(1)
    k, n_img, per = 2048, 300, 1000
    feats = rng.standard_normal((n_img * per, 32), dtype=np.float32)
    ids = np.repeat(np.arange(n_img), per)
    cent = rng.standard_normal((k, 32), dtype=np.float32)
    index = jasmk.build_index(feats, ids, codebook=cent, word_ids=rng.integers(0, k, (len(feats), 1)), binary=False)
    q = jasmk.aggregate_images(cent, feats[ids == 0], ids[ids == 0], binary=False, multiple_assignment=5)
    got = np.asarray(score_mod.score_image(index, q.vecs, q.words, np.ones(len(q.words), bool), 1.0, -1.0))
    counts, offs = np.asarray(index.counts), np.asarray(index.word_offsets)
    ev, ei = np.asarray(index.entry_vecs).astype(np.float64), np.asarray(index.entry_images)
    idf, norm = np.asarray(index.idf).astype(np.float64), np.asarray(index.norm_factor).astype(np.float64)
    ref = np.zeros(index.n_images)
    for v, w in zip(q.vecs.astype(np.float64), q.words):
        e = np.arange(offs[w], offs[w] + counts[w])
        np.add.at(ref, ei[e], (ev[e] @ v) * idf[w])
    ref = ref / np.sqrt(norm) / np.sqrt(idf[q.words].sum())
    assert len(q.words) > 1000
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


def test_batch_size_respects_memory_budgets(small_data):
    """The query batch is a power of two, at most the queries there are, and keeps table and accumulator bounded."""
    from jasmk import api

    feats, ids, centroids = small_data
    for binary in (True, False):
        index = jasmk.build_index(feats, ids, codebook=centroids, binary=binary)
        for n_q, rows in [(1, 10), (3, 10), (1000, 5000), (1000, 50)]:
            b = api.batch_size(index, n_q, rows)
            assert b & (b - 1) == 0 and 1 <= b <= max(1, 1 << (n_q - 1).bit_length()) and b <= 64
            assert (min(index.n_words, b * rows) + 1) * b * index.width * 4 <= 64 * 2**20
        assert api.batch_size(index, 3, 10) == 4
    big = dataclasses.replace(index, n_images=10**7)  # only the static size matters here
    b = api.batch_size(big, 1000, 10)
    assert b == 4 and score_mod.partial_sums(big, b) * big.n_images * b * 4 <= 256 * 2**20
    assert score_mod.partial_sums(index, 64) == score_mod.PARTIAL_SUMS
