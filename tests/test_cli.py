"""The jasmk command line end to end, against the library and asmk 0.1.1."""

import os

import numpy as np
import pytest
from helpers import asmk_params, asmk_with_centroids, assert_same_ranking

import jasmk
from jasmk import cli
from jasmk.storage import checkpoint


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


# ---------------------------------------------------------------------------------------------------------
# command line


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quiet"] + argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("jasmk: error:") and "Traceback" not in err, err
    return err


def test_cli_checks_outputs_before_working(tmp_path, small_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    feats, ids, cents = small_data
    np.save(tmp_path / "train.npy", feats)
    np.savez(tmp_path / "db.npz", feats=feats, ids=ids)
    train_bytes = (tmp_path / "train.npy").read_bytes()

    def no_work(*args, **kwargs):
        raise AssertionError("the output should have been refused before any work")

    monkeypatch.setattr(jasmk, "train_codebook", no_work)
    monkeypatch.setattr(jasmk, "build_index", no_work)
    train = str(tmp_path / "train.npy")
    assert "input" in run_cli(["codebook", train, "--size", "8", "--out", train], capsys)
    assert (tmp_path / "train.npy").read_bytes() == train_bytes
    assert "empty" in run_cli(["codebook", train, "--size", "8", "--out", ""], capsys)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    assert "photos" in run_cli(["codebook", train, "--size", "8", "--out", str(tmp_path / "photos")], capsys)
    checkpoint.save_codebook(tmp_path / "cb", jasmk.Codebook.from_centroids(cents))
    err = run_cli(["index", str(tmp_path / "db.npz"), "--codebook", str(tmp_path / "cb"), "--out",
                   str(tmp_path / "cb")], capsys)
    assert "input" in err or "codebook" in err
    assert checkpoint.load_codebook(tmp_path / "cb").size == 64
    err = run_cli(["index", str(tmp_path / "db.npz"), "--codebook", str(tmp_path / "cb"), "--out",
                   str(tmp_path / "cb" / "meta.json")], capsys)
    assert "inside the jasmk checkpoint" in err
    monkeypatch.undo()

    checkpoint.save_index(tmp_path / "idx", jasmk.build_index(feats, ids, codebook=cents))
    for out in (str(tmp_path / "db.npz"), str(tmp_path / "photos"), str(tmp_path / "idx" / "res.npz"), ""):
        run_cli(["query", str(tmp_path / "idx"), str(tmp_path / "db.npz"), "--out", out], capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "db.npz")["feats"], feats)
    np.save(tmp_path / "S.npy", np.zeros((4, 4), np.float32))
    run_cli(["pairs", str(tmp_path / "S.npy"), "--scene-graph", "retrieval-2-1", "--out", str(tmp_path / "S.npy")],
            capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "S.npy"), np.zeros((4, 4)))


def test_cli_bad_files_and_memory_errors_exit_cleanly(tmp_path, small_data, monkeypatch, capsys):
    feats, ids, cents = small_data
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "empty.npy").write_bytes(b"")
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10**9, 10**6)})
        handle.write(b"\0" * 64)
    inner = tmp_path / "inner.npy"
    with open(inner, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10**9, 32)})
    import zipfile

    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.write(inner, "feats.npy")
        archive.writestr("ids.npy", b"\x93NUMPY")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    for name in ("empty.npz", "empty.npy", "huge.npy", "huge.npz", "junk.npz"):
        err = run_cli(["codebook", str(tmp_path / name), "--size", "8", "--out", str(tmp_path / "cb")], capsys)
        assert name in err
        assert not (tmp_path / "cb").exists()
    run_cli(["pairs", str(tmp_path / "huge.npy"), "--out", str(tmp_path / "p.txt")], capsys)

    np.save(tmp_path / "train.npy", feats)

    def oom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(jasmk, "train_codebook", oom)
    assert "out of memory" in run_cli(["codebook", str(tmp_path / "train.npy"), "--size", "8", "--out",
                                       str(tmp_path / "cb")], capsys)

    def weird(*args, **kwargs):
        raise RuntimeError("XLA blew up")

    monkeypatch.setattr(jasmk, "train_codebook", weird)
    assert "XLA blew up" in run_cli(["codebook", str(tmp_path / "train.npy"), "--size", "8", "--out",
                                     str(tmp_path / "cb")], capsys)


def test_cli_file_outputs_are_atomic(tmp_path, small_data, monkeypatch, capsys):
    feats, ids, cents = small_data
    np.savez(tmp_path / "db.npz", feats=feats, ids=ids)
    checkpoint.save_index(tmp_path / "idx", jasmk.build_index(feats, ids, codebook=cents))
    out = tmp_path / "S.npy"
    np.save(out, np.ones(3))

    def half_written(handle, arr, *args, **kwargs):
        handle.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", half_written)
    assert "disk full" in run_cli(["score-matrix", str(tmp_path / "idx"), str(tmp_path / "db.npz"), "--out",
                                   str(out)], capsys)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(out), np.ones(3))  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["S.npy", "db.npz", "idx"]  # no temporary left
    assert cli.main(["--quiet", "score-matrix", str(tmp_path / "idx"), str(tmp_path / "db.npz"), "--out",
                     str(out)]) == 0
    assert np.load(out).shape == (24, 24)
    assert sorted(os.listdir(tmp_path)) == ["S.npy", "db.npz", "idx"]
    assert cli.main(["--quiet", "pairs", str(out), "--scene-graph", "retrieval-4-3", "--out",
                     str(tmp_path / "p.npy")]) == 0
    assert np.load(tmp_path / "p.npy").shape[1] == 2
    assert sorted(os.listdir(tmp_path)) == ["S.npy", "db.npz", "idx", "p.npy"]


def test_cli_outputs_must_be_named_for_what_is_written_in_an_existing_folder(tmp_path, small_data, capsys):
    """An output whose extension does not fit what the command writes, or whose folder does not exist, is an error
    (exit 2) before any work; no folder is created."""
    feats, ids, cents = small_data
    np.savez(tmp_path / "db.npz", feats=feats, ids=ids)
    checkpoint.save_index(tmp_path / "idx", jasmk.build_index(feats, ids, codebook=cents))
    idx, db = str(tmp_path / "idx"), str(tmp_path / "db.npz")
    assert ".npz" in run_cli(["query", idx, db, "--out", str(tmp_path / "results.txt")], capsys)
    assert ".npy" in run_cli(["score-matrix", idx, db, "--out", str(tmp_path / "S.txt")], capsys)
    missing = tmp_path / "no" / "such"
    assert "does not exist" in run_cli(["query", idx, db, "--out", str(missing / "r.npz")], capsys)
    assert "does not exist" in run_cli(["index", db, "--codebook", idx, "--out", str(missing / "idx")], capsys)
    assert not (tmp_path / "no").exists()
    np.save(tmp_path / "S.npy", np.zeros((4, 4), np.float32))
    assert ".txt or .npy" in run_cli(["pairs", str(tmp_path / "S.npy"), "--scene-graph", "retrieval-2-1", "--out",
                                      str(tmp_path / "pairs.csv")], capsys)
    assert "PNG" in run_cli(["show", str(tmp_path / "S.npy"), "--heatmap", str(tmp_path / "h.jpg")], capsys)
    assert not (tmp_path / "results.txt").exists() and not (tmp_path / "S.npz").exists()
    assert cli.main(["--quiet", "query", idx, db, "--topk", "3", "--out", str(tmp_path / "R.NPZ")]) == 0
