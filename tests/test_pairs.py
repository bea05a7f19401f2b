"""MASt3R-SfM retrieval-Na-k pairs against a brute-force re-derivation of MASt3R's procedure."""

import numpy as np
import pytest

from jasmk import pairs as pr


def mast3r_oracle(sim, na, k, seed, *, exclude_self=False):
    """retrieval-Na-k written out with Python sets, MASt3R's way: np.random.seed(seed) then a global-RNG draw."""
    n = len(sim)
    dist = 1.0 - np.asarray(sim, np.float64)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        first = int(np.random.choice(n))
    finally:
        np.random.set_state(state)
    keys = [first] if na else []
    while len(keys) < na:
        best, best_d = None, -np.inf
        for c in range(n):
            dc = min(dist[a, c] for a in keys)
            if dc > best_d:
                best, best_d = c, dc
        assert best not in keys  # the test matrices never make MASt3R repeat a key image
        keys.append(best)
    edges = set()
    for a in keys:
        for b in keys:
            if a != b:
                edges.add((min(a, b), max(a, b)))
    for i in range(n):
        if keys and i not in keys:
            nk = min(keys, key=lambda c: (dist[i, c], keys.index(c)))
            edges.add((min(i, nk), max(i, nk)))
    for i in range(n):
        cands = [j for j in range(n) if not (exclude_self and j == i)]
        for j in sorted(cands, key=lambda j: (dist[i, j], j))[:k]:
            if j != i:
                edges.add((min(i, j), max(i, j)))
    return sorted(edges), keys


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
