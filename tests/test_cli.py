"""The jasmk command line end to end, against the library and asmk 0.1.1."""

import numpy as np
import pytest
from conftest import asmk_params, asmk_with_centroids, assert_same_ranking

import jasmk
from jasmk import cli


def test_cli_end_to_end(tmp_path, small_data, capsys):
    feats, ids, _ = small_data
    np.save(tmp_path / "train.npy", feats)
    np.savez(tmp_path / "db.npz", feats=feats, ids=ids)
    out = str(tmp_path / "cb")
    assert cli.main(["--quiet", "codebook", str(tmp_path / "train.npy"), "--size", "64", "--out", out]) == 0
    assert cli.main(["--quiet", "index", str(tmp_path / "db.npz"), "--codebook", str(tmp_path / "cb"),
                     "--use-idf", "--out", str(tmp_path / "idx")]) == 0
    assert cli.main(["--quiet", "query", str(tmp_path / "idx"), str(tmp_path / "db.npz"), "--topk", "10",
                     "--out", str(tmp_path / "res.npz")]) == 0
    assert cli.main(["score-matrix", str(tmp_path / "idx"), str(tmp_path / "db.npz"),
                     "--out", str(tmp_path / "S.npy")]) == 0
    (tmp_path / "names.txt").write_text("".join(f"im{i}.jpg\n" for i in range(24)))
    assert cli.main(["--quiet", "pairs", str(tmp_path / "S.npy"), "--scene-graph", "retrieval-4-3", "--names",
                     str(tmp_path / "names.txt"), "--out", str(tmp_path / "pairs.txt")]) == 0

    cb = jasmk.train_codebook(feats, size=64)
    index = jasmk.build_index(feats, ids, codebook=cb, use_idf=True)
    direct = jasmk.query(index, feats, ids, topk=10)
    res = np.load(tmp_path / "res.npz")
    np.testing.assert_array_equal(res["ranks"], direct.ranks)
    np.testing.assert_array_equal(res["scores"], direct.scores)
    S = np.load(tmp_path / "S.npy")
    np.testing.assert_allclose(S, jasmk.score_matrix(index, feats, ids), atol=0)
    # against asmk 0.1.1 with the same (identically trained) codebook
    params = asmk_params(size=64, use_idf=True, topk=10)
    ref = asmk_with_centroids(params, np.asarray(cb.centroids)).build_ivf(feats, ids.copy())
    _, _, r, s = ref.query_ivf(feats, ids)
    assert_same_ranking(res["ranks"], res["scores"], r, s)
    from jasmk import pairs

    expected, _ = pairs.retrieval_pairs(S, na=4, k=3, seed=0)
    lines = (tmp_path / "pairs.txt").read_text().splitlines()
    assert lines == [f"im{i}.jpg im{j}.jpg" for i, j in expected]
    assert "score matrix" in capsys.readouterr().err  # progress bar / info on stderr
    # the same pairs straight from the index (no n x n matrix)
    assert cli.main(["--quiet", "pairs", "--index", str(tmp_path / "idx"), "--feats", str(tmp_path / "db.npz"),
                     "--scene-graph", "retrieval-4-3", "--names", str(tmp_path / "names.txt"),
                     "--out", str(tmp_path / "pairs2.txt")]) == 0
    assert (tmp_path / "pairs2.txt").read_text().splitlines() == lines


def test_cli_bad_input_exits_cleanly(tmp_path, small_data, capsys):
    feats, ids, centroids = small_data
    np.savez(tmp_path / "noids.npz", feats=feats)
    np.save(tmp_path / "nan.npy", np.full((100, 4), np.nan, np.float32))
    cases = [
        ["codebook", str(tmp_path / "missing.npy"), "--size", "8", "--out", str(tmp_path / "cb")],
        ["codebook", str(tmp_path / "nan.npy"), "--size", "8", "--out", str(tmp_path / "cb")],
        ["index", str(tmp_path / "noids.npz"), "--codebook", str(tmp_path / "nope"), "--out", str(tmp_path / "i")],
        ["pairs", str(tmp_path / "nan.npy"), "--scene-graph", "retrieval-2-2", "--out", str(tmp_path / "p.txt")],
        ["pairs", str(tmp_path / "nan.npy"), "--scene-graph", "swin-3", "--out", str(tmp_path / "p.txt")],
        ["pairs", "--scene-graph", "retrieval-2-2", "--out", str(tmp_path / "p.txt")],
        ["pairs", "--index", str(tmp_path / "nope"), "--scene-graph", "retrieval-2-2",
         "--out", str(tmp_path / "p.txt")],
        ["pairs", str(tmp_path / "nan.npy"), "--index", str(tmp_path / "nope"), "--feats", str(tmp_path / "noids.npz"),
         "--out", str(tmp_path / "p.txt")],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(["--quiet"] + argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("jasmk: error:") and "Traceback" not in err
