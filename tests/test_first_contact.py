"""What a new user meets first: a complete CLI (help with defaults, --version, add, one summary line), loaders that
recognise the other formats and say which function reads them, a codebook given as a path, and jasmk's own
words instead of faiss's warnings."""

import argparse
import re
import sys

import numpy as np
import pytest

import jasmk
from jasmk import cli
from jasmk.storage import asmk_format, checkpoint


def _parsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_has_help_and_shows_its_default():
    parser, commands = _parsers()
    assert set(commands) >= {"codebook", "index", "add", "query", "score-matrix", "pairs", "info", "show"}
    text = parser.format_help()
    assert "``" not in text and ":func:" not in text  # no RST in help
    for name, sub in commands.items():
        help_text = sub.format_help()
        assert "``" not in help_text, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest} has no help"
            if action.option_strings and action.default not in (None, False):
                rendered = sub._get_formatter()._expand_help(action) if action.help else ""
                expanded = sub.formatter_class(prog="x")._get_help_string(action) % {"default": action.default}
                assert "default" in expanded, (name, action.dest, rendered)
    index_help = commands["index"].format_help()
    query_help = commands["query"].format_help()
    assert re.search(r"--ma MA\s+words per database descriptor.*\(default:\s+the\s+preset's;\s+how:\s+1\)",
                     index_help, re.S)
    assert re.search(r"--ma MA\s+words per query descriptor.*\(default:\s+the\s+preset's;\s+how:\s+5\)",
                     query_help, re.S)
    assert "--preset {how,mast3r,sift}" in query_help and "(default: how)" in query_help
    assert "every database image" in query_help  # --topk's default said in words


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"jasmk {jasmk.__version__}"


def test_add_grows_an_index_in_place_as_a_build_of_all(tmp_path, small_data, capsys):
    feats, ids, cents = small_data
    first, rest = ids < 10, ids >= 10
    np.savez(tmp_path / "a.npz", feats=feats[first], ids=ids[first])
    np.savez(tmp_path / "b.npz", feats=feats[rest], ids=ids[rest] + 7)  # a gap after the first part
    np.savez(tmp_path / "all.npz", feats=feats, ids=np.where(rest, ids + 7, ids))
    checkpoint.save_codebook(tmp_path / "cb", jasmk.Codebook.from_centroids(cents))
    d = str(tmp_path)
    assert cli.main(["index", f"{d}/a.npz", "--codebook", f"{d}/cb", "--out", f"{d}/idx"]) == 0
    assert cli.main(["add", f"{d}/idx", f"{d}/b.npz"]) == 0
    err = capsys.readouterr().err.splitlines()
    wrote = [line for line in err if line.startswith("jasmk: wrote")]
    assert len(wrote) == 2 and wrote[1].endswith(f"{int(rest.sum() // (ids == 0).sum())} added)"), err
    grown = checkpoint.load_index(f"{d}/idx")
    whole = jasmk.build_index(feats, np.where(rest, ids + 7, ids), codebook=cents)
    assert grown.image_ids.tolist() == whole.image_ids.tolist()
    a = jasmk.query(grown, feats, ids, topk=5)
    b = jasmk.query(whole, feats, ids, topk=5)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.scores, b.scores)
    with pytest.raises(SystemExit) as exc:  # the same ids again
        cli.main(["add", f"{d}/idx", f"{d}/b.npz", "--out", f"{d}/idx2"])
    assert exc.value.code == 2
    assert "next free id" in capsys.readouterr().err
    assert not (tmp_path / "idx2").exists()


def test_loaders_name_the_function_for_the_other_format(tmp_path, small_data):
    feats, ids, cents = small_data
    cb = jasmk.Codebook.from_centroids(cents)
    pkl = str(tmp_path / "asmk_codebook.pkl")
    asmk_format.write_pickle(pkl, asmk_format.codebook_state(cb))
    with pytest.raises(ValueError, match="load_asmk_codebook"):
        checkpoint.load_codebook(pkl)
    with pytest.raises(ValueError, match="load_asmk_codebook"):
        checkpoint.load_index(pkl)
    idx = str(tmp_path / "idx")
    index = jasmk.build_index(feats, ids, codebook=cb)
    checkpoint.save_index(idx, index)
    with pytest.raises(ValueError, match="jasmk.load_index"):
        checkpoint.load_codebook(idx)
    with pytest.raises(ValueError, match="jasmk.load_codebook and jasmk.load_index"):
        asmk_format.load_asmk_codebook(idx)
    checkpoint.save_codebook(tmp_path / "cb", cb)
    with pytest.raises(ValueError, match="jasmk.load_codebook reads it"):
        checkpoint.load_index(tmp_path / "cb")
    np.save(tmp_path / "x.npy", feats)
    with pytest.raises(ValueError, match="np.load"):
        checkpoint.load_codebook(tmp_path / "x.npy")
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "features.h5", "w") as fd:
        fd.create_group("a.jpg").create_dataset("descriptors", data=np.ones((4, 3), np.float16))
    with pytest.raises(ValueError, match="hloc.read_features"):
        checkpoint.load_index(tmp_path / "features.h5")

    # a codebook given as a path: jasmk's checkpoint, an index checkpoint's codebook, asmk's pickle
    for path in (tmp_path / "cb", str(tmp_path / "cb"), idx, pkl):
        built = jasmk.build_index(feats, ids, codebook=path)
        np.testing.assert_array_equal(np.asarray(built.centroids), np.asarray(index.centroids))
        assert built.n_entries == index.n_entries
    with pytest.raises(ValueError, match="does not exist"):
        jasmk.build_index(feats, ids, codebook=str(tmp_path / "nowhere"))


def test_few_training_descriptors_warn_in_jasmks_words_not_faiss(capfd, caplog):
    pytest.importorskip("faiss")
    x = np.random.default_rng(0).standard_normal((18000, 16)).astype(np.float32)
    with caplog.at_level("WARNING", logger="jasmk"):
        cb = jasmk.train_codebook(x, size="1k", niter=2)
    captured = capfd.readouterr()
    assert "WARNING clustering" not in captured.err + captured.out  # faiss's own line (fd-level) is gone
    assert cb.size == 1024
    assert "18000 descriptors" in caplog.text and "size=256 or fewer" in caplog.text
    caplog.clear()
    jasmk.train_codebook(x, size=256, niter=2)  # 70 per word: nothing to say
    assert caplog.text == ""
    assert "WARNING" not in capfd.readouterr().err


def test_show_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "S.npy", np.eye(3, dtype=np.float32))
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as exc:
        cli.main(["show", str(tmp_path / "S.npy"), "--heatmap", str(tmp_path / "h.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jasmk: error: ") and 'pip install "jasmk[show]"' in err and "Traceback" not in err
    assert not (tmp_path / "h.png").exists()


def test_heatmap_scale_option(tmp_path):
    pytest.importorskip("matplotlib")
    s = np.full((6, 6), 1e-4, np.float32)
    np.fill_diagonal(s, 0.3)
    s[0, 1] = s[1, 0] = 0.01
    np.save(tmp_path / "S.npy", s)
    for scale in ("row", "log", "linear"):
        out = tmp_path / f"{scale}.png"
        assert cli.main(["--quiet", "show", str(tmp_path / "S.npy"), "--heatmap", str(out), "--scale", scale]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_set_parameters_and_rootsift_once(small_data):
    """``preset=`` gives its parameters where the caller left the defaults; ``"sift"`` turns raw SIFT into RootSIFT
    (numpy oracle) and leaves unit-norm (hloc's RootSIFT) descriptors alone, so it is never applied twice."""
    from jasmk.core import presets

    feats, ids, cents = small_data
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 160, (ids.size, 128)).astype(np.float32)  # SIFT-like histograms
    ref = np.sqrt(raw / raw.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(presets.sift_input(raw), ref, rtol=1e-6)
    np.testing.assert_array_equal(presets.sift_input(ref), ref)  # already RootSIFT: unchanged
    cb = jasmk.train_codebook(ref, size=16)
    a = jasmk.build_index(raw, ids, codebook=cb, preset="sift")
    b = jasmk.build_index(ref, ids, codebook=cb, preset="sift")
    c = jasmk.build_index(ref, ids, codebook=cb, **presets.get("sift").build_kwargs())
    assert a.n_entries == b.n_entries == c.n_entries
    ra = jasmk.query(a, raw, ids, topk=5, preset="sift")
    rc = jasmk.query(c, ref, ids, topk=5, **presets.get("sift").query_kwargs())
    np.testing.assert_array_equal(ra.ranks, rc.ranks)
    np.testing.assert_allclose(ra.scores, rc.scores, atol=1e-6)
    # an explicit argument that differs from the default wins over the preset
    assert not jasmk.build_index(ref, ids, codebook=cb, preset="how", binary=False).binary
    with pytest.raises(ValueError, match="unknown preset 'orb'"):
        jasmk.build_index(ref, ids, codebook=cb, preset="orb")
    for name, p in presets.PRESETS.items():
        assert p.source and (p.words is None or p.words >= 1024), name
