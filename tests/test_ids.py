"""Image ids are names: any non-negative int64 id, any gap, costs memory and time in the number of images (an id
map from dense internal slots to the ids), and every result speaks the ids given."""

import jax
import numpy as np
import pytest

import jasmk
from jasmk import pairs
from jasmk.core import ivf
from jasmk.storage import checkpoint

D = 32


def _data(ids, per=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.asarray(ids, np.int64), per)
    return rng.standard_normal((ids.size, D)).astype(np.float32), ids


@pytest.mark.parametrize("far", [10**9, 2**40, 2**62])
def test_huge_and_sparse_ids_cost_nothing(tmp_path, far, monkeypatch):
    """{0, 7, far}: three images, three slots, whatever ``far`` is (asmk would allocate ``far + 1`` slots); the
    results are those of the ids 0, 1, 2 with the ids put back, through query, score matrix, save and load."""
    from jasmk.core import memory

    feats, ids = _data([0, 7, far])
    cb = feats[::5]
    dense_ids = np.searchsorted(np.unique(ids), ids)
    monkeypatch.setattr(memory, "host_budget", lambda: (64 << 20, "a 64 MiB test budget"))
    monkeypatch.setattr(memory, "MIN_CHECKED", 0)
    index = jasmk.build_index(feats, ids, codebook=cb, use_idf=True)
    ref = jasmk.build_index(feats, dense_ids, codebook=cb, use_idf=True)
    assert index.n_images == 3 and index.image_ids.tolist() == [0, 7, far]
    got, want = jasmk.query(index, feats, ids), jasmk.query(ref, feats, dense_ids)
    np.testing.assert_array_equal(got.ids, [0, 7, far])
    np.testing.assert_array_equal(got.ranks, index.image_ids[want.ranks])
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.ranks.dtype == np.int64
    np.testing.assert_array_equal(jasmk.score_matrix(index, feats, ids), jasmk.score_matrix(ref, feats, dense_ids))
    checkpoint.save_index(tmp_path / "idx", index)
    back = checkpoint.load_index(tmp_path / "idx")
    assert back.ids == index.ids and back.n_images == 3
    again = jasmk.query(back, feats, ids)
    np.testing.assert_array_equal(again.ranks, got.ranks)
    np.testing.assert_array_equal(again.scores, got.scores)
    # the jitted form returns JAX arrays: int32 ids unless jax_enable_x64
    padded, valid = feats.reshape(3, 12, D), np.ones((3, 12), bool)
    if far < 2**31:
        ranks, scores = jasmk.query_padded(index, padded, valid, topk=3)
        np.testing.assert_array_equal(np.asarray(ranks), got.ranks)
        np.testing.assert_allclose(np.asarray(scores), got.scores, rtol=1e-6)
        # inside a user's jit, the index traced too (the id map is static metadata)
        traced = jax.jit(lambda i, f, v: jasmk.query_padded(i, f, v, topk=3))(index, padded, valid)
        np.testing.assert_array_equal(np.asarray(traced[0]), got.ranks)
    else:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            jasmk.query_padded(index, padded, valid, topk=3)


def test_ids_must_be_new_larger_and_non_negative():
    feats, ids = _data([3, 10])
    index = jasmk.build_index(feats, ids, codebook=feats[::5])
    with pytest.raises(ValueError, match="not larger than every id already in the index.*next free id is 11"):
        jasmk.add_images(index, feats[:12], np.full(12, 10))  # already there
    with pytest.raises(ValueError, match="not larger"):
        jasmk.add_images(index, feats[:12], np.full(12, 5))  # in a gap: ids increase across adds
    with pytest.raises(ValueError, match="non-negative"):
        jasmk.build_index(feats, ids - 4, codebook=feats[::5])
    more = jasmk.add_images(index, feats[:12], np.full(12, 11))
    assert more.image_ids.tolist() == [3, 10, 11] and index.image_ids.tolist() == [3, 10]  # index unchanged


def test_distractors_keep_negative_ids_with_gaps():
    """asmk's distractor convention under compact ids: the distractors' ids come back negative (id minus the
    offset, the largest distractor name + 1), the added images' ids as given."""
    feats, ids = _data([0, 5, 9])
    distractors = jasmk.build_index(feats, ids, codebook=feats[::5])
    qf, qi = _data([2, 1000], seed=1)
    index = jasmk.build_index(qf, qi, codebook=feats[::5], distractors=distractors)
    assert index.imid_offset == 10
    assert index.image_ids.tolist() == [-10, -5, -1, 2, 1000]
    res = jasmk.query(index, qf, qi)
    assert set(res.ranks.ravel().tolist()) == {-10, -5, -1, 2, 1000}
    assert res.ranks[0, 0] == 2 and res.ranks[1, 0] == 1000  # each image finds itself first


def test_pairs_from_an_index_with_gapped_ids():
    """MASt3R-SfM's retrieval graph from an index of gapped ids: the graph of the renumbered collection, in ids."""
    names = np.array([4, 9, 10, 30, 31, 200, 201, 5000])
    feats, ids = _data(names)
    dense_ids = np.searchsorted(names, ids)
    cb = feats[::7]
    index = jasmk.build_index(feats, ids, codebook=cb)
    ref = jasmk.build_index(feats, dense_ids, codebook=cb)
    q = jasmk.aggregate_images(cb, feats, ids, binary=True, multiple_assignment=5)
    qr = jasmk.aggregate_images(cb, feats, dense_ids, binary=True, multiple_assignment=5)
    got, keys = pairs.retrieval_pairs_from_index(index, q, na=3, k=2)
    want, want_keys = pairs.retrieval_pairs_from_index(ref, qr, na=3, k=2)
    np.testing.assert_array_equal(got, names[want])
    np.testing.assert_array_equal(keys, names[want_keys])
    with pytest.raises(ValueError, match="the index's ids in order"):
        pairs.retrieval_pairs_from_index(index, qr, na=3, k=2)


def test_asmk_export_of_compact_ids_is_dense_and_refused_beyond_memory(monkeypatch):
    """asmk numbers images densely: the export lays compact ids out that way, and refuses up front when that
    layout would not fit."""
    from jasmk.core import memory
    from jasmk.storage import asmk_format

    feats, ids = _data([1, 6])
    index = jasmk.build_index(feats, ids, codebook=feats[::5])
    state = asmk_format.export_asmk_ivf(index)["state"]
    assert state["n_images"] == 7
    assert set(np.concatenate([x for x in state["ivf_image_ids"] if x is not None]).tolist()) == {1, 6}
    assert np.count_nonzero(state["norm_factor"]) == 2
    far = jasmk.build_index(*_data([0, 10**9]), codebook=feats[::5])
    monkeypatch.setattr(memory, "host_budget", lambda: (1 << 30, "a 1 GiB test budget"))
    with pytest.raises(ValueError, match="asmk's dense layout of this index .*1000000001 image slots"):
        asmk_format.export_asmk_ivf(far)
    with pytest.raises(ValueError, match="int32"):
        asmk_format.export_asmk_ivf(jasmk.build_index(*_data([0, 2**40]), codebook=feats[::5]))


def test_the_dense_layout_is_kept_by_compat_and_asmk_imports():
    feats, ids = _data([0, 3])
    dense = jasmk.add_images(ivf.empty(feats[::5], binary=True, use_idf=False, dense_ids=True), feats, ids)
    assert dense.n_images == 4 and dense.ids is None
    res = jasmk.query(dense, feats, ids)
    assert res.ranks.shape == (2, 4)  # gap ids 1 and 2 rank with score 0, as in asmk
