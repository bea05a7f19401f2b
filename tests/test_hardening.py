"""Hardening: saves never destroy data and survive crashes at every step, loads check versions and checksums,
and loading asmk pickles or MASt3R torch checkpoints never runs code."""

import json
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import asmk_params, clustered_data

import jasmk
from jasmk import cli
from jasmk.storage import checkpoint, safepickle


def centroids(seed, k=8, d=4):
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


def codebook(seed):
    return jasmk.Codebook.from_centroids(centroids(seed), size_param=8)


def loaded(path):
    return np.asarray(checkpoint.load_codebook(path).centroids)


def save_legacy(path, cents):
    """A codebook checkpoint in the first layout (``arrays/`` + ``meta.json``, format jasmk-checkpoint-1)."""
    import orbax.checkpoint as ocp

    os.makedirs(path)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "arrays"), {"centroids": np.asarray(cents)})
    with open(os.path.join(path, "meta.json"), "w") as handle:
        json.dump({"format": "jasmk-checkpoint-1", "kind": "codebook", "size_param": 8}, handle)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def assert_clean(path):
    """Only the pointer and one version folder: no lock, temporaries or old versions."""
    names = sorted(os.listdir(path))
    assert len(names) == 2 and names[0] == "CURRENT" and names[1].startswith("v-"), names


class Crash(BaseException):
    """A simulated kill: raised at a crash point, with nothing of the save's own cleanup running after it."""


SAVE_STEPS = ["locked", "arrays-written", "meta-written", "version-synced", "pointer-written", "published",
              "old-version-removed", "cleaned"]
PUBLISHED_FROM = SAVE_STEPS.index("published")


# ---------------------------------------------------------------------------------------------------------
# saves never destroy


def test_save_refuses_what_is_not_a_checkpoint_of_the_same_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" once meant the working directory, which a save then replaced
    with pytest.raises(ValueError, match="non-empty path"):
        checkpoint.save_codebook("", codebook(0))
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    with pytest.raises(ValueError, match="notes.txt"):
        checkpoint.save_codebook(f, codebook(0))
    assert f.read_text() == "precious"
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="photos.*non-empty directory"):
        checkpoint.save_codebook(d, codebook(0))
    assert os.listdir(d) == ["a.jpg"]

    checkpoint.save_codebook(tmp_path / "cb", codebook(1))
    before = sorted(os.listdir(tmp_path / "cb"))
    with pytest.raises(ValueError, match="holds a 'codebook' checkpoint"):
        checkpoint.save_tree(tmp_path / "cb", {"a": np.zeros(2)}, meta={"kind": "index"})
    with pytest.raises(ValueError, match="inside the jasmk checkpoint"):
        checkpoint.save_codebook(tmp_path / "cb" / "meta.json", codebook(0))
    with pytest.raises(ValueError, match="inside the jasmk checkpoint"):
        checkpoint.save_codebook(tmp_path / "cb" / "sub" / "x", codebook(0))
    version = next(n for n in before if n.startswith("v-"))
    with pytest.raises(ValueError, match="inside the jasmk checkpoint"):
        checkpoint.save_codebook(tmp_path / "cb" / version / "arrays", codebook(0))
    assert sorted(os.listdir(tmp_path / "cb")) == before
    np.testing.assert_array_equal(loaded(tmp_path / "cb"), centroids(1))
    legacy = tmp_path / "legacy"
    save_legacy(legacy, centroids(2))
    with pytest.raises(ValueError, match="inside the jasmk checkpoint"):
        checkpoint.save_codebook(legacy / "meta.json", codebook(0))
    with pytest.raises(ValueError, match="holds a 'codebook'"):
        checkpoint.save_tree(legacy, {"a": np.zeros(2)}, meta={"kind": "head"})

    empty = tmp_path / "empty"
    empty.mkdir()
    checkpoint.save_codebook(empty, codebook(3))  # an empty directory may be used
    np.testing.assert_array_equal(loaded(empty), centroids(3))
    checkpoint.save_codebook(empty, codebook(4))  # and a checkpoint of the same kind replaced
    np.testing.assert_array_equal(loaded(empty), centroids(4))
    assert_clean(empty)


def test_save_over_a_first_format_checkpoint(tmp_path):
    path = tmp_path / "cb"
    save_legacy(path, centroids(0))
    np.testing.assert_array_equal(loaded(path), centroids(0))  # the old layout still loads
    checkpoint.save_codebook(path, codebook(1))
    np.testing.assert_array_equal(loaded(path), centroids(1))
    assert_clean(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["versioned", "first-format"])
@pytest.mark.parametrize("step", SAVE_STEPS + ["legacy-meta-removed"])
def test_crash_at_every_step_keeps_a_complete_checkpoint(tmp_path, monkeypatch, step, legacy):
    if step == "legacy-meta-removed" and not legacy:
        pytest.skip("only a save over a first-format checkpoint removes its meta.json")
    if step == "old-version-removed" and legacy:
        pytest.skip("a first-format checkpoint has no older versions")
    path = str(tmp_path / "cb")
    if legacy:
        save_legacy(path, centroids(0))
    else:
        checkpoint.save_codebook(path, codebook(9))
        checkpoint.save_codebook(path, codebook(0))  # an old version to delete when the next save completes
    seen = []

    def crash(at):
        seen.append(at)
        if at == step:
            raise Crash(at)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_crash_point", crash)
        m.setattr(checkpoint, "_discard", lambda *paths: None)  # killed: no cleanup runs
        m.setattr(checkpoint, "_unlock", lambda lock: None)  # and the lock stays behind
        with pytest.raises(Crash):
            checkpoint.save_codebook(path, codebook(1))
    assert step in seen
    if step == "pointer-written":
        assert any(n.startswith("CURRENT.tmp-") for n in os.listdir(path))
    published = step in SAVE_STEPS[PUBLISHED_FROM:] or step == "legacy-meta-removed"
    np.testing.assert_array_equal(loaded(path), centroids(1 if published else 0))
    # the dead writer's lock is taken over, its leftovers removed, and the next save completes
    lock = os.path.join(path, ".lock")
    assert os.path.exists(lock)
    with open(lock, "w") as handle:
        handle.write(f"{dead_pid()}\n")
    checkpoint.save_codebook(path, codebook(2))
    np.testing.assert_array_equal(loaded(path), centroids(2))
    assert_clean(path)


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_failed_save_cleans_up_and_keeps_the_old(tmp_path, monkeypatch, step):
    path = str(tmp_path / "cb")
    checkpoint.save_codebook(path, codebook(0))
    checkpoint.save_codebook(path, codebook(5))

    def fail(at):
        if at == step:
            raise OSError(f"disk full at {at}")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_crash_point", fail)
        with pytest.raises(OSError):
            checkpoint.save_codebook(path, codebook(1))
    published = step in SAVE_STEPS[PUBLISHED_FROM:]
    np.testing.assert_array_equal(loaded(path), centroids(1 if published else 5))
    assert not os.path.exists(os.path.join(path, ".lock"))
    if not published:
        assert_clean(path)


def test_failing_replace_keeps_the_old(tmp_path, monkeypatch):
    path = tmp_path / "cb"
    checkpoint.save_codebook(path, codebook(0))

    def broken_replace(src, dst):
        raise OSError("EIO")

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "replace", broken_replace)
        with pytest.raises(OSError, match="EIO"):
            checkpoint.save_codebook(path, codebook(1))
    np.testing.assert_array_equal(loaded(path), centroids(0))
    assert_clean(path)
    with pytest.raises(OSError):  # a new path that fails is not left behind either
        with monkeypatch.context() as m:
            m.setattr(checkpoint.os, "replace", broken_replace)
            checkpoint.save_codebook(tmp_path / "new", codebook(1))
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("legacy", [False, True], ids=["versioned", "first-format"])
def test_reader_between_the_steps_of_a_save(tmp_path, monkeypatch, legacy):
    path = str(tmp_path / "cb")
    if legacy:
        save_legacy(path, centroids(0))
    else:
        checkpoint.save_codebook(path, codebook(0))
    reads = {}

    def read(at):
        reads[at] = loaded(path)

    monkeypatch.setattr(checkpoint, "_crash_point", read)
    checkpoint.save_codebook(path, codebook(1))
    monkeypatch.undo()
    expected = {"locked", "arrays-written", "meta-written", "version-synced", "pointer-written", "published",
                "cleaned"} | ({"legacy-meta-removed"} if legacy else set())
    assert expected <= set(reads)
    published = False
    for at in reads:  # insertion order is the order of the steps
        published = published or at == "published"
        np.testing.assert_array_equal(reads[at], centroids(1 if published else 0), err_msg=at)


def test_reader_retries_when_a_save_replaces_the_checkpoint_under_it(tmp_path, monkeypatch):
    path = str(tmp_path / "cb")
    checkpoint.save_codebook(path, codebook(0))
    real = checkpoint._load_version
    calls = []

    def racing(*args, **kwargs):
        if not calls:  # a complete save (and its cleanup) happens between reading CURRENT and the arrays
            calls.append(1)
            monkeypatch.setattr(checkpoint, "_load_version", real)
            checkpoint.save_codebook(path, codebook(1))
            monkeypatch.setattr(checkpoint, "_load_version", racing)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_load_version", racing)
    np.testing.assert_array_equal(loaded(path), centroids(1))


def test_concurrent_saves_serialize_on_the_lock(tmp_path, monkeypatch):
    path = str(tmp_path / "cb")
    checkpoint.save_codebook(path, codebook(0))
    lock = os.path.join(path, ".lock")
    with open(lock, "w") as handle:
        handle.write(f"{os.getpid()}\n")  # a live writer
    monkeypatch.setattr(checkpoint, "LOCK_TIMEOUT", 0.2)
    with pytest.raises(ValueError, match=r"\.lock"):
        checkpoint.save_codebook(path, codebook(1))
    with pytest.raises(ValueError, match=r"\.lock"):
        checkpoint.save_tree(path, {"centroids": centroids(1)}, meta={"kind": "codebook"}, lock_timeout=0.1)
    monkeypatch.undo()
    np.testing.assert_array_equal(loaded(path), centroids(0))
    with open(lock, "w") as handle:
        handle.write(f"{dead_pid()}\n")  # a dead one
    checkpoint.save_codebook(path, codebook(1))
    np.testing.assert_array_equal(loaded(path), centroids(1))

    # two threads: the second save waits for the first to finish
    holding, release = threading.Event(), threading.Event()

    def hook(at):
        if at == "arrays-written" and threading.current_thread().name == "first":
            holding.set()
            release.wait(20)

    monkeypatch.setattr(checkpoint, "_crash_point", hook)
    errors = []

    def run(seed):
        try:
            checkpoint.save_codebook(path, codebook(seed))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    first = threading.Thread(target=run, args=(2,), name="first")
    first.start()
    assert holding.wait(20)
    second = threading.Thread(target=run, args=(3,), name="second")
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # blocked on the lock
    np.testing.assert_array_equal(loaded(path), centroids(1))
    release.set()
    first.join(30)
    second.join(30)
    assert not errors
    np.testing.assert_array_equal(loaded(path), centroids(3))
    assert_clean(path)


# ---------------------------------------------------------------------------------------------------------
# format versions, checksums, range checks


def test_format_version_is_checked(tmp_path):
    path = tmp_path / "cb"
    checkpoint.save_codebook(path, codebook(0))
    meta_path = os.path.join(checkpoint._version_dir(path), "meta.json")
    meta = json.load(open(meta_path))
    assert meta["format"] == "jasmk-checkpoint-2" and meta["arrays"]["centroids"]["shape"] == [8, 4]
    json.dump({**meta, "format": "jasmk-checkpoint-9"}, open(meta_path, "w"))
    with pytest.raises(ValueError, match="jasmk-checkpoint-9.*jasmk-checkpoint-2"):
        checkpoint.load_codebook(path)
    pointer = json.load(open(path / "CURRENT"))
    json.dump({**pointer, "format": "jasmk-checkpoint-7"}, open(path / "CURRENT", "w"))
    with pytest.raises(ValueError, match="jasmk-checkpoint-7.*jasmk-checkpoint-2"):
        checkpoint.load_codebook(path)
    json.dump({**pointer, "version": "../../etc"}, open(path / "CURRENT", "w"))
    with pytest.raises(ValueError, match="bad version"):
        checkpoint.load_codebook(path)
    legacy = tmp_path / "legacy"
    save_legacy(legacy, centroids(0))
    json.dump({"format": "jasmk-checkpoint-0", "kind": "codebook"}, open(legacy / "meta.json", "w"))
    with pytest.raises(ValueError, match="jasmk-checkpoint-0"):
        checkpoint.load_codebook(legacy)


def test_flipped_byte_is_detected(tmp_path, small_data):
    feats, ids, cents = small_data
    path = tmp_path / "idx"
    checkpoint.save_index(path, jasmk.build_index(feats, ids, codebook=cents))
    arrays = os.path.join(checkpoint._version_dir(path), "arrays")
    files = [os.path.join(root, f) for root, _, names in os.walk(arrays) for f in names]
    largest = max(files, key=os.path.getsize)
    data = bytearray(open(largest, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(largest, "wb").write(bytes(data))
    with pytest.raises(ValueError):
        checkpoint.load_index(path)


def test_checksum_names_the_damaged_array(tmp_path):
    path = tmp_path / "cb"
    checkpoint.save_codebook(path, codebook(0))
    meta_path = os.path.join(checkpoint._version_dir(path), "meta.json")
    meta = json.load(open(meta_path))
    good = json.dumps(meta)
    meta["arrays"]["centroids"]["crc32"] ^= 1
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=r"centroids.*checksum"):
        checkpoint.load_codebook(path)
    meta = json.loads(good)
    meta["arrays"]["centroids"]["shape"] = [4, 8]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=r"centroids.*meta says"):
        checkpoint.load_codebook(path)
    meta = json.loads(good)
    meta["size_param"] = 16  # an edited static field
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="16"):
        checkpoint.load_codebook(path)


@pytest.mark.parametrize("bad", [np.full((8, 4), np.nan, np.float32), np.ones(8, np.float32),
                                 np.ones((2, 8, 4), np.float32)], ids=["nan", "1-D", "3-D"])
def test_load_codebook_range_checks(tmp_path, bad):
    checkpoint.save_tree(tmp_path / "cb", {"centroids": bad}, meta={"kind": "codebook", "size_param": 8})
    with pytest.raises(ValueError, match="centroids"):
        checkpoint.load_codebook(tmp_path / "cb")


# ---------------------------------------------------------------------------------------------------------
# loading never runs code: asmk pickles


class Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


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


# ---------------------------------------------------------------------------------------------------------
# loading never runs code: torch checkpoints


def test_mast3r_checkpoint_loads_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    from test_head import make_mast3r_checkpoint

    from jasmk import head

    path = str(tmp_path / "retrieval.pth")
    make_mast3r_checkpoint(path, c=8, hdims="8_6", residual=False, prewhiten=1, postwhiten=None, nfeat=4)
    config, _, info = head.load_mast3r_checkpoint(path)
    assert config.backbone_dim == 8 and info == {"imsize": 512, "nclusters": 1024}

    marker = tmp_path / "pwned"
    torch.save({"args": Hostile(marker), "model": {}}, str(tmp_path / "evil.pth"))
    with pytest.raises(ValueError, match="weights only"):
        head.load_mast3r_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError):
        head.load_mast3r_checkpoint(str(tmp_path / "empty.pth"))


def test_old_torch_is_refused(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from jasmk import head

    monkeypatch.delattr(torch.serialization, "safe_globals")
    with pytest.raises(ValueError, match="safe_globals"):
        head.load_mast3r_checkpoint(str(tmp_path / "x.pth"))


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
