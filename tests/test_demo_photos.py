"""The offline real-photo demo: real multi-view pairs from Debian's opencv-doc when present, otherwise synthetic
views of scikit-image's bundled photos; retrieval far above chance either way, checked with a numpy AP."""

import contextlib
import io
import os

import numpy as np
import pytest
from helpers import load_experiment

cv2 = pytest.importorskip("cv2")
pytest.importorskip("skimage")


def _demo():
    return load_experiment("demo_photos")


def numpy_ap(ranking, positives, junk=()):
    """Trapezoid AP over a full ranking, junk images removed first (the revisited protocol's rule)."""
    ranking = [x for x in ranking if x not in set(junk)]
    pos = [r for r, x in enumerate(ranking) if x in positives]
    return sum(((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / len(positives) for j, r in enumerate(pos))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The fallback: no opencv-doc folder, so synthetic views of scikit-image's photos."""
    demo = _demo()
    empty = tmp_path_factory.mktemp("no_opencv_doc")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        out = demo.run(db_views=2, query_views=1, train_views=1, nfeatures=250, codebook=128, max_side=320,
                       na=3, k=2, seed=0, verbose=True, opencv_data=str(empty))
    return demo, out, said.getvalue()


def test_photos_load_offline_without_duplicates(demo_run):
    demo, out, _ = demo_run
    photos = demo.load_photos(max_side=320)
    assert len(photos) >= 10 and out["photos"] == len(photos)
    arrays = [a for a, _ in photos.values()]
    assert all(a.dtype == np.uint8 and a.ndim == 2 and max(a.shape) <= 320 for a in arrays)
    assert len({a.tobytes() for a in arrays}) == len(arrays)  # 'cat' and 'chelsea' are one photo
    d = demo.rootsift(arrays[0], 100)
    assert d.shape[1] == 128 and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-4)  # RootSIFT is unit-norm
    assert (d >= 0).all()


def test_fallback_says_how_to_get_real_pairs(demo_run):
    _, out, said = demo_run
    assert out["source"] == "synthetic"
    assert "apt install opencv-doc" in said and "synthetic views" in said


def test_retrieval_far_above_random(demo_run):
    _, out, _ = demo_run
    ranks, gnd, qp, dbp = out["ranks"], out["gnd"], out["query_photo"], out["db_photo"]
    assert ranks.shape == (out["queries"], out["db_images"])
    # ground truth: the database views of the query's own photo
    for g, p in zip(gnd, qp):
        assert sorted(g["easy"] + g["hard"]) == np.flatnonzero(dbp == p).tolist()
    aps = [numpy_ap(list(r), set(g["easy"] + g["hard"])) for r, g in zip(ranks, gnd)]
    assert out["map"]["medium"] == pytest.approx(100 * np.mean(aps), abs=1e-3)
    rng = np.random.default_rng(1)
    chance = np.mean([numpy_ap(list(rng.permutation(out["db_images"])), set(g["easy"] + g["hard"]))
                      for _ in range(30) for g in gnd])
    assert chance < 0.25
    assert out["map"]["medium"] > 100 * chance + 40, (out["map"], chance)
    assert out["map"]["easy"] > 70 and out["mp@1"]["medium"] > 70
    assert abs(out["chance_medium"] - 100 * chance) < 5
    # retrieval-Na-k pairs: the k-NN edges mostly join views of one photo (chance: about 1 / photos)
    assert out["knn_pairs_same_photo"] > 0.5
    assert len(out["key_images"]) == 3 and (out["pair_list"][:, 0] < out["pair_list"][:, 1]).all()


def _opencv_doc_pairs():
    demo = _demo()
    have = [os.path.isfile(os.path.join(demo.OPENCV_DATA, f))
            or os.path.isfile(os.path.join(demo.OPENCV_DATA, f + ".gz"))
            for _, files in demo.REAL_SCENES for f in files]
    return sum(have) >= 6


@pytest.mark.skipif(not _opencv_doc_pairs(), reason="Debian's opencv-doc sample pictures are not installed "
                    "(/usr/share/doc/opencv-doc/examples/data; apt install opencv-doc)")
def test_real_multi_view_pairs(tmp_path):
    from matplotlib import image as mpimg

    demo = _demo()
    results_png, scores_png = str(tmp_path / "results.png"), str(tmp_path / "scores.png")
    out = demo.run(train_views=1, nfeatures=300, codebook=128, max_side=320, na=3, k=2, seed=0, verbose=False,
                   results_png=results_png, scores_png=scores_png, show_queries=4)
    assert out["source"] == "opencv-doc"
    dbf, dbs, qf, qs, crop = (out["db_files"], out["db_photo"], out["query_files"], out["query_photo"],
                              out["query_crop"])
    real = {s for s in dbs if not s.startswith("distractor:")}
    assert len(real) >= 6 and {"graffiti", "motorcycle"} <= real
    assert sum(s.startswith("distractor:") for s in dbs) >= 10  # scikit-image photos
    assert "graf1.png" in dbf and "graf3.png" in dbf
    # every real view is a query, once whole and once cropped
    assert sorted(zip(qf, crop)) == sorted([(f, c) for f, s in zip(dbf, dbs) if s in real for c in (False, True)])
    # ground truth, spelled out from the file and scene names
    for g, f, s, c in zip(out["gnd"], qf, qs, crop):
        same = [i for i in range(len(dbf)) if dbs[i] == s]
        itself = [i for i in same if dbf[i] == f]
        other = [i for i in same if dbf[i] != f]
        assert len(itself) == 1 and len(other) >= 1
        want = {"easy": itself, "hard": other, "junk": []} if c else {"easy": other, "hard": [], "junk": itself}
        assert {k: sorted(g[k]) for k in want} == want
    ranks = out["ranks"]
    aps = [numpy_ap(list(r), set(g["easy"] + g["hard"]), g["junk"]) for r, g in zip(ranks, out["gnd"])]
    assert out["map"]["medium"] == pytest.approx(100 * np.mean(aps), abs=1e-3)
    rng = np.random.default_rng(1)
    chance = np.mean([numpy_ap(list(rng.permutation(out["db_images"])), set(g["easy"] + g["hard"]), g["junk"])
                      for _ in range(30) for g in out["gnd"]])
    assert chance < 0.2
    # the real second view is found: far above chance, and first for most whole-view queries
    assert out["map"]["medium"] > 100 * chance + 50, (out["map"], chance)
    first_right = [r[0] in g["easy"] + g["hard"] for r, g, c in zip(ranks, out["gnd"], crop) if not c
                   for r in [[x for x in r if x not in g["junk"]]]]
    assert np.mean(first_right) > 0.75
    assert out["pair_recall"] > 0.75  # MASt3R-SfM pairs hold most real view pairs
    # the pictures: a 4-query grid and the heat map
    grid = mpimg.imread(results_png)
    assert grid.shape[0] > 4 * 140 and grid.shape[1] > 6 * 140
    assert mpimg.imread(scores_png).shape[:2] == (1000, 1100)
    assert out["query_scores"].shape == (out["queries"], out["db_images"])
