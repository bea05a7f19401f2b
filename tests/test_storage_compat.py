"""Files written by jasmk 0.1 (main before the layer packages; tests/fixtures/v0_1/make.py) load unchanged and
answer as they did: codebook, index (ASMK* and ASMK with idf), sharded index, retrieval head, asmk pickles."""

import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jasmk
from jasmk import compat, head, shard
from jasmk.storage import asmk_format, checkpoint

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v0_1")


@pytest.fixture
def old(tmp_path):
    """A copy of the 0.1 files (loading must not need to write, but a test never risks the fixtures)."""
    out = tmp_path / "v0_1"
    shutil.copytree(HERE, out)
    return str(out), np.load(os.path.join(HERE, "expected.npz"))


def _load(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ValueError as exc:  # the fixtures were written with orbax-checkpoint 0.12
        if "structure file does not exist" in str(exc):
            pytest.skip(f"this orbax-checkpoint cannot read checkpoints of a newer one: {exc}")
        raise


def test_codebook_and_indexes_of_0_1_load_and_answer_the_same(old):
    folder, want = old
    cb = _load(jasmk.load_codebook, os.path.join(folder, "codebook"))
    np.testing.assert_array_equal(cb.centroids, want["centroids"])
    for name, suffix in (("index", ""), ("index_real", "_real")):
        index = jasmk.load_index(os.path.join(folder, name))
        res = jasmk.query(index, want["feats"], want["ids"], topk=10)
        np.testing.assert_array_equal(res.ranks, want["ranks" + suffix])
        np.testing.assert_array_equal(res.scores, want["scores" + suffix])


def test_sharded_index_of_0_1_loads_onto_a_mesh_and_answers_the_same(old):
    folder, want = old
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    sidx = _load(shard.load_sharded_index, os.path.join(folder, "sharded"), mesh)
    res = shard.query(sidx, want["feats"], want["ids"], topk=10)
    np.testing.assert_array_equal(res.ranks, want["sharded_ranks"])
    np.testing.assert_allclose(res.scores, want["sharded_scores"], rtol=0, atol=1e-7)


def test_head_of_0_1_loads_with_its_float64_whitening(old):
    folder, want = old
    config, variables = _load(head.load_head, os.path.join(folder, "head"))
    assert variables["whitening"]["prewhiten"]["p"].dtype == np.float64
    np.testing.assert_array_equal(np.asarray(head.extract_global(variables, config, want["head_x"])),
                                  want["head_global"])
    np.testing.assert_array_equal(np.asarray(head.extract_local(variables, config, want["head_x"])[0]),
                                  want["head_local"])


def test_asmk_pickles_written_through_0_1_compat_load(old):
    folder, want = old
    cb = asmk_format.load_asmk_codebook(os.path.join(folder, "asmk_codebook.pkl"))
    np.testing.assert_array_equal(cb.centroids, want["asmk_centroids"])
    index = asmk_format.load_asmk_ivf(os.path.join(folder, "asmk_ivf.pkl"), cb)
    res = jasmk.query(index, want["feats"], want["ids"])
    np.testing.assert_array_equal(res.ranks, want["asmk_ranks"])
    np.testing.assert_array_equal(res.scores, want["asmk_scores"])
    # and asmk's API reads its caches back
    params = {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": 32}},
              "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                            "quantize": {"multiple_assignment": 1}, "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {}, "search": {"topk": None},
                            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}
    method = compat.ASMKMethod.initialize_untrained(params).train_codebook(
        None, cache_path=os.path.join(folder, "asmk_codebook.pkl"))
    dataset = method.build_ivf(want["feats"], want["ids"], cache_path=os.path.join(folder, "asmk_ivf.pkl"))
    _, _, ranks, scores = dataset.query_ivf(want["feats"], want["ids"])
    np.testing.assert_array_equal(ranks, want["asmk_ranks"])
    np.testing.assert_array_equal(scores, want["asmk_scores"])


def test_format_2_index_of_the_main_before_compact_ids_loads_and_grows(tmp_path):
    """An index saved before compact ids (format 2; ids 0-3 and 9-11 in dense slots, idf on; fixtures/format2)
    loads, answers as it did, grows (new ids take compact slots after its 12) and saves in format 3."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "format2")
    shutil.copytree(os.path.join(here, "index"), tmp_path / "index")
    ans = np.load(os.path.join(here, "answers.npz"))
    index = checkpoint.load_index(tmp_path / "index")
    assert index.n_images == 12 and index.ids is None
    res = jasmk.query(index, ans["feats"], ans["ids"])
    np.testing.assert_array_equal(res.ranks, ans["ranks"])
    np.testing.assert_array_equal(res.scores, ans["scores"])
    grown = jasmk.add_images(index, ans["feats"][:10], np.full(10, 10**6))
    assert grown.n_images == 13 and grown.image_ids[-2:].tolist() == [11, 10**6]
    checkpoint.save_index(tmp_path / "index", grown)
    back = checkpoint.load_index(tmp_path / "index")
    assert back.ids == grown.ids
