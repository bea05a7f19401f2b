"""jasmk's ranks and scores against asmk 0.1.1 run on the same data with the same centroids."""

import numpy as np
import pytest
from helpers import asmk_params, asmk_with_centroids, assert_same_ranking, clustered_data, dense_from_ranks

import jasmk

pytest.importorskip("asmk")

CASES = [
    # binary, use_idf, ma_build, ma_query, alpha, threshold
    (True, False, 1, 5, 3.0, 0.0),
    (True, True, 1, 5, 3.0, 0.0),
    (False, False, 1, 5, 3.0, 0.0),
    (False, True, 1, 5, 3.0, 0.0),
    (True, False, 1, 1, 1.0, -1.0),
    (False, True, 5, 5, 2.0, 0.1),
    (False, False, 1, 1, 1.0, -1.0),
    (True, True, 5, 1, 3.0, 0.25),
]


@pytest.mark.parametrize("binary,use_idf,ma_build,ma_query,alpha,threshold", CASES)
def test_query_matches_asmk(small_data, binary, use_idf, ma_build, ma_query, alpha, threshold):
    feats, ids, centroids = small_data
    params = asmk_params(size=centroids.shape[0], binary=binary, use_idf=use_idf, ma_build=ma_build,
                         ma_query=ma_query, alpha=alpha, threshold=threshold)
    ref = asmk_with_centroids(params, centroids).build_ivf(feats, ids.copy())
    _, ref_images, ref_ranks, ref_scores = ref.query_ivf(feats, ids)

    index = jasmk.build_index(feats, ids, codebook=centroids, binary=binary, use_idf=use_idf,
                              multiple_assignment=ma_build)
    res = jasmk.query(index, feats, ids, multiple_assignment=ma_query, alpha=alpha, similarity_threshold=threshold)
    np.testing.assert_array_equal(res.ids, ref_images)
    assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)
    # the self-match is the best result whenever the scene structure makes scores positive
    if threshold <= 0 and not use_idf:
        assert (res.ranks[:, 0] == res.ids).mean() > 0.9

    # dense matrix = MASt3R's reconstruction from asmk's ranks and scores
    dense = jasmk.score_matrix(index, feats, ids, multiple_assignment=ma_query, alpha=alpha,
                               similarity_threshold=threshold)
    np.testing.assert_allclose(dense, dense_from_ranks(ref_ranks, ref_scores, index.n_images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("binary", [True, False])
def test_topk_and_separate_queries(small_data, binary):
    feats, ids, centroids = small_data
    db, qmask = ids < 16, ids >= 16
    params = asmk_params(size=centroids.shape[0], binary=binary, topk=5)
    ref = asmk_with_centroids(params, centroids).build_ivf(feats[db], ids[db].copy())
    _, ref_images, ref_ranks, ref_scores = ref.query_ivf(feats[qmask], ids[qmask])
    index = jasmk.build_index(feats[db], ids[db], codebook=centroids, binary=binary)
    res = jasmk.query(index, feats[qmask], ids[qmask], topk=5)
    assert res.ranks.shape == (8, 5)
    np.testing.assert_array_equal(res.ids, ref_images)
    assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)


def test_ties_duplicate_images(small_data):
    """Exact duplicates of an image score exactly the same: the tie is ranked by ascending id."""
    feats, ids, centroids = small_data
    first = feats[ids == 0]
    dup_feats = np.concatenate([feats, first, first])
    dup_ids = np.concatenate([ids, np.full(len(first), 24), np.full(len(first), 25)])
    for binary in (True, False):
        params = asmk_params(size=centroids.shape[0], binary=binary, use_idf=True)
        ref = asmk_with_centroids(params, centroids).build_ivf(dup_feats, dup_ids.copy())
        _, _, ref_ranks, ref_scores = ref.query_ivf(first, np.zeros(len(first), int))
        index = jasmk.build_index(dup_feats, dup_ids, codebook=centroids, binary=binary, use_idf=True)
        res = jasmk.query(index, first, np.zeros(len(first), int))
        assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)
        assert res.scores[0, 0] == res.scores[0, 1] == res.scores[0, 2]
        np.testing.assert_array_equal(res.ranks[0, :3], [0, 24, 25])


def test_incremental_add_matches_asmk_builder(small_data):
    feats, ids, centroids = small_data
    params = asmk_params(size=centroids.shape[0], binary=True, use_idf=True)
    builder = asmk_with_centroids(params, centroids).create_ivf_builder()
    parts = [ids < 8, (ids >= 8) & (ids < 20), ids >= 20]
    for m in parts:
        builder.add(feats[m], ids[m].copy())
    ref = asmk_with_centroids(params, centroids).add_ivf_builder(builder)
    _, _, ref_ranks, ref_scores = ref.query_ivf(feats, ids)

    index = jasmk.build_index(feats[parts[0]], ids[parts[0]], codebook=centroids, use_idf=True)
    for m in parts[1:]:
        index = jasmk.add_images(index, feats[m], ids[m])
    res = jasmk.query(index, feats, ids)
    assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)
    # asmk refreshes idf only for the words an add touches: the incremental index differs from a one-shot one
    np.testing.assert_allclose(np.asarray(index.idf), ref.inverted_file.idf, rtol=1e-6)
    with pytest.raises(ValueError, match="already in the index"):
        jasmk.add_images(index, feats[parts[0]], ids[parts[0]])


def test_distractors_match_asmk(tmp_path, small_data):
    feats, ids, centroids = small_data
    dmask, qmask = ids < 12, ids >= 12
    params = asmk_params(size=centroids.shape[0], binary=True, use_idf=True)
    path = str(tmp_path / "distractors.pkl")
    asmk_with_centroids(params, centroids).build_ivf(feats[dmask], ids[dmask].copy(), cache_path=path)
    qids = ids[qmask] - 12
    ref = asmk_with_centroids(params, centroids).build_ivf(feats[qmask], qids.copy(), distractors_path=path)
    _, _, ref_ranks, ref_scores = ref.query_ivf(feats[qmask], qids)

    distractors = jasmk.build_index(feats[dmask], ids[dmask], codebook=centroids, use_idf=True)
    index = jasmk.build_index(feats[qmask], qids, codebook=centroids, use_idf=True, distractors=distractors)
    assert index.imid_offset == 12 and index.n_images == 24
    res = jasmk.query(index, feats[qmask], qids)
    assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)
    assert res.ranks.min() < 0  # distractor images come back with negative ids, as in asmk


@pytest.mark.parametrize("use_idf", [False, True])
def test_larger_codebook_with_gaps_in_ids(use_idf):
    """Non-contiguous image ids (1, 3, ..., 59 and a jump to 200,000). jasmk.compat keeps asmk's numbers: gap ids
    count in idf's n_images and rank with score 0 in full rankings. jasmk's own index keeps only the 31 images
    (ids are names): the same ranking of the real images; the same scores without idf, and with idf the scores
    of an index over ids 0..30 (idf counts the images there)."""
    from jasmk.compat import asmk_method

    rng = np.random.default_rng(3)
    feats, ids = clustered_data(rng, n_images=31, per_image=80, dim=64)
    ids = np.where(ids == 30, 200_000, ids * 2 + 1)  # a gap wider than a segment
    cb = jasmk.train_codebook(feats, size=256)
    centroids = np.asarray(cb.centroids)
    params = asmk_params(size=256, binary=True, use_idf=use_idf)
    ref = asmk_with_centroids(params, centroids).build_ivf(feats, ids.copy())
    _, ref_images, ref_ranks, ref_scores = ref.query_ivf(feats, ids)
    assert ref_ranks.shape == (31, 200_001)
    ours = asmk_method.ASMKMethod(params, {}, codebook=jasmk.Codebook.from_centroids(centroids, size_param=256))
    _, images, ranks, scores = ours.build_ivf(feats, ids.copy()).query_ivf(feats, ids)
    np.testing.assert_array_equal(images, ref_images)
    assert_same_ranking(ranks, scores, ref_ranks, ref_scores)

    index = jasmk.build_index(feats, ids, codebook=cb, use_idf=use_idf)
    assert index.n_images == 31 and index.image_ids.tolist() == sorted(set(ids.tolist()))
    # asmk quantizes each query image on its own; faiss's BLAS path can order near-tied 5th neighbours
    # differently for a batch of all images, so the queries here are quantized per image, as asmk does
    words = np.concatenate([jasmk.quantize(cb, feats[ids == i], multiple_assignment=5) for i in np.unique(ids)])
    res = jasmk.query(index, feats, ids, word_ids=words)
    np.testing.assert_array_equal(res.ids, ref_images)
    assert res.ranks.shape == (31, 31)
    if not use_idf:
        assert_same_ranking(res.ranks, res.scores, ref_ranks[:, :31], ref_scores[:, :31])
    dense_ids = np.searchsorted(np.unique(ids), ids)  # the same images numbered 0..30
    dense = jasmk.build_index(feats, dense_ids, codebook=cb, use_idf=use_idf)
    back = jasmk.query(dense, feats, dense_ids, word_ids=words)
    np.testing.assert_array_equal(res.scores, back.scores)
    np.testing.assert_array_equal(res.ranks, index.image_ids[back.ranks])
    S = jasmk.score_matrix(index, feats, ids, word_ids=words)
    assert S.shape == (31, 31)
    np.testing.assert_array_equal(S, jasmk.score_matrix(dense, feats, dense_ids, word_ids=words))
