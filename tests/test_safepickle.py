"""Loading never runs code: asmk's pickles through the restricted unpickler, everywhere jasmk reads one."""

import pickle

import numpy as np
import pytest
from helpers import Hostile, asmk_params, clustered_data

import jasmk
from jasmk import cli
from jasmk.storage import checkpoint, safepickle

# ---------------------------------------------------------------------------------------------------------
# loading never runs code: asmk pickles


def centroids(seed, k=8, d=4):
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


def hostile_pickle(path, marker, *, wrap=True):
    payload = Hostile(marker)
    obj = {"type": "Codebook", "params": {"size": 8}, "state": {"centroids": payload}} if wrap else payload
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)
    return str(path)


def test_hostile_pickles_are_refused_everywhere(tmp_path, small_data, capsys):
    from jasmk.compat import asmk_method

    feats, ids, cents = small_data
    marker = tmp_path / "pwned"
    bad = hostile_pickle(tmp_path / "bad.pkl", marker)
    bad_ivf = str(tmp_path / "bad_ivf.pkl")
    with open(bad_ivf, "wb") as handle:
        pickle.dump({"type": "IVF", "params": {}, "state": {"counts": Hostile(marker)}}, handle)
    cb = jasmk.Codebook.from_centroids(cents, size_param=64)
    params = asmk_params(size=64)

    with pytest.raises(ValueError, match="refusing to unpickle posix.system|refusing to unpickle nt.system"):
        checkpoint.load_asmk_codebook(bad)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        checkpoint.load_asmk_ivf(bad_ivf, cb)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=bad)
    method = asmk_method.ASMKMethod(params, {}, codebook=cb)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        method.build_ivf(feats, ids, cache_path=bad_ivf)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        method.build_ivf(feats, ids, distractors_path=bad_ivf)
    np.savez(tmp_path / "db.npz", feats=feats, ids=ids)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quiet", "index", str(tmp_path / "db.npz"), "--codebook", bad, "--out", str(tmp_path / "i")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jasmk: error:") and "refusing to unpickle" in err
    assert not marker.exists()
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize("content", [b"", b"garbage, not a pickle", None, "truncated", "dir"])
def test_damaged_pickles_raise_value_error(tmp_path, content):
    path = tmp_path / "x.pkl"
    if content == "truncated":
        path.write_bytes(pickle.dumps({"type": "Codebook", "state": {"centroids": centroids(0)}})[:-40])
    elif content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read pickle"):
        checkpoint.load_asmk_codebook(path)
    from jasmk.storage import asmk_format

    with pytest.raises(ValueError):
        asmk_format.read_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_unpickler_reads_numpy_and_containers(protocol):
    obj = {"a": [np.arange(5, dtype=np.int64), None, np.float32(2.5), (1, 2.0, "s", b"b", True, 1j)],
           "b": {1, 2}, "c": np.zeros((3, 2), np.uint32), "d": np.int64(7), "e": np.array(["x", "y"])}
    back = safepickle.loads(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(back["a"][0], obj["a"][0])
    assert back["a"][2] == np.float32(2.5) and back["a"][3] == obj["a"][3] and back["b"] == {1, 2}
    np.testing.assert_array_equal(back["c"], obj["c"])
    assert back["d"] == 7 and back["c"].dtype == np.uint32
    np.testing.assert_array_equal(back["e"], obj["e"])
    marker = "/nonexistent-dir/pwned"
    with pytest.raises(ValueError, match="refusing to unpickle"):  # code hidden in an object array
        safepickle.loads(pickle.dumps(np.array([1, Hostile(marker)], dtype=object), protocol=protocol))


@pytest.mark.parametrize("binary", [True, False])
def test_real_asmk_pickles_load_through_the_safe_path(tmp_path, binary):
    from asmk import asmk_method as ref_method

    from jasmk.compat import asmk_method

    feats, ids = clustered_data(np.random.default_rng(3), n_images=10, per_image=40, dim=16)
    params = asmk_params(size=16, binary=binary, use_idf=True)
    cb_path, ivf_path = str(tmp_path / "cb.pkl"), str(tmp_path / "ivf.pkl")
    ref = ref_method.ASMKMethod.initialize_untrained(params).train_codebook(feats, cache_path=cb_path)
    ref.build_ivf(feats, ids.copy(), cache_path=ivf_path)
    for path in (cb_path, ivf_path):
        with open(path, "rb") as handle:
            trusted = pickle.load(handle)
        safe = safepickle.load(path)
        assert safe.keys() == trusted.keys() and safe["params"] == trusted["params"]
    cb = checkpoint.load_asmk_codebook(cb_path)
    np.testing.assert_array_equal(np.asarray(cb.centroids), ref.codebook.centroids)
    index = checkpoint.load_asmk_ivf(ivf_path, cb)
    assert index.n_images == 10 and index.binary == binary
    ours = asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=cb_path)
    built = ours.build_ivf(None, None, cache_path=ivf_path)
    assert "load_time" in built.metadata["build_ivf"]
    ours.build_ivf(feats, ids, distractors_path=ivf_path)
