"""The offline real-photo demo (RootSIFT on scikit-image's bundled photos): retrieval far above chance."""

import numpy as np
import pytest

from conftest import load_experiment

cv2 = pytest.importorskip("cv2")
pytest.importorskip("skimage")


def _demo():
    return load_experiment("demo_photos")


def numpy_ap(ranking, positives):
    """Trapezoid AP over a full ranking with no ignored images (the revisited protocol's rule)."""
    pos = [r for r, x in enumerate(ranking) if x in positives]
    return sum(((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / len(positives) for j, r in enumerate(pos))


@pytest.fixture(scope="module")
def demo_run():
    demo = _demo()
    return demo, demo.run(db_views=2, query_views=1, train_views=1, nfeatures=250, codebook=128, max_side=320,
                          na=3, k=2, seed=0, verbose=False)


def test_photos_load_offline_without_duplicates(demo_run):
    demo, out = demo_run
    photos = demo.load_photos(max_side=320)
    assert len(photos) >= 10 and out["photos"] == len(photos)
    arrays = [a for a, _ in photos.values()]
    assert all(a.dtype == np.uint8 and a.ndim == 2 and max(a.shape) <= 320 for a in arrays)
    assert len({a.tobytes() for a in arrays}) == len(arrays)  # 'cat' and 'chelsea' are one photo
    d = demo.rootsift(arrays[0], 100)
    assert d.shape[1] == 128 and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-4)  # RootSIFT is unit-norm
    assert (d >= 0).all()


def test_retrieval_far_above_random(demo_run):
    _, out = demo_run
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
