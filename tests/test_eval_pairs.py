"""Revisited-protocol evaluation and MASt3R-SfM pairs against loop-based re-derivations."""

import numpy as np
import pytest

from jasmk import eval as ev
from jasmk import pairs as pr


def revisitop_map(ranks_db_by_q, gnd, kappas):
    """The revisitop compute_map algorithm, written out with loops (ranks: [n_db, n_query])."""
    nq = len(gnd)
    aps, prs, used = [], [], 0
    for i in range(nq):
        ok = np.array(gnd[i]["ok"])
        if ok.shape[0] == 0:
            continue
        jk = np.array(gnd[i]["junk"])
        pos = np.arange(ranks_db_by_q.shape[0])[np.isin(ranks_db_by_q[:, i], ok)]
        junk = np.arange(ranks_db_by_q.shape[0])[np.isin(ranks_db_by_q[:, i], jk)]
        k = ij = 0
        pos = pos.copy()
        for ip in range(len(pos)):
            while ij < len(junk) and pos[ip] > junk[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else j / rank
            p1 = (j + 1) / (rank + 1)
            ap += (p0 + p1) / 2 / len(ok)
        aps.append(ap)
        pos1 = pos + 1
        prs.append([(pos1 <= min(pos1.max(), kk)).sum() / min(pos1.max(), kk) for kk in kappas])
        used += 1
    return np.mean(aps), np.mean(prs, axis=0)


def test_revisited_protocol_matches_loop_oracle():
    rng = np.random.default_rng(0)
    n_db, nq = 60, 9
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n_db)
        gnd.append({"easy": perm[:4].tolist(), "hard": perm[4:7].tolist(), "junk": perm[7:12].tolist()})
    gnd[3]["easy"], gnd[3]["hard"] = [], []  # no positives in any protocol: left out
    gnd[5]["hard"] = []  # no hard positives: left out of Hard only
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)])
    res = ev.evaluate_revisited(ranks, gnd, kappas=(1, 5, 10), n_db=n_db)
    for name, ok_keys, junk_keys in [("easy", ["easy"], ["junk", "hard"]), ("medium", ["easy", "hard"], ["junk"]),
                                     ("hard", ["hard"], ["junk", "easy"])]:
        g = [{"ok": sum((x[k] for k in ok_keys), []), "junk": sum((x[k] for k in junk_keys), [])} for x in gnd]
        m, mp = revisitop_map(ranks.T, g, [1, 5, 10])
        assert res[name]["map"] == pytest.approx(100 * m, abs=1e-4)
        for kk, v in zip((1, 5, 10), mp):
            assert res[name]["mp@k"][kk] == pytest.approx(100 * v, abs=1e-4)
    # a perfect ranking scores 100 on Medium
    perfect = np.stack([np.r_[g["easy"] + g["hard"], [i for i in range(n_db) if i not in g["easy"] + g["hard"]]]
                        for g in gnd])
    assert ev.evaluate_revisited(perfect, gnd, n_db=n_db)["medium"]["map"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        ev.evaluate_revisited(ranks, [{"easy": [n_db + 5]}] * nq, n_db=n_db)


def oracle_pairs(s, na, k, first):
    """Brute-force retrieval-Na-k with a given first key image."""
    n = len(s)
    d = 1 - s
    keys = [first] if na else []
    while len(keys) < na:
        far = d[keys].min(axis=0)
        far[keys] = -np.inf
        keys.append(int(np.argmax(far)))
    edges = {(min(a, b), max(a, b)) for a in keys for b in keys if a != b}
    for i in range(n):
        if keys and i not in keys:
            best = keys[int(np.argmin([d[i, c] for c in keys]))]
            edges.add((min(i, best), max(i, best)))
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (d[i, j], j))[:k]
        edges |= {(min(i, j), max(i, j)) for j in others}
    return sorted(edges), keys


@pytest.mark.parametrize("na,k", [(3, 2), (0, 3), (5, 0), (12, 11)])
def test_retrieval_pairs_match_brute_force(tmp_path, na, k):
    rng = np.random.default_rng(na * 10 + k)
    x = rng.standard_normal((12, 6))
    s = x @ x.T / 6
    pairs, keys = pr.retrieval_pairs(s, na=na, k=k, seed=4)
    first = int(np.random.default_rng(4).integers(12)) if na else None
    ref, ref_keys = oracle_pairs(s, na, k, first)
    np.testing.assert_array_equal(pairs, np.array(ref).reshape(-1, 2))
    if na:
        np.testing.assert_array_equal(keys, ref_keys)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    pr.save_pairs(tmp_path / "p.txt", pairs, names=[f"img{i}.jpg" for i in range(12)])
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert lines[0] == f"img{pairs[0, 0]}.jpg img{pairs[0, 1]}.jpg" and len(lines) == len(pairs)
    pr.save_pairs(tmp_path / "p.npy", pairs)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), pairs)


def test_pairs_bad_input():
    assert pr.parse_scene_graph("retrieval-20-10") == (20, 10)
    for bad in ("swin-3", "retrieval-a-1", "retrieval-1", "retrieval--1-2"):
        with pytest.raises(ValueError):
            pr.parse_scene_graph(bad)
    with pytest.raises(ValueError, match="square"):
        pr.retrieval_pairs(np.zeros((3, 4)), na=1, k=1)
    with pytest.raises(ValueError, match="NaN"):
        pr.retrieval_pairs(np.full((3, 3), np.nan), na=1, k=1)
    with pytest.raises(ValueError, match="only 3 images"):
        pr.retrieval_pairs(np.eye(3), na=5, k=1)
