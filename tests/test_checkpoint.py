"""Orbax checkpoints of codebook and index (round trip, atomic writes, clear errors) and asmk pickle import/export."""

import os
import pickle

import numpy as np
import pytest
from conftest import asmk_params, asmk_with_centroids, assert_same_ranking

import jasmk
from jasmk.storage import checkpoint


def test_codebook_and_index_round_trip(tmp_path, small_data):
    feats, ids, centroids = small_data
    cb = jasmk.Codebook.from_centroids(centroids, size_param=64)
    index = jasmk.build_index(feats, ids, codebook=cb, use_idf=True)
    checkpoint.save_codebook(tmp_path / "cb", cb)
    checkpoint.save_index(tmp_path / "idx", index)
    cb2 = checkpoint.load_codebook(tmp_path / "cb")
    np.testing.assert_array_equal(np.asarray(cb2.centroids), centroids)
    assert cb2.size_param == 64
    index2 = checkpoint.load_index(tmp_path / "idx")
    for name in ("n_images", "n_entries", "max_count", "imid_offset", "binary", "use_idf", "dim"):
        assert getattr(index2, name) == getattr(index, name)
    a = jasmk.query(index, feats, ids)
    b = jasmk.query(index2, feats, ids)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, small_data):
    feats, ids, centroids = small_data
    old = jasmk.build_index(feats[ids < 10], ids[ids < 10], codebook=centroids)
    checkpoint.save_index(tmp_path / "idx", old)
    new = jasmk.build_index(feats, ids, codebook=centroids)

    import orbax.checkpoint as ocp

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_index(tmp_path / "idx", new)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temporary left behind
    loaded = checkpoint.load_index(tmp_path / "idx")
    assert loaded.n_images == 10
    np.testing.assert_array_equal(jasmk.query(loaded, feats, ids).ranks, jasmk.query(old, feats, ids).ranks)
    checkpoint.save_index(tmp_path / "idx", new)  # a completed save replaces it
    assert checkpoint.load_index(tmp_path / "idx").n_images == 24


def test_bad_checkpoints_raise_value_error(tmp_path, small_data):
    feats, ids, centroids = small_data
    checkpoint.save_codebook(tmp_path / "cb", jasmk.Codebook.from_centroids(centroids))
    checkpoint.save_index(tmp_path / "idx", jasmk.build_index(feats, ids, codebook=centroids))
    with pytest.raises(ValueError, match="not an index"):
        checkpoint.load_index(tmp_path / "cb")
    with pytest.raises(ValueError, match="not a codebook"):
        checkpoint.load_codebook(tmp_path / "idx")
    with pytest.raises(ValueError, match="no jasmk checkpoint"):
        checkpoint.load_index(tmp_path / "nothing")
    live = checkpoint._version_dir  # the folder holding the live arrays/ and meta.json
    with open(os.path.join(live(tmp_path / "idx"), "meta.json"), "w") as handle:
        handle.write("{ not json")
    with pytest.raises(ValueError, match="corrupt checkpoint meta"):
        checkpoint.load_index(tmp_path / "idx")
    import shutil

    shutil.rmtree(os.path.join(live(tmp_path / "cb"), "arrays"))
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        checkpoint.load_codebook(tmp_path / "cb")
    with pytest.raises(ValueError, match="JSON"):
        checkpoint.save_tree(tmp_path / "x", {"a": np.zeros(2)}, meta={"bad": object()})


@pytest.mark.parametrize("binary,use_idf", [(True, False), (True, True), (False, False), (False, True)])
def test_import_asmk_pickles(tmp_path, small_data, binary, use_idf):
    from asmk import asmk_method

    feats, ids, _ = small_data
    params = asmk_params(size=64, binary=binary, use_idf=use_idf)
    cb_path, ivf_path = str(tmp_path / "cb.pkl"), str(tmp_path / "ivf.pkl")
    ref = asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(feats, cache_path=cb_path)
    ref = ref.build_ivf(feats, ids.copy(), cache_path=ivf_path)
    _, _, ref_ranks, ref_scores = ref.query_ivf(feats, ids)

    cb = checkpoint.load_asmk_codebook(cb_path)
    index = checkpoint.load_asmk_ivf(ivf_path, cb)
    assert index.binary == binary and index.use_idf == use_idf
    res = jasmk.query(index, feats, ids)
    assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)

    # export back: asmk searches jasmk's index identically
    from asmk import inverted_file

    state = pickle.loads(pickle.dumps(checkpoint.export_asmk_ivf(jasmk.build_index(
        feats, ids, codebook=cb, binary=binary, use_idf=use_idf))))
    ivf = inverted_file.IVF.initialize_from_state(state)
    np.testing.assert_allclose(ivf.norm_factor, ref.inverted_file.norm_factor, rtol=1e-6)
    np.testing.assert_allclose(ivf.idf, ref.inverted_file.idf, rtol=1e-6)
    exported = asmk_with_centroids(params, np.asarray(cb.centroids))
    exported = asmk_method.ASMKMethod(params, {}, codebook=exported.codebook, kernel=ref.kernel, inverted_file=ivf)
    _, _, r2, s2 = exported.query_ivf(feats, ids)
    assert_same_ranking(r2, s2, ref_ranks, ref_scores)


def test_compat_ivf_cache_and_distractors_paths(tmp_path, small_data):
    """jasmk.compat pickles its ivf in asmk's format: asmk loads jasmk's cache and vice versa."""
    from jasmk.compat import asmk_method

    feats, ids, centroids = small_data
    params = asmk_params(size=64, use_idf=True)
    cache = str(tmp_path / "ivf.pkl")
    ours = asmk_method.ASMKMethod(params, {}, codebook=jasmk.Codebook.from_centroids(centroids, size_param=64))
    built = ours.build_ivf(feats, ids, cache_path=cache)
    _, _, r1, s1 = built.query_ivf(feats, ids)
    ref = asmk_with_centroids(params, centroids).build_ivf(None, None, cache_path=cache)  # loads jasmk's pickle
    _, _, r2, s2 = ref.query_ivf(feats, ids)
    assert_same_ranking(r1, s1, r2, s2)
    reloaded = ours.build_ivf(None, None, cache_path=cache)
    assert "load_time" in reloaded.metadata["build_ivf"]
    _, _, r3, s3 = reloaded.query_ivf(feats, ids)
    np.testing.assert_allclose(s3, s1, atol=1e-6)

    # distractors: asmk's pickle as jasmk's distractor set
    dpath = str(tmp_path / "distractors.pkl")
    asmk_with_centroids(params, centroids).build_ivf(feats[ids < 12], ids[ids < 12].copy(), cache_path=dpath)
    q = ids >= 12
    with_d = ours.build_ivf(feats[q], ids[q] - 12, distractors_path=dpath)
    ref_d = asmk_with_centroids(params, centroids).build_ivf(feats[q], ids[q] - 12, distractors_path=dpath)
    _, _, r4, s4 = with_d.query_ivf(feats[q], ids[q] - 12)
    _, _, r5, s5 = ref_d.query_ivf(feats[q], ids[q] - 12)
    assert_same_ranking(r4, s4, r5, s5)
    with pytest.raises(ValueError, match="not an asmk IVF"):
        checkpoint.load_asmk_ivf({"type": "Codebook"}, jasmk.Codebook.from_centroids(centroids))
