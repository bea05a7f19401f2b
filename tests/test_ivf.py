"""The segmented inverted file: adds, merges, capacity ladders, compilations, sparse scoring, serialization."""

import jax
import numpy as np
import pytest
from helpers import asmk_params, asmk_with_centroids, assert_same_ranking, clustered_data, count_compilations

import jasmk
from jasmk.core import aggregate as agg_mod
from jasmk.core import engine, ivf
from jasmk.storage import checkpoint, index_format


def random_rows(rng, n_images, rows, k, width, first=0):
    """Aggregated rows of ``n_images`` images (ids from ``first``), ``rows`` distinct words each."""
    words = np.concatenate([rng.choice(k, rows, replace=False) for _ in range(n_images)]).astype(np.int32)
    vecs = rng.integers(0, 2**32, (n_images * rows, width), dtype=np.uint32)
    images = np.repeat(np.arange(first, first + n_images, dtype=np.int32), rows)
    return agg_mod.Aggregated(vecs, words, images)


def check_invariants(index):
    """Segments tile [0, n_images) in order, are word-major with ascending images per word, counts add up."""
    start, total = 0, np.zeros(index.n_words, np.int64)
    for seg in index.segments:
        h = ivf.host(seg)
        assert h.image_start == start
        e = int(h.offsets[-1])
        w, im = h.words[:e], h.images[:e]
        assert np.all(np.diff(w) >= 0)
        key = w.astype(np.int64) * (1 << 32) + im
        assert np.all(np.diff(key) > 0)  # within a word, strictly ascending images
        assert np.all(im < h.n_images) and np.all(h.images[e:] == agg_mod.PAD_IMAGE)
        assert seg.capacity % ivf.ENTRY_BLOCK == 0 and seg.image_capacity >= h.n_images
        total += np.bincount(w, minlength=index.n_words)
        start += h.n_images
    assert start == int(index.n_images)
    np.testing.assert_array_equal(total, np.asarray(index.counts))


def test_adds_equal_one_build_and_stay_logarithmic():
    """200 one-image adds: the same postings, norms and scores as one build of the same rows, with O(log n)
    segments (merged geometrically) and every posting copied O(log n) times."""
    rng = np.random.default_rng(0)
    k, width = 512, 2
    allrows = random_rows(rng, 200, 30, k, width)
    cent = np.zeros((k, 64), np.float32)
    one = ivf.add(ivf.empty(cent, binary=True, use_idf=False), allrows)
    index = ivf.empty(cent, binary=True, use_idf=False)
    most = 0
    for i in range(200):
        m = allrows.images == i
        index = ivf.add(index, agg_mod.Aggregated(allrows.vecs[m], allrows.words[m], allrows.images[m]))
        most = max(most, len(index.segments))
        if i % 37 == 0:
            check_invariants(index)
    check_invariants(index)
    assert most <= 2 * int(np.log2(200)) + 2, most
    for a, b in zip(ivf.entries(index), ivf.entries(one)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(index.norm_factor, one.norm_factor)
    q = agg_mod.Aggregated(allrows.vecs[:300], allrows.words[:300], allrows.images[:300])
    a = jasmk.query_aggregated(index, q, topk=20)
    b = jasmk.query_aggregated(one, q, topk=20)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert len(jasmk.core.ivf.compact(index).segments) == 1  # compaction merges what the limits allow


def test_segment_limits_split_and_score_like_one_segment(small_data, monkeypatch):
    """Indexes cut into many small image ranges (per-segment limits) rank exactly like one segment, for
    top-k, for topk=None (every image slot) and in the score matrix; id gaps are covered by the ranges."""
    feats, ids, centroids = small_data
    ids = ids * 2 + 1  # gaps: even ids are empty slots
    full = jasmk.build_index(feats, ids, codebook=centroids, use_idf=True)
    monkeypatch.setattr(ivf, "MAX_SEGMENT_IMAGES", 5)
    split = jasmk.build_index(feats, ids, codebook=centroids, use_idf=True)
    assert len(split.segments) == -(-int(split.n_images) // 5) and len(full.segments) == 1
    check_invariants(split)
    for topk in (7, None):
        for eng in ("dense", "sparse-xla", "auto"):
            a = jasmk.query(split, feats, ids, topk=topk, kernel=eng)
            b = jasmk.query(full, feats, ids, topk=topk, kernel=eng)
            np.testing.assert_array_equal(a.ranks, b.ranks)
            np.testing.assert_array_equal(a.scores, b.scores)
    assert b.ranks.shape[1] == int(full.n_images)
    np.testing.assert_array_equal(jasmk.score_matrix(split, feats, ids), jasmk.score_matrix(full, feats, ids))


def test_incremental_adds_match_asmk_with_idf(small_data, monkeypatch):
    """Adds in chunks (several segments, idf refreshed for touched words only) give asmk's incremental scores."""
    monkeypatch.setattr(ivf, "MAX_SEGMENT_IMAGES", 6)
    feats, ids, centroids = small_data
    params = asmk_params(size=64, use_idf=True)
    method = asmk_with_centroids(params, centroids)
    builder = method.create_ivf_builder()
    index = None
    for lo, hi in [(0, 5), (5, 6), (6, 13), (13, 24)]:
        m = (ids >= lo) & (ids < hi)
        builder.add(feats[m], ids[m].copy())
        index = (jasmk.build_index(feats[m], ids[m], codebook=centroids, use_idf=True) if index is None
                 else jasmk.add_images(index, feats[m], ids[m]))
    ref = method.add_ivf_builder(builder)
    _, _, ref_ranks, ref_scores = ref.query_ivf(feats, ids)
    res = jasmk.query(index, feats, ids)
    assert len(index.segments) >= 4
    assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)


def test_no_recompilation_after_add():
    """Nothing data-dependent is static: a query right after an add (or on a new index of similar size) reuses
    the compiled XLA kernels; the CPU kernel compiles nothing at all."""
    rng = np.random.default_rng(1)
    k, width = 1024, 2
    cent = np.zeros((k, 64), np.float32)
    base = random_rows(rng, 60, 40, k, width)
    index = ivf.add(ivf.empty(cent, binary=True, use_idf=False), base)
    q = agg_mod.Aggregated(base.vecs[:40], base.words[:40], base.images[:40])
    with count_compilations() as compiles:
        for eng in ("dense", "sparse-xla", "sparse-cpu"):
            jasmk.query_aggregated(index, q, topk=10, kernel=eng)  # warm up
        grown = ivf.add(index, random_rows(rng, 1, 40, k, width, first=60))
        grown = ivf.add(grown, random_rows(rng, 2, 40, k, width, first=61))
        assert len(grown.segments) == 2  # a small tail segment on the same capacity steps as the first
        other = ivf.add(ivf.empty(cent, binary=True, use_idf=False), random_rows(rng, 62, 40, k, width))
        compiles.clear()
        for idx in (grown, other):
            for eng in ("dense", "sparse-xla", "sparse-cpu"):
                res = jasmk.query_aggregated(idx, q, topk=10, kernel=eng)
        assert compiles == [], f"{len(compiles)} compilations after an add"
        assert res.ranks.shape == (1, 10)


def test_query_padded_over_segments_matches_query(small_data, monkeypatch):
    """The one-jit query scores every segment (dense, or sparse with a static pair bound and the dense scan as
    the overflow rule) and merges the per-segment top-k: the ranks of ``query`` with the JAX quantizer."""
    monkeypatch.setattr(ivf, "MAX_SEGMENT_IMAGES", 8)
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    assert len(index.segments) == 3
    ref = jasmk.query(index, feats, ids, topk=5, quantizer="jax", kernel="dense")
    b = 4
    n = int(np.bincount(ids).max())
    padded = np.zeros((b, n, feats.shape[1]), np.float32)
    valid = np.zeros((b, n), bool)
    for t, img in enumerate([0, 3, 8, 17]):
        x = feats[ids == img]
        padded[t, : len(x)], valid[t, : len(x)] = x, True
    for max_pairs in (None, 10, 100000):  # dense; overflow (dense fallback); sparse
        ranks, scores = jasmk.query_padded(jax.device_put(index), padded, valid, topk=5, max_pairs=max_pairs)
        for t, img in enumerate([0, 3, 8, 17]):
            np.testing.assert_array_equal(np.asarray(ranks[t]), ref.ranks[img])
            np.testing.assert_allclose(np.asarray(scores[t]), ref.scores[img], atol=1e-6)
    ranks, scores = jasmk.query_padded(index, padded, valid, topk=None)
    assert ranks.shape[1] == sum(s.image_capacity for s in index.segments)
    real = np.asarray(scores[0]) > -np.inf
    assert real.sum() == int(index.n_images) and np.all(np.asarray(ranks[0])[~real] == -1)


def test_checkpoint_keeps_segments_and_rejects_damage(tmp_path, monkeypatch):
    monkeypatch.setattr(ivf, "MAX_SEGMENT_IMAGES", 16)
    rng = np.random.default_rng(2)
    feats, ids = clustered_data(rng, n_images=40, per_image=30, dim=32)
    cb = jasmk.train_codebook(feats, size=32)
    index = jasmk.build_index(feats[ids < 30], ids[ids < 30], codebook=cb, use_idf=True)
    index = jasmk.add_images(index, feats[ids >= 30], ids[ids >= 30])
    checkpoint.save_index(tmp_path / "idx", index)
    loaded = checkpoint.load_index(tmp_path / "idx")
    assert [ivf.host(s).n_images for s in loaded.segments] == [ivf.host(s).n_images for s in index.segments]
    a, b = jasmk.query(index, feats, ids), jasmk.query(loaded, feats, ids)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.scores, b.scores)
    arrays, fields = index_format.to_arrays(index)
    key = sorted(arrays["segments"])[0]

    def broken(**change):
        bad_arrays = {**arrays, "segments": {**arrays["segments"]}}
        seg = dict(bad_arrays["segments"][key])
        for name, value in change.items():
            if name in seg:
                seg[name] = value
        bad_arrays["segments"][key] = seg
        bad_fields = {**fields, **{n: v for n, v in change.items() if n in fields}}
        for name in ("idf", "centroids", "counts"):
            if name in change:
                bad_arrays[name] = change[name]
        return bad_arrays, bad_fields

    seg0 = arrays["segments"][key]
    cases = [
        (dict(words=np.where(np.arange(len(seg0["words"])) == 0, 10**6, seg0["words"]).astype(np.int32)), "word ids"),
        (dict(images=seg0["images"] + 1000), "image ids"),
        (dict(norm_factor=np.full_like(seg0["norm_factor"], np.nan)), "normalization"),
        (dict(idf=np.full(32, np.nan, np.float32)), "idf"),
        (dict(imid_offset=10**6), "imid_offset"),
        (dict(n_images=5), "cover"),
        (dict(counts=np.zeros(32, np.int32)), "counts"),
        (dict(centroids=np.full((32, 32), np.inf, np.float32)), "centroids"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            index_format.from_arrays(*broken(**change))


def test_engine_argument_is_checked(small_data):
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    with pytest.raises(ValueError, match="kernel must be one of"):
        jasmk.query(index, feats, ids, kernel="gpu-magic")
    assert engine.pairs_capacity(3000) == 4096 and engine.pairs_capacity(5000) == 8192
    assert ivf.capacity(4097, multiple=ivf.ENTRY_BLOCK) % ivf.ENTRY_BLOCK == 0


def test_memory_is_checked_before_allocating(small_data, monkeypatch):
    """A stray huge image id, a dense score matrix or a full ranking beyond the available memory fail early with
    a ValueError saying how much is needed and what to do, before anything big is allocated."""
    from jasmk.core import memory

    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    assert jasmk.build_index(feats, np.where(ids == 23, 10**9, ids), codebook=centroids).n_images == 24  # compact
    monkeypatch.setattr(memory, "host_budget", lambda: (1000, "a test budget"))
    monkeypatch.setattr(memory, "MIN_CHECKED", 0)
    dense = ivf.empty(centroids, binary=True, use_idf=False, dense_ids=True)  # asmk's layout (compat)
    with pytest.raises(ValueError, match="keeps asmk's dense layout"):
        jasmk.add_images(dense, feats, np.where(ids == 23, 10**9, ids))
    with pytest.raises(ValueError, match=r"score matrix needs 4.5 KiB .* only 1000.0 B"):
        jasmk.score_matrix(index, feats, ids)
    with pytest.raises(ValueError, match="smaller topk"):
        jasmk.query(index, feats, ids, topk=None)
    assert jasmk.query(index, feats[ids < 2], ids[ids < 2], topk=3).ranks.shape == (2, 3)  # small: fine
    monkeypatch.setenv("JASMK_MEMORY_CHECK", "0")
    assert jasmk.score_matrix(index, feats[ids < 2], ids[ids < 2]).shape == (2, 24)


def test_query_padded_and_small_inputs_are_checked(small_data):
    """query_padded validates shapes and parameters (also under vmap) and concrete values; smaller entry points
    reject what would otherwise be silently wrong."""
    from jasmk import evaluation as jeval
    from jasmk import head, pairs

    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    good = np.zeros((2, 8, 32), np.float32)
    valid = np.ones((2, 8), bool)
    nan = good.copy()
    nan[1, 3, 0] = np.nan
    cases = [
        (lambda: jasmk.query_padded(index, nan, valid), "NaN or inf"),
        (lambda: jasmk.query_padded(index, good, valid, multiple_assignment=0), "multiple_assignment"),
        (lambda: jasmk.query_padded(index, good[:, :, :5], valid), "dimension 5"),
        (lambda: jasmk.query_padded(index, good[:0], valid[:0]), "at least one image"),
        (lambda: jasmk.query_padded(index, good, valid[:, :3]), "valid must be"),
        (lambda: jasmk.query_padded(index, good, valid, alpha=-1.0), "alpha"),
        (lambda: jasmk.query_padded(index, good, valid, max_pairs=0), "max_pairs"),
        (lambda: jax.vmap(lambda f, v: jasmk.query_padded(index, f, v))(good[:, None, :, :5], valid[:, None]),
         "dimension 5"),
        (lambda: jasmk.query(index, feats, ids, alpha=-2.0), "alpha"),
        (lambda: jasmk.build_index(feats, np.full(len(ids), 2**63 + 5, np.uint64), codebook=centroids), "2\\*\\*63"),
        (lambda: jeval.evaluate_revisited(np.zeros((1, 3), int), [{"easy": [0.5], "hard": []}]), "integer image ids"),
        (lambda: pairs.retrieval_pairs(np.eye(5, dtype=np.float32), na=2, k=2, seed="x"), "seed"),
        (lambda: head.parse_hdims("-5"), "positive"),
        (lambda: head.parse_hdims("0"), "positive"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    ranks, _ = jax.vmap(lambda f, v: jasmk.query_padded(index, f, v, topk=3))(good[:, None], valid[:, None])
    assert ranks.shape == (2, 1, 3)


def test_fixed_point_sums_do_not_depend_on_order():
    """The XLA kernels' fixed-point limbs: exact digit decomposition, sums independent of the order of the
    updates (what makes GPU scatter-adds deterministic), within 1e-7 of float64."""
    from jasmk.core import score as score_mod

    rng = np.random.default_rng(3)
    c = (rng.standard_normal(5000) * rng.choice([1e-6, 1e-2, 1.0, 150.0], 5000)).astype(np.float32)
    limbs = np.asarray(score_mod.to_limbs(c)).astype(np.int64)
    assert limbs[:, :3].min() >= 0 and limbs[:, :3].max() < 2**16
    digits = sum(limbs[:, k] * 2 ** (16 * k) for k in range(4))
    np.testing.assert_array_equal(digits, np.floor(c.astype(np.float64) * 2.0**40).astype(np.int64))
    sums = set()
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(c.size)
        acc = jax.numpy.zeros((1, 4), jax.numpy.int32).at[np.zeros(c.size, int)].add(score_mod.to_limbs(c[order]))
        sums.add(float(score_mod.from_limbs(acc)[0]))
    assert len(sums) == 1
    np.testing.assert_allclose(sums.pop(), c.astype(np.float64).sum(), rtol=1e-7, atol=1e-9)


def test_xla_kernels_ignore_row_order(small_data):
    """Rows of a batch in any order (so the scatters apply their updates in another order) give the same bits
    from both XLA kernels."""
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids, use_idf=True)
    agg = jasmk.aggregate_images(centroids, feats, ids, binary=True, multiple_assignment=5, sort=False)
    batch = next(engine.batches(agg, **engine.layout(index)))
    perm = np.random.default_rng(0).permutation(batch.n_rows)
    shuffled = engine.Batch(batch.ids, batch.vecs.copy(), batch.words.copy(), batch.slots.copy(), batch.n_rows,
                            batch.max_rows, batch.n_queries, batch.q_scale)
    for a in ("vecs", "words", "slots"):
        getattr(shuffled, a)[: batch.n_rows] = getattr(batch, a)[: batch.n_rows][perm]
    for kind in ("dense", "sparse-xla"):
        a = [np.asarray(o) for _, _, o in engine.score_segments(index, batch, 3.0, 0.0, kernel=kind)]
        b = [np.asarray(o) for _, _, o in engine.score_segments(index, shuffled, 3.0, 0.0, kernel=kind)]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_eval_refuses_masks_beyond_memory(monkeypatch):
    """One ground-truth id of 10**9 would need [n_query, 10**9] masks: refused up front, naming the fix."""
    from jasmk import evaluation as jeval
    from jasmk.core import memory

    monkeypatch.setattr(memory, "host_budget", lambda: (2**30, "a test budget"))
    gnd = [{"easy": [0, 10**9], "hard": [], "junk": []}, {"easy": [1], "hard": [2], "junk": []}]
    with pytest.raises(ValueError, match="renumber the database"):
        jeval.evaluate_revisited(np.array([[0, 1, 2], [1, 2, 0]]), gnd)
