"""MASt3R-SfM retrieval-Na-k pairs against a brute-force re-derivation of MASt3R's procedure."""

import numpy as np
import pytest
from helpers import mast3r_oracle

from jasmk import pairs as pr


def asmk_like(rng, n, dim=8, groups=3):
    """A non-symmetric similarity matrix with a dominant diagonal, like ASMK self-retrieval scores."""
    centers = rng.standard_normal((groups, dim))
    x = centers[rng.integers(groups, size=n)] + 0.6 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T + 0.05 * rng.standard_normal((n, n))
    s[np.diag_indices(n)] += 0.3
    return s


@pytest.mark.parametrize("n,na,k,seed", [(14, 4, 3, 0), (14, 0, 5, 1), (9, 9, 0, 2), (20, 6, 1, 3), (7, 2, 10, 4),
                                         (1, 1, 3, 5), (16, 5, 4, 123)])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_pairs_match_brute_force(n, na, k, seed, exclude_self):
    rng = np.random.default_rng(100 * n + 10 * na + k)
    sim = asmk_like(rng, n)
    pairs, keys = pr.retrieval_pairs(sim, na=na, k=k, seed=seed, knn_excludes_self=exclude_self)
    ref, ref_keys = mast3r_oracle(sim, na, k, seed, exclude_self=exclude_self)
    np.testing.assert_array_equal(pairs, np.asarray(ref, np.int64).reshape(-1, 2))
    np.testing.assert_array_equal(keys, np.asarray(ref_keys, np.int64))
    assert pairs.dtype == np.int64 and keys.dtype == np.int64
    if len(pairs):
        assert (pairs[:, 0] < pairs[:, 1]).all()
        assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    sym, _ = pr.retrieval_pairs(sim, na=na, k=k, seed=seed, knn_excludes_self=exclude_self, symmetrize=True)
    assert {tuple(p) for p in sym.tolist()} == {(i, j) for i, j in ref} | {(j, i) for i, j in ref}
    assert len(sym) == 2 * len(ref)


def test_diagonal_not_on_top_gives_k_neighbours():
    """When an image is not its own best match, MASt3R's list of k holds k other images."""
    rng = np.random.default_rng(7)
    sim = rng.uniform(size=(10, 10))
    np.fill_diagonal(sim, -1.0)
    pairs, _ = pr.retrieval_pairs(sim, na=0, k=2)
    ref, _ = mast3r_oracle(sim, 0, 2, 0)
    np.testing.assert_array_equal(pairs, np.asarray(ref))
    degree_out = {i: {j for a, b in ref for j in ((b,) if a == i else (a,) if b == i else ())} for i in range(10)}
    assert all(len(v) >= 2 for v in degree_out.values())
    # every image a key image: distinct keys even where MASt3R's sampling could pick one twice
    _, keys = pr.retrieval_pairs(sim, na=10, k=0, seed=3)
    assert sorted(keys.tolist()) == list(range(10))


def test_scene_graph_string_and_export(tmp_path):
    assert pr.parse_scene_graph("retrieval-20-10") == (20, 10)
    assert pr.parse_scene_graph("retrieval-0-1") == (0, 1)
    for bad in ("swin-3", "retrieval-a-1", "retrieval-1", "retrieval--1-2", "retrieval-1-2-3", "", None):
        with pytest.raises(ValueError, match="retrieval-Na-k"):
            pr.parse_scene_graph(bad)
    rng = np.random.default_rng(11)
    sim = asmk_like(rng, 12)
    pairs, keys = pr.scene_graph_pairs(sim, "retrieval-3-4", seed=9)
    p2, k2 = pr.retrieval_pairs(sim, na=3, k=4, seed=9)
    np.testing.assert_array_equal(pairs, p2)
    np.testing.assert_array_equal(keys, k2)
    names = [f"im_{i:03d}.jpg" for i in range(12)]
    pr.save_pairs(tmp_path / "pairs.txt", pairs)
    lines = (tmp_path / "pairs.txt").read_text().splitlines()
    assert lines == [f"{i} {j}" for i, j in pairs.tolist()]
    np.testing.assert_array_equal(pr.load_pairs(tmp_path / "pairs.txt"), pairs)
    pr.save_pairs(tmp_path / "names.txt", pairs, names=names)
    lines = (tmp_path / "names.txt").read_text().splitlines()
    assert lines == [f"{names[i]} {names[j]}" for i, j in pairs.tolist()]
    np.testing.assert_array_equal(pr.load_pairs(tmp_path / "names.txt", names=names), pairs)
    pr.save_pairs(tmp_path / "pairs.npy", pairs)
    loaded = np.load(tmp_path / "pairs.npy")
    assert loaded.shape == pairs.shape and loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, pairs)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="square"):
        pr.retrieval_pairs(np.zeros((3, 4)), na=1, k=1)
    with pytest.raises(ValueError, match="square"):
        pr.retrieval_pairs(np.zeros(5), na=1, k=1)
    s = np.eye(4)
    s[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pr.retrieval_pairs(s, na=1, k=1)
    with pytest.raises(ValueError, match="only 3 images"):
        pr.retrieval_pairs(np.eye(3), na=5, k=1)
    with pytest.raises(ValueError, match="only 3 images"):
        pr.scene_graph_pairs(np.eye(3), "retrieval-20-10")
    with pytest.raises(ValueError, match="k must"):
        pr.retrieval_pairs(np.eye(3), na=1, k=-1)
    with pytest.raises(ValueError, match="empty"):
        pr.retrieval_pairs(np.zeros((0, 0)), na=0, k=1)
    p = np.array([[0, 1], [1, 4]])
    with pytest.raises(ValueError, match="refer to image 4"):
        pr.save_pairs(tmp_path / "x.txt", p, names=["a", "b", "c"])
    with pytest.raises(ValueError, match="whitespace"):
        pr.save_pairs(tmp_path / "x.txt", p, names=["a", "b c", "d", "e", "f"])
    with pytest.raises(ValueError, match="text pair files"):
        pr.save_pairs(tmp_path / "x.npy", p, names=list("abcde"))
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        pr.save_pairs(tmp_path / "x.txt", np.array([0, 1, 2]))
    assert not list(tmp_path.iterdir())


# --- pairs straight from an index (retrieval_pairs_from_index) against the dense path and the MASt3R oracle ---

import functools  # noqa: E402
import tracemalloc  # noqa: E402

from helpers import clustered_data  # noqa: E402

import jasmk  # noqa: E402

DUPLICATES = [(5, 17), (40, 41), (100, 7)]  # (source, copy): the copy holds the same descriptors


@functools.lru_cache(maxsize=None)
def collection(kind, n=300):
    """``(index, query rows, dense S)`` of ``n`` images against their own index (1 assignment in the index, 5
    for queries, as MASt3R), with duplicated images. ``sparse``: a large codebook, so most scores are 0."""
    rng = np.random.default_rng({"asmk*": 1, "sparse": 2, "asmk-idf": 3}[kind])
    words, per_image = (1024, 6) if kind == "sparse" else (64, 12)
    feats, ids = clustered_data(rng, n_images=n, per_image=per_image, dim=16, n_scenes=n // 4)
    for a, b in DUPLICATES:
        if max(a, b) < n:
            feats[ids == b] = feats[ids == a]
    cent = rng.standard_normal((words, 16)).astype(np.float32)
    binary = kind != "asmk-idf"
    index = jasmk.build_index(feats, ids, codebook=cent, binary=binary, use_idf=kind == "asmk-idf", quantizer="jax")
    qagg = jasmk.aggregate_images(cent, feats, ids, binary=binary, multiple_assignment=5, quantizer="jax")
    return index, qagg, jasmk.score_matrix_aggregated(index, qagg)


def test_collections_have_ties():
    """The data below exercise exact ties: duplicated rows and columns, and (sparse) rows of zero scores that
    reach into the k-nearest lists and decide farthest point sampling and the nearest key image."""
    for kind in ("asmk*", "sparse", "asmk-idf"):
        _, _, s = collection(kind)
        for a, b in DUPLICATES:
            np.testing.assert_array_equal(s[a], s[b])
            np.testing.assert_array_equal(s[:, a], s[:, b])
        assert not np.allclose(s, s.T)  # 5 assignments for queries, 1 in the index: not symmetric
    _, _, s = collection("sparse")
    zeros = (s == 0).sum(axis=1)
    assert (s == 0).mean() > 0.5 and (s.shape[0] - zeros < 60).sum() > 10  # some rows have < 60 non-zero scores


@pytest.mark.parametrize("kind", ["asmk*", "sparse", "asmk-idf"])
@pytest.mark.parametrize("na,k,seed", [(8, 5, 0), (0, 10, 2), (20, 0, 3), (1, 3, 4), (5, 60, 7), (0, 0, 1)])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_pairs_from_index_match_dense(kind, na, k, seed, exclude_self):
    index, qagg, s = collection(kind)
    pairs, keys = pr.retrieval_pairs_from_index(index, qagg, na=na, k=k, seed=seed, knn_excludes_self=exclude_self)
    dense, dense_keys = pr.retrieval_pairs(s, na=na, k=k, seed=seed, knn_excludes_self=exclude_self)
    np.testing.assert_array_equal(pairs, dense)
    np.testing.assert_array_equal(keys, dense_keys)
    ref, ref_keys = mast3r_oracle(s, na, k, seed, exclude_self=exclude_self)
    np.testing.assert_array_equal(pairs, np.asarray(ref, np.int64).reshape(-1, 2))
    np.testing.assert_array_equal(keys, np.asarray(ref_keys, np.int64))
    assert pairs.dtype == np.int64 and keys.dtype == np.int64
    if na or k:
        assert len(pairs) > 0
    sym, _ = pr.retrieval_pairs_from_index(index, qagg, na=na, k=k, seed=seed, knn_excludes_self=exclude_self,
                                           symmetrize=True)
    np.testing.assert_array_equal(sym, np.concatenate([dense, dense[:, ::-1]]))


def test_pairs_from_index_every_image_a_key():
    index, qagg, s = collection("sparse")
    n = s.shape[0]
    pairs, keys = pr.retrieval_pairs_from_index(index, qagg, na=n, k=2, seed=11)
    dense, dense_keys = pr.retrieval_pairs(s, na=n, k=2, seed=11)
    np.testing.assert_array_equal(keys, dense_keys)
    np.testing.assert_array_equal(pairs, dense)
    assert sorted(keys.tolist()) == list(range(n)) and len(pairs) == n * (n - 1) // 2


def test_first_k_breaks_float64_ties_as_the_dense_argsort():
    """Distinct float32 scores can give the same float64 distance 1 - s (tiny scores): the neighbour lists
    must then follow the dense path's stable argsort of the distances, not the float32 score order."""
    rng = np.random.default_rng(5)
    values = np.array([0.0, 1e-20, 2e-20, 3e-12, -1e-30, 1e-45, 7e-18, 3e-17, 0.25, np.nextafter(np.float32(0.25), 1),
                       1.0, 1.5, 1e-3], np.float32)
    s = values[rng.integers(len(values), size=(40, 57))]
    s[:, :30] = rng.standard_normal((40, 30)).astype(np.float32) * 1e-19  # more tiny, collapsing scores
    dist = 1.0 - s.astype(np.float64)
    assert len(np.unique(s)) > len(np.unique(dist))  # the test data do collapse distinct scores
    naive = np.argsort(-s, axis=1, kind="stable")[:, :20]
    assert (naive != np.argsort(dist, axis=1, kind="stable")[:, :20]).sum() > 40  # a float32 ranking would differ
    excl = rng.integers(57, size=40)
    for kk in (1, 3, 20, 56):
        np.testing.assert_array_equal(pr._first_k(s, kk), np.argsort(dist, axis=1, kind="stable")[:, :kk])
        d = dist.copy()
        d[np.arange(40), excl] = np.inf
        np.testing.assert_array_equal(pr._first_k(s, kk, excl), np.argsort(d, axis=1, kind="stable")[:, :kk])
    np.testing.assert_array_equal(pr._first_k(s, 57), np.argsort(dist, axis=1, kind="stable"))


def test_pairs_from_index_never_forms_the_dense_matrix(monkeypatch):
    """No n x n score matrix: the dense entry points are off, every score block has at most the engine's batch
    of rows, and the numpy memory traced over the call stays below one float32 n x n matrix."""
    n = 1000
    index, qagg, _ = collection("sparse", n)
    expected = pr.retrieval_pairs_from_index(index, qagg, na=6, k=4, seed=3)  # warm-up (compilations)
    from jasmk import api
    from jasmk.core import engine

    def refuse(*args, **kwargs):
        raise AssertionError("the dense score matrix was asked for")

    monkeypatch.setattr(api, "score_matrix_aggregated", refuse)
    monkeypatch.setattr(api, "score_matrix", refuse)
    monkeypatch.setattr(jasmk, "score_matrix_aggregated", refuse)
    monkeypatch.setattr(jasmk, "score_matrix", refuse)
    blocks = []
    dense_scores = engine.dense_scores

    def recording(*args, **kwargs):
        out = dense_scores(*args, **kwargs)
        blocks.append(out.shape)
        return out

    monkeypatch.setattr(engine, "dense_scores", recording)
    tracemalloc.start()
    try:
        pairs, keys = pr.retrieval_pairs_from_index(index, qagg, na=6, k=4, seed=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(pairs, expected[0])
    np.testing.assert_array_equal(keys, expected[1])
    assert sum(b for b, _ in blocks) == n + 5  # every image once, plus the 5 key rows sampling needs
    assert max(b for b, _ in blocks) <= engine.MAX_BATCH < n
    assert peak < n * n * 4, peak


def test_pairs_from_index_bad_input():
    index, qagg, _ = collection("asmk*")
    with pytest.raises(ValueError, match="only 300 images"):
        pr.retrieval_pairs_from_index(index, qagg, na=301, k=1)
    with pytest.raises(ValueError, match="k must"):
        pr.retrieval_pairs_from_index(index, qagg, na=1, k=-1)
    with pytest.raises(ValueError, match="Na must"):
        pr.retrieval_pairs_from_index(index, qagg, na=True, k=1)
    with pytest.raises(ValueError, match="seed must"):
        pr.retrieval_pairs_from_index(index, qagg, na=1, k=1, seed=-3)
    with pytest.raises(ValueError, match="alpha"):
        pr.retrieval_pairs_from_index(index, qagg, na=1, k=1, alpha=-1.0)
    keep = qagg.images != 0
    missing = jasmk.Aggregated(qagg.vecs[keep], qagg.words[keep], qagg.images[keep])
    with pytest.raises(ValueError, match=r"every image of the index once.*ids 0..299"):
        pr.retrieval_pairs_from_index(index, missing, na=1, k=1)
    keep = qagg.images < 299
    short = jasmk.Aggregated(qagg.vecs[keep], qagg.words[keep], qagg.images[keep])
    with pytest.raises(ValueError, match=r"every image of the index once.*ids 0..299"):
        pr.retrieval_pairs_from_index(index, short, na=1, k=1)
    with pytest.raises(ValueError, match="aggregated query rows must be"):
        pr.retrieval_pairs_from_index(index, qagg._replace(vecs=qagg.vecs[:, :0]), na=1, k=1)
    with_distractors = jasmk.core.ivf.add(jasmk.core.ivf.with_distractors(index), qagg)
    with pytest.raises(ValueError, match="distractor"):
        pr.retrieval_pairs_from_index(with_distractors, qagg, na=1, k=1)
