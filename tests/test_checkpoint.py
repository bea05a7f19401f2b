"""Orbax checkpoints of codebook and index (round trip, atomic writes, clear errors) and asmk pickle import/export."""

import json
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import asmk_params, asmk_with_centroids, assert_same_ranking

import jasmk
from jasmk.core import ivf
from jasmk.storage import checkpoint


def test_codebook_and_index_round_trip(tmp_path, small_data):
    feats, ids, centroids = small_data
    cb = jasmk.Codebook.from_centroids(centroids, size_param=64)
    index = jasmk.build_index(feats, ids, codebook=cb, use_idf=True)
    checkpoint.save_codebook(tmp_path / "cb", cb)
    checkpoint.save_index(tmp_path / "idx", index)
    cb2 = checkpoint.load_codebook(tmp_path / "cb")
    np.testing.assert_array_equal(np.asarray(cb2.centroids), centroids)
    assert cb2.size_param == 64
    index2 = checkpoint.load_index(tmp_path / "idx")
    for name in ("n_images", "n_entries", "max_count", "imid_offset", "binary", "use_idf", "dim"):
        assert getattr(index2, name) == getattr(index, name)
    a = jasmk.query(index, feats, ids)
    b = jasmk.query(index2, feats, ids)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, small_data):
    feats, ids, centroids = small_data
    old = jasmk.build_index(feats[ids < 10], ids[ids < 10], codebook=centroids)
    checkpoint.save_index(tmp_path / "idx", old)
    new = jasmk.build_index(feats, ids, codebook=centroids)

    import orbax.checkpoint as ocp

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_index(tmp_path / "idx", new)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temporary left behind
    loaded = checkpoint.load_index(tmp_path / "idx")
    assert loaded.n_images == 10
    np.testing.assert_array_equal(jasmk.query(loaded, feats, ids).ranks, jasmk.query(old, feats, ids).ranks)
    checkpoint.save_index(tmp_path / "idx", new)  # a completed save replaces it
    assert checkpoint.load_index(tmp_path / "idx").n_images == 24


def test_bad_checkpoints_raise_value_error(tmp_path, small_data):
    feats, ids, centroids = small_data
    checkpoint.save_codebook(tmp_path / "cb", jasmk.Codebook.from_centroids(centroids))
    checkpoint.save_index(tmp_path / "idx", jasmk.build_index(feats, ids, codebook=centroids))
    with pytest.raises(ValueError, match="not an index"):
        checkpoint.load_index(tmp_path / "cb")
    with pytest.raises(ValueError, match="not a codebook"):
        checkpoint.load_codebook(tmp_path / "idx")
    with pytest.raises(ValueError, match="no jasmk checkpoint"):
        checkpoint.load_index(tmp_path / "nothing")
    live = checkpoint._version_dir  # the folder holding the live arrays/ and meta.json
    with open(os.path.join(live(tmp_path / "idx"), "meta.json"), "w") as handle:
        handle.write("{ not json")
    with pytest.raises(ValueError, match="corrupt checkpoint meta"):
        checkpoint.load_index(tmp_path / "idx")
    import shutil

    shutil.rmtree(os.path.join(live(tmp_path / "cb"), "arrays"))
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint.load_codebook(tmp_path / "cb")
    with pytest.raises(ValueError, match="JSON"):
        checkpoint.save_tree(tmp_path / "x", {"a": np.zeros(2)}, meta={"bad": object()})


@pytest.mark.parametrize("binary,use_idf", [(True, False), (True, True), (False, False), (False, True)])
def test_import_asmk_pickles(tmp_path, small_data, binary, use_idf):
    from asmk import asmk_method

    feats, ids, _ = small_data
    params = asmk_params(size=64, binary=binary, use_idf=use_idf)
    cb_path, ivf_path = str(tmp_path / "cb.pkl"), str(tmp_path / "ivf.pkl")
    ref = asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(feats, cache_path=cb_path)
    ref = ref.build_ivf(feats, ids.copy(), cache_path=ivf_path)
    _, _, ref_ranks, ref_scores = ref.query_ivf(feats, ids)

    cb = checkpoint.load_asmk_codebook(cb_path)
    index = checkpoint.load_asmk_ivf(ivf_path, cb)
    assert index.binary == binary and index.use_idf == use_idf
    res = jasmk.query(index, feats, ids)
    assert_same_ranking(res.ranks, res.scores, ref_ranks, ref_scores)

    # export back: asmk searches jasmk's index identically
    from asmk import inverted_file

    state = pickle.loads(pickle.dumps(checkpoint.export_asmk_ivf(jasmk.build_index(
        feats, ids, codebook=cb, binary=binary, use_idf=use_idf))))
    ivf = inverted_file.IVF.initialize_from_state(state)
    np.testing.assert_allclose(ivf.norm_factor, ref.inverted_file.norm_factor, rtol=1e-6)
    np.testing.assert_allclose(ivf.idf, ref.inverted_file.idf, rtol=1e-6)
    exported = asmk_with_centroids(params, np.asarray(cb.centroids))
    exported = asmk_method.ASMKMethod(params, {}, codebook=exported.codebook, kernel=ref.kernel, inverted_file=ivf)
    _, _, r2, s2 = exported.query_ivf(feats, ids)
    assert_same_ranking(r2, s2, ref_ranks, ref_scores)


def test_compat_ivf_cache_and_distractors_paths(tmp_path, small_data):
    """jasmk.compat pickles its ivf in asmk's format: asmk loads jasmk's cache and vice versa."""
    from jasmk.compat import asmk_method

    feats, ids, centroids = small_data
    params = asmk_params(size=64, use_idf=True)
    cache = str(tmp_path / "ivf.pkl")
    ours = asmk_method.ASMKMethod(params, {}, codebook=jasmk.Codebook.from_centroids(centroids, size_param=64))
    built = ours.build_ivf(feats, ids, cache_path=cache)
    _, _, r1, s1 = built.query_ivf(feats, ids)
    ref = asmk_with_centroids(params, centroids).build_ivf(None, None, cache_path=cache)  # loads jasmk's pickle
    _, _, r2, s2 = ref.query_ivf(feats, ids)
    assert_same_ranking(r1, s1, r2, s2)
    reloaded = ours.build_ivf(None, None, cache_path=cache)
    assert "load_time" in reloaded.metadata["build_ivf"]
    _, _, r3, s3 = reloaded.query_ivf(feats, ids)
    np.testing.assert_allclose(s3, s1, atol=1e-6)

    # distractors: asmk's pickle as jasmk's distractor set
    dpath = str(tmp_path / "distractors.pkl")
    asmk_with_centroids(params, centroids).build_ivf(feats[ids < 12], ids[ids < 12].copy(), cache_path=dpath)
    q = ids >= 12
    with_d = ours.build_ivf(feats[q], ids[q] - 12, distractors_path=dpath)
    ref_d = asmk_with_centroids(params, centroids).build_ivf(feats[q], ids[q] - 12, distractors_path=dpath)
    _, _, r4, s4 = with_d.query_ivf(feats[q], ids[q] - 12)
    _, _, r5, s5 = ref_d.query_ivf(feats[q], ids[q] - 12)
    assert_same_ranking(r4, s4, r5, s5)
    with pytest.raises(ValueError, match="not its IVF"):
        checkpoint.load_asmk_ivf({"type": "Codebook"}, jasmk.Codebook.from_centroids(centroids))


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


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_postings_store_is_refused(tmp_path, small_data, damage):
    """The segments' postings live in stores (s-<hex>/*.npy) beside the version: a flipped byte, a truncated file or
    a missing one gives one ValueError naming the store."""
    feats, ids, cents = small_data
    path = tmp_path / "idx"
    checkpoint.save_index(path, jasmk.build_index(feats, ids, codebook=cents))
    files = [os.path.join(path, d, f) for d in os.listdir(path) if d.startswith("s-")
             for f in os.listdir(path / d)]
    target = max(files, key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    if damage == "flip":
        data[-1] ^= 0xFF
        open(target, "wb").write(bytes(data))
    elif damage == "truncate":
        open(target, "wb").write(bytes(data[: len(data) // 2]))
    else:
        os.unlink(target)
    with pytest.raises(ValueError, match=r"s-[0-9a-f]{32}"):
        checkpoint.load_index(path)


@pytest.mark.parametrize("damage", ["truncate-manifest", "flip-metadata", "remove-data"])
def test_a_damaged_array_store_is_refused_before_it_is_read(tmp_path, small_data, damage):
    """Truncated, altered or missing files of the array store are refused with one ValueError naming the file,
    before the array reader opens them (it printed asyncio tracebacks on stderr for a truncated manifest); the
    CLI prints that error and nothing else."""
    feats, ids, cents = small_data
    path = tmp_path / "idx"
    checkpoint.save_index(path, jasmk.build_index(feats, ids, codebook=cents))
    arrays = os.path.join(checkpoint._version_dir(path), "arrays")
    files = {os.path.relpath(os.path.join(r, f), arrays): os.path.join(r, f) for r, _, names in os.walk(arrays)
             for f in names}
    if damage == "truncate-manifest":
        victim = files["manifest.ocdbt"]
        os.truncate(victim, 10)
    elif damage == "flip-metadata":
        victim = files["_METADATA"]
        data = bytearray(open(victim, "rb").read())
        data[len(data) // 2] ^= 0x01  # same size
        open(victim, "wb").write(bytes(data))
    else:
        victim = max(files.values(), key=os.path.getsize)
        os.remove(victim)
    with pytest.raises(ValueError, match=os.path.basename(victim)):
        checkpoint.load_index(path)
    np.savez(tmp_path / "q.npz", feats=feats[:50], ids=ids[:50])
    run = subprocess.run([sys.executable, "-m", "jasmk", "query", str(path), str(tmp_path / "q.npz"), "--out",
                          str(tmp_path / "r.npz")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 2
    assert run.stderr.startswith("jasmk: error: checkpoint") and run.stderr.count("\n") == 1, run.stderr


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


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_an_index_with_an_id_gap_wider_than_a_segment_saves_and_loads(tmp_path, binary, dense):
    """Ids 0-4 and 300005-300009. In asmk's dense layout (jasmk.compat) the images between make segments without
    postings, which the array store cannot hold as zero-size arrays; compact ids (the default) keep 10 slots and
    an id map. Either way the index saves, loads and queries as before (bit for bit)."""
    rng = np.random.default_rng(0)
    ids = np.repeat(np.r_[np.arange(5), np.arange(300005, 300010)], 6)
    feats = rng.standard_normal((len(ids), 16)).astype(np.float32)
    if dense:
        index = jasmk.add_images(ivf.empty(feats[::7], binary=binary, use_idf=False, dense_ids=True), feats, ids)
        assert any(s.n_entries == 0 for s in index.segments)
    else:
        index = jasmk.build_index(feats, ids, codebook=feats[::7], binary=binary)
        np.testing.assert_array_equal(index.image_ids, np.unique(ids))
    checkpoint.save_index(tmp_path / "idx", index)
    back = checkpoint.load_index(tmp_path / "idx")
    assert back.n_images == index.n_images == (300010 if dense else 10)
    assert back.dense_ids == dense and back.ids == index.ids
    a, b = jasmk.query(index, feats, ids, topk=8), jasmk.query(back, feats, ids, topk=8)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert set(np.unique(a.ranks)) <= set(np.unique(ids).tolist())


def _files(path) -> dict:
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            out[os.path.join(root, name)] = os.path.getsize(os.path.join(root, name))
    return out


@pytest.mark.parametrize("use_idf", [False, True])
def test_saving_over_its_own_checkpoint_writes_only_what_changed(tmp_path, use_idf):
    """Lucene-style commits: after one image is added, a save over the index's checkpoint (the one it was saved to,
    or loaded from) writes the new segment's postings, the per-image and per-word arrays and a manifest, not the
    other segments or the codebook; versions share stores, and stores no version names are deleted."""
    rng = np.random.default_rng(0)
    n, per = 3000, 30
    feats = rng.standard_normal((n * per, 64)).astype(np.float32)
    ids = np.repeat(np.arange(n), per)
    cb = feats[:: 97][:512]
    index = jasmk.build_index(feats, ids, codebook=cb, use_idf=use_idf)
    path = tmp_path / "idx"
    checkpoint.save_index(path, index)
    first = _files(path)
    postings = index.n_entries * (index.width * 4 + 8)
    assert sum(first.values()) > postings
    for step, start in enumerate((index, checkpoint.load_index(path))):  # saved from memory, or loaded
        grown = jasmk.add_images(start, feats[:per], np.full(per, n + step))
        before = _files(path)
        checkpoint.save_index(path, grown)
        after = _files(path)
        written = sum(size for name, size in after.items() if name not in before)
        # the new image's postings (30 rows) + per-image (n x 4 B norms) + per-word arrays + orbax's own files
        assert written < 0.1 * postings, (written, postings)
        assert written < 64 * 1024 + n * 4 + 3 * 512 * 4 + 30 * 5 * (index.width * 4 + 8), written
        stores = [d for d in os.listdir(path) if d.startswith("s-")]
        with open(path / [d for d in os.listdir(path) if d.startswith("v-")][0] / "meta.json") as handle:
            named = {e["name"] for e in json.load(handle)["stores"].values()}
        assert set(stores) == named  # the replaced segment's store went with the old version
        back = checkpoint.load_index(path)
        a, b = jasmk.query(grown, feats[:90], ids[:90], topk=5), jasmk.query(back, feats[:90], ids[:90], topk=5)
        np.testing.assert_array_equal(a.ranks, b.ranks)
        np.testing.assert_array_equal(a.scores, b.scores)
        index = grown
    # another path, or a store changed behind jasmk's back: written in full
    checkpoint.save_index(tmp_path / "other", index)
    assert sum(_files(tmp_path / "other").values()) > postings


def test_a_reader_overlapping_an_incremental_save_reads_one_complete_version(tmp_path, monkeypatch):
    """A reader that read the manifest of the old version when a save published a new one and deleted the old
    version's stores reads again, the new version, complete (never a mix)."""
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((600, 32)).astype(np.float32)
    ids = np.repeat(np.arange(20), 30)
    index = jasmk.build_index(feats, ids, codebook=feats[::9])
    path = tmp_path / "idx"
    checkpoint.save_index(path, index)
    bigger = jasmk.add_images(jasmk.build_index(feats[:300], ids[:300], codebook=feats[::9]), feats[300:], ids[300:])
    real, calls = checkpoint._read_store, []

    def racing(*args, **kwargs):
        if not calls:  # the whole save (new stores, publish, cleanup of the old ones) runs under the reader
            calls.append(1)
            checkpoint.save_index(path, bigger)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_read_store", racing)
    back = checkpoint.load_index(path)
    assert calls and len(back.segments) == len(bigger.segments)
    a, b = jasmk.query(bigger, feats[:60], ids[:60], topk=5), jasmk.query(back, feats[:60], ids[:60], topk=5)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_an_older_jasmk_refuses_the_newer_index_format_clearly(tmp_path, small_data):
    """Index checkpoints are format 3 (ids, shared stores): a jasmk that reads only format 2 says so; format-2
    index checkpoints (today's main before compact ids) still load."""
    feats, ids, centroids = small_data
    path = tmp_path / "idx"
    checkpoint.save_index(path, jasmk.build_index(feats, ids, codebook=centroids))
    with open(path / "CURRENT") as handle:
        assert json.load(handle)["format"] == "jasmk-checkpoint-3"
    formats = checkpoint._FORMATS
    try:
        checkpoint._FORMATS = ("jasmk-checkpoint-2",)  # what the previous jasmk read
        with pytest.raises(ValueError, match="format version 'jasmk-checkpoint-3'.*upgrade jasmk"):
            checkpoint.load_index(path)
    finally:
        checkpoint._FORMATS = formats
