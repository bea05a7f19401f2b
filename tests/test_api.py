"""The short call ``jasmk.build_index(feats, ids)`` (a codebook trained on a seeded sample of the features) and
``query_ids=`` (a result row for every named query image, also one without descriptors), against numpy
re-derivations and asmk 0.1.1."""

import logging

import numpy as np
import pytest
from helpers import asmk_params, asmk_with_centroids, assert_same_ranking, clustered_data, dense_from_ranks

import jasmk
from jasmk import api
from jasmk.core import ivf


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def jasmk_records():
    """INFO records of the ``jasmk`` loggers (a handler on ``jasmk`` itself: the CLI may have stopped its
    propagation to the root logger earlier in this process)."""
    logger = logging.getLogger("jasmk")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    return clustered_data(rng, n_images=30, per_image=100, dim=16)  # 3000 descriptors


def _expected_words(m):
    """Largest power of two with at least 39 of ``m`` descriptors per word, at most 65536 (numpy re-derivation)."""
    return int(min(65536, 2 ** np.floor(np.log2(m / 39))))


def test_short_call_trains_on_all_descriptors_and_logs_one_line(data, jasmk_records):
    feats, ids = data
    index = jasmk.build_index(feats, ids)
    info = [r for r in jasmk_records if r.levelno == logging.INFO]
    k = _expected_words(feats.shape[0])
    assert k == 64 and index.n_words == k and index.n_images == 30
    # all 3000 descriptors are below the sample cap: the codebook is train_codebook on them, seed 1234
    ref = jasmk.train_codebook(feats, size=k, seed=1234)
    np.testing.assert_array_equal(np.asarray(index.centroids), np.asarray(ref.centroids))
    assert len(info) == 1, [r.getMessage() for r in info]
    msg = info[0].getMessage()
    assert "64 words" in msg and "3000 of the 3000 descriptors" in msg and "seed 1234" in msg


def test_sampled_codebook_equals_train_codebook_on_the_same_sample(data):
    feats, ids = data
    seed, sample = 5, 1500
    index = jasmk.build_index(feats, ids, seed=seed, codebook_sample=sample)
    rows = np.sort(np.random.default_rng(seed).choice(feats.shape[0], sample, replace=False))
    k = _expected_words(sample)
    assert k == 32
    ref = jasmk.train_codebook(feats[rows], size=k, seed=seed)
    np.testing.assert_array_equal(np.asarray(index.centroids), np.asarray(ref.centroids))
    # and the index is the one built with that codebook given explicitly
    given = jasmk.build_index(feats, ids, codebook=ref)
    a, b = jasmk.score_matrix(index, feats, ids), jasmk.score_matrix(given, feats, ids)
    np.testing.assert_array_equal(a, b)
    # another seed draws another sample
    other = jasmk.build_index(feats, ids, seed=seed + 1, codebook_sample=sample)
    assert not np.array_equal(np.asarray(other.centroids), np.asarray(index.centroids))


def test_plan_bounds():
    rows, k = api.auto_codebook_plan(3_000_000, sample=2_600_000, seed=3)
    assert k == 65536  # 2.6M / 39 = 66666 words would fit: capped at 64k
    expect = np.sort(np.random.default_rng(3).choice(3_000_000, 2_600_000, replace=False))
    np.testing.assert_array_equal(rows, expect)
    rows, k = api.auto_codebook_plan(10_000_000, seed=0)  # default sample: a few hundred thousand
    assert rows.size == api.AUTO_SAMPLE <= 300_000 and k == _expected_words(rows.size) == 4096
    assert rows.size / k >= 39 and np.all(np.diff(rows) > 0) and rows[-1] < 10_000_000
    rows, k = api.auto_codebook_plan(624)
    assert k == 16 and rows.size == 624
    assert api.auto_codebook_plan(39 * 64 - 1)[1] == 32 and api.auto_codebook_plan(39 * 64)[1] == 64
    with pytest.raises(ValueError, match=r"at least 624 descriptors .*got 623.*codebook="):
        api.auto_codebook_plan(623)
    with pytest.raises(ValueError, match=r"got 600 \(codebook_sample=600\)"):
        api.auto_codebook_plan(5000, sample=600)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="codebook_sample"):
            api.auto_codebook_plan(5000, sample=bad)
    with pytest.raises(ValueError, match="seed"):
        api.auto_codebook_plan(5000, seed=-2)


def test_too_few_descriptors_is_a_clear_error(data):
    feats, ids = data
    with pytest.raises(ValueError, match=r"needs at least 624 descriptors.*got 600.*codebook="):
        jasmk.build_index(feats[:600], ids[:600])
    with pytest.raises(ValueError, match="word_ids were given without the codebook"):
        jasmk.build_index(feats, ids, word_ids=np.zeros((feats.shape[0], 1), np.int32))
    with pytest.raises(ValueError, match="not grouped"):  # bad ids fail before the k-means
        jasmk.build_index(feats, ids[::-1].copy())
    with pytest.raises(ValueError, match="codebook is required, got None"):  # an unset variable, not "train"
        jasmk.build_index(feats, ids, codebook=None)
    with pytest.raises(ValueError, match="got '64k'"):
        jasmk.build_index(feats, ids, codebook="64k")


def test_trained_codebook_serves_queries_and_checkpoints(tmp_path, data):
    from jasmk.storage import checkpoint

    feats, ids = data
    index = jasmk.build_index(feats, ids)
    centroids = np.asarray(index.centroids)
    q = ids < 8
    res = jasmk.query(index, feats[q], ids[q])
    # asmk with the same centroids: the queries are quantized with the index's codebook
    params = asmk_params(size=centroids.shape[0])
    ref = asmk_with_centroids(params, centroids).build_ivf(feats, ids.copy())
    _, ref_images, ref_ranks, ref_scores = ref.query_ivf(feats[q], ids[q])
    np.testing.assert_array_equal(res.ids, ref_images)
    assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)
    # the checkpoint keeps the codebook: the loaded index answers the same
    checkpoint.save_index(str(tmp_path / "idx"), index)
    loaded = checkpoint.load_index(str(tmp_path / "idx"))
    np.testing.assert_array_equal(np.asarray(loaded.centroids), centroids)
    again = jasmk.query(loaded, feats[q], ids[q])
    np.testing.assert_array_equal(again.ranks, res.ranks)
    np.testing.assert_array_equal(again.scores, res.scores)
    # a distractor index lends its codebook to the next build
    more = jasmk.build_index(feats[ids >= 20], ids[ids >= 20] - 20, distractors=loaded)
    np.testing.assert_array_equal(np.asarray(more.centroids), centroids)
    assert more.imid_offset == 30


# ---------------------------------------------------------------------------------------------------------
# query_ids


@pytest.fixture(scope="module")
def with_empty_word(small_data):
    """small_data plus one centroid far from every descriptor (a word no database image uses) and a query
    descriptor sitting on it: with one assignment its scores are all zero, in asmk as in jasmk."""
    feats, ids, centroids = small_data
    far = np.full((1, centroids.shape[1]), 50.0, np.float32)
    return feats, ids, np.concatenate([centroids, far]), far


def _asmk_zero_row(params, centroids, far, build):
    """asmk's ranks and scores for a query whose one descriptor lands in an empty word."""
    ref = build(asmk_with_centroids(params, centroids))
    step = {**params["query_ivf"], "quantize": {"multiple_assignment": 1}}
    _, _, ranks, scores = ref.query_ivf(far, np.array([0]), step_params=step)
    return ranks[0], scores[0]


@pytest.mark.parametrize("topk", [None, 7])
def test_query_ids_give_every_named_image_a_row(with_empty_word, topk):
    feats, ids, centroids, far = with_empty_word
    params = asmk_params(size=centroids.shape[0], topk=topk)
    db = ids >= 6
    q = ids < 6  # query images 0..5 have descriptors; 40 is named without any
    ref = asmk_with_centroids(params, centroids).build_ivf(feats[db], ids[db].copy())
    _, ref_images, ref_ranks, ref_scores = ref.query_ivf(feats[q], ids[q])
    zero_ranks, zero_scores = _asmk_zero_row(params, centroids, far,
                                             lambda m: m.build_ivf(feats[db], ids[db].copy()))
    assert np.all(zero_scores == 0) and zero_ranks.shape == (24 if topk is None else topk,)

    # asmk numbers the database 0..23 (ids 0..5 are a gap): asmk's dense layout (jasmk.compat's) ranks them too
    index = jasmk.add_images(ivf.empty(centroids, binary=True, use_idf=False, dense_ids=True), feats[db], ids[db])
    compact = jasmk.build_index(feats[db], ids[db], codebook=centroids)  # jasmk's: 18 images, ids 6..23
    np.testing.assert_array_equal(compact.image_ids, np.arange(6, 24))
    named = np.array([3, 0, 40, 1, 2, 4, 5])
    res = jasmk.query(index, feats[q], ids[q], topk=topk, query_ids=named)
    np.testing.assert_array_equal(res.ids, named)
    order = [int(np.flatnonzero(ref_images == i)[0]) for i in (3, 0, 1, 2, 4, 5)]
    have = [0, 1, 3, 4, 5, 6]
    assert_same_ranking(res.ranks[have], res.scores[have], ref_ranks[order], ref_scores[order])
    # asmk's all-zero row is np.argsort(-scores): numpy >= 2 gives ascending ids, numpy 1.x's unstable
    # quicksort another permutation of the ties; jasmk gives ascending ids (the stable order) on any numpy
    np.testing.assert_array_equal(res.ranks[2], np.argsort(-np.zeros(24), kind="stable")[:topk])
    np.testing.assert_array_equal(res.scores[2], zero_scores.astype(np.float32))
    if topk is None:  # the same set as asmk's, every position a tie
        assert_same_ranking(res.ranks[2:3], res.scores[2:3], zero_ranks[None], zero_scores[None])
    assert res.ranks.dtype == np.int64 and res.scores.dtype == np.float32

    # without query_ids: unchanged (asmk's rows, the image without descriptors absent)
    plain = jasmk.query(index, feats[q], ids[q], topk=topk)
    np.testing.assert_array_equal(plain.ids, ref_images)
    assert_same_ranking(plain.ranks, plain.scores, ref_ranks, ref_scores)
    np.testing.assert_array_equal(res.ranks[have], plain.ranks[[3, 0, 1, 2, 4, 5]])
    # compact ids: the same ranking without the gap's zero-scored ids
    small = jasmk.query(compact, feats[q], ids[q], topk=topk, query_ids=named)
    k = 18 if topk is None else topk
    assert small.ranks.shape == (7, k)
    real = res.ranks >= 6
    for r in range(7):  # the dense layout's top k holds some gap ids: compare what it holds of the real ones
        n = int(real[r].sum())
        np.testing.assert_array_equal(small.ranks[r, :n], res.ranks[r][real[r]])
        np.testing.assert_array_equal(small.scores[r, :n], res.scores[r][real[r]])

    # the same through query_aggregated
    agg = jasmk.aggregate_images(centroids, feats[q], ids[q], binary=True, multiple_assignment=5, sort=False)
    res2 = jasmk.query_aggregated(index, agg, topk=topk, query_ids=named)
    np.testing.assert_array_equal(res2.ranks, res.ranks)
    np.testing.assert_array_equal(res2.scores, res.scores)


def test_score_matrix_query_ids(with_empty_word):
    feats, ids, centroids, _ = with_empty_word
    params = asmk_params(size=centroids.shape[0])
    db, q = ids >= 6, ids < 6
    ref = asmk_with_centroids(params, centroids).build_ivf(feats[db], ids[db].copy())
    _, ref_images, ref_ranks, ref_scores = ref.query_ivf(feats[q], ids[q])
    dense_ref = dense_from_ranks(ref_ranks, ref_scores, 24)
    index = jasmk.add_images(ivf.empty(centroids, binary=True, use_idf=False, dense_ids=True), feats[db], ids[db])
    named = [5, 77, 0, 1, 2, 3, 4]
    S = jasmk.score_matrix(index, feats[q], ids[q], query_ids=named)
    assert S.shape == (7, 24) and S.dtype == np.float32
    compact = jasmk.build_index(feats[db], ids[db], codebook=centroids)  # columns: compact.image_ids = 6..23
    np.testing.assert_array_equal(jasmk.score_matrix(compact, feats[q], ids[q], query_ids=named),
                                  S[:, compact.image_ids])
    np.testing.assert_array_equal(S[1], 0)
    for row, image in enumerate(named):
        if image != 77:
            np.testing.assert_allclose(S[row], dense_ref[int(np.flatnonzero(ref_images == image)[0])], atol=1e-5)
    np.testing.assert_array_equal(jasmk.score_matrix(index, feats[q], ids[q]), S[[2, 3, 4, 5, 6, 0]])
    agg = jasmk.aggregate_images(centroids, feats[q], ids[q], binary=True, multiple_assignment=5, sort=False)
    np.testing.assert_array_equal(jasmk.score_matrix_aggregated(index, agg, query_ids=named), S)
    # only images without descriptors: all rows zero, nothing to quantize
    empty = np.zeros((0, feats.shape[1]), np.float32)
    np.testing.assert_array_equal(jasmk.score_matrix(index, empty, np.zeros(0, int), query_ids=[9, 2]),
                                  np.zeros((2, 24), np.float32))
    res = jasmk.query(index, empty, np.zeros(0, int), query_ids=[9], topk=3)
    np.testing.assert_array_equal(res.ranks, [[0, 1, 2]])
    with pytest.raises(ValueError, match="descriptors is empty"):
        jasmk.query(index, empty, np.zeros(0, int))


def test_query_ids_with_distractors_match_asmk(tmp_path, with_empty_word):
    feats, ids, centroids, far = with_empty_word
    params = asmk_params(size=centroids.shape[0])
    dmask, qmask = ids < 12, ids >= 12
    path = str(tmp_path / "distractors.pkl")
    asmk_with_centroids(params, centroids).build_ivf(feats[dmask], ids[dmask].copy(), cache_path=path)
    qids = ids[qmask] - 12
    zero_ranks, _ = _asmk_zero_row(params, centroids, far,
                                   lambda m: m.build_ivf(feats[qmask], qids.copy(), distractors_path=path))
    assert sorted(zero_ranks) == list(range(-12, 12))  # distractors with negative ids, as asmk reports them
    distractors = jasmk.build_index(feats[dmask], ids[dmask], codebook=centroids)
    index = jasmk.build_index(feats[qmask], qids, distractors=distractors)
    res = jasmk.query(index, feats[qmask & (ids < 14)], qids[qids < 2], query_ids=[0, 1, 30])
    np.testing.assert_array_equal(res.ranks[2], np.arange(24) - 12)  # ascending internal ids: distractors first
    assert np.all(res.scores[2] == 0) and np.any(res.scores[:2] > 0)


def test_query_ids_bad_input(small_data):
    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    q = ids < 3
    cases = [([0, 1], r"image\(s\) \[2\] are not named"), ([0, 1, 2, 2], "more than once"),
             ([], "empty"), ([[0, 1, 2]], "1-D"), ([0.0, 1.0, 2.0], "integers"), ([-1, 0, 1, 2], "non-negative")]
    for named, match in cases:
        with pytest.raises(ValueError, match=match):
            jasmk.query(index, feats[q], ids[q], query_ids=named)
        with pytest.raises(ValueError, match=match):
            jasmk.score_matrix(index, feats[q], ids[q], query_ids=named)
