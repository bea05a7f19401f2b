"""The experiment scripts: the offline real-photo demo and the HOW reproduction script's input handling."""

import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def test_photo_demo_retrieves_views_of_the_same_photo():
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    import demo_photos

    out = demo_photos.run(views=3, nfeatures=300, codebook=256, seed=0, verbose=False)
    assert out["photos"] >= 5
    assert out["map"] > 0.6 and out["map"] > out["chance"] + 0.4, out


def test_reproduce_how_runs_on_files_in_the_published_layout(tmp_path, capsys):
    """A tiny stand-in for the published pickles: the script reads them and prints Easy/Medium/Hard mAP."""
    import reproduce_how

    rng = np.random.default_rng(0)
    scenes = rng.standard_normal((4, 80, 16)).astype(np.float32)
    vecs = np.concatenate([scenes[i % 4][rng.choice(80, 40, replace=False)] + 0.2 * rng.standard_normal((40, 16))
                           for i in range(12)]).astype(np.float32)
    desc = {"vecs": vecs, "imids": np.repeat(np.arange(12), 40),
            "qvecs": vecs[:40 * 4], "qimids": np.repeat(np.arange(4), 40)}
    gnd = {"gnd": [{"easy": [i for i in range(12) if i % 4 == q and i != q], "hard": [], "junk": [q]}
                   for q in range(4)]}
    for name, obj in (("train.pkl", {"vecs": vecs}), ("feat.pkl", desc), ("gnd.pkl", gnd)):
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(obj, handle)
    reproduce_how.main(["--codebook-features", str(tmp_path / "train.pkl"), "--codebook-size", "32",
                        "--eval", "toy", str(tmp_path / "feat.pkl"), str(tmp_path / "gnd.pkl")])
    out = capsys.readouterr().out
    import jasmk
    from jasmk import eval as jeval

    index = jasmk.build_index(desc["vecs"], desc["imids"], codebook=jasmk.train_codebook(vecs, size=32))
    res = jasmk.query(index, desc["qvecs"], desc["qimids"])
    expected = jeval.evaluate_revisited(res.ranks, gnd["gnd"], n_db=12)
    assert f"toy: mAP E: {expected['easy']['map']:.1f}, M: {expected['medium']['map']:.1f}, H: nan" in out
    assert expected["medium"]["map"] > 50
    with pytest.raises(SystemExit, match="not found"):
        reproduce_how.main(["--codebook-features", str(tmp_path / "train.pkl"),
                            "--eval", "roxford5k", str(tmp_path / "missing.pkl"), str(tmp_path / "gnd.pkl")])
