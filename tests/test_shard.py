"""The sharded inverted file (jasmk.shard) against the single-device index (itself checked against asmk 0.1.1).

Tests named ``test_four_devices_*`` need four JAX devices: ``test_four_virtual_devices`` runs them in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set before JAX starts,
and the main test process has started it). ``test_two_processes_over_loopback`` runs two JAX processes (two CPU
devices each) joined by ``jax.distributed`` over 127.0.0.1, with gloo collectives.
"""

import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import clustered_data, count_compilations
from jax.sharding import Mesh

import jasmk
from jasmk import shard
from jasmk.shard import sharded
from jasmk.storage import checkpoint

FOUR = len(jax.devices()) >= 4
four_devices = pytest.mark.skipif(not FOUR, reason="needs 4 JAX devices: run by test_four_virtual_devices")
HERE = os.path.dirname(os.path.abspath(__file__))


def mesh_of(n, name="s"):
    return Mesh(np.array(jax.devices()[:n]), (name,))


def data(seed=7, n_images=24):
    rng = np.random.default_rng(seed)
    feats, ids = clustered_data(rng, n_images=n_images, per_image=60, dim=32)
    cent = feats[np.random.default_rng(1).choice(len(feats), 64, replace=False)]
    return feats, ids, cent


def assert_same(a, b):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.scores, b.scores)  # bit-identical, not just close


# ---------------------------------------------------------------------------------------------------------
# in the main process (any device count)


def test_balanced_cuts_split_by_postings():
    """New image slots are cut into contiguous pieces that bring every shard near the mean posting count."""
    rng = np.random.default_rng(0)
    per_slot = rng.integers(0, 50, 1000)
    for loads in (np.zeros(4, np.int64), np.array([9000, 0, 3000, 100])):
        cuts = sharded._balanced_cuts(loads, per_slot)
        assert cuts[0] == 0 and cuts[-1] == per_slot.size and np.all(np.diff(cuts) >= 0)
        got = loads + np.array([per_slot[a:b].sum() for a, b in zip(cuts[:-1], cuts[1:])])
        target = (loads.sum() + per_slot.sum()) / 4
        under = loads < target  # shards below the mean end within one image of it (or of their old load)
        assert np.all(np.abs(got[under] - target) <= per_slot.max()), (got, target)
        assert np.all(got[~under] == loads[~under])


def test_one_device_mesh_matches_index_and_checks_input():
    feats, ids, cent = data()
    mesh = mesh_of(1)
    ref = jasmk.build_index(feats, ids, codebook=cent, use_idf=True)
    sidx = shard.build_sharded(feats, ids, codebook=cent, mesh=mesh, use_idf=True)
    assert_same(shard.query(sidx, feats, ids, topk=5), jasmk.query(ref, feats, ids, topk=5))
    cases = [
        (lambda: shard.query(sidx, feats, ids, kernel="sparse-cpu"), "cannot run inside shard_map"),
        (lambda: shard.query(sidx, feats, ids, alpha=-1.0), "alpha"),
        (lambda: shard.query(sidx, feats, ids, topk=0), "topk"),
        (lambda: shard.build_sharded(feats, ids, codebook=cent, mesh="mesh"), "jax.sharding.Mesh"),
        (lambda: shard.build_sharded(feats, ids, codebook=cent, mesh=mesh, axis="x"), "not an axis"),
        (lambda: shard.add_images(sidx, feats[ids == 3], ids[ids == 3]), "already in the index"),
        (lambda: shard.build_sharded(feats, ids, codebook=cent, mesh=mesh, distractors=sidx, use_idf=False),
         "binary/use_idf"),
        (lambda: shard.query_aggregated(jasmk.build_index(feats, ids, codebook=cent),
                                        jasmk.aggregate_images(cent, feats, ids, binary=True,
                                                               multiple_assignment=5)), "ShardedIndex"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@pytest.mark.slow
def test_four_virtual_devices():
    """The four-device tests of this file, in a subprocess started with four virtual CPU devices."""
    if FOUR:
        pytest.skip("this process already has 4 devices: the four-device tests run here directly")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    names = [n for n in globals() if n.startswith("test_four_devices_")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "four_devices_"], env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True,
                          timeout=1500)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == len(names), tail
    assert "skipped" not in proc.stdout, tail


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    pid, n_proc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n_proc, process_id=pid,
                               initialization_timeout=120)
    from jax.sharding import Mesh
    sys.path.insert(0, sys.argv[5])
    from test_shard import data
    from jasmk import shard
    feats, ids, cent = data()
    mesh = Mesh(np.array(jax.devices()), ("s",))
    assert jax.process_count() == n_proc and len(jax.local_devices()) == 2 and len(jax.devices()) == 2 * n_proc
    m = ids < 16
    sidx = shard.build_sharded(feats[m], ids[m], codebook=cent, mesh=mesh, use_idf=True)
    sidx = shard.add_images(sidx, feats[~m], ids[~m])
    held = sorted(d.process_index for d in sidx.device_bytes())
    res = shard.query(sidx, feats, ids, topk=7)
    S = shard.score_matrix(sidx, feats, ids)
    from jasmk.storage import checkpoint
    loaded = shard.load_sharded_index(sys.argv[6], mesh)  # saved from one device: split again onto four
    res2 = shard.query(loaded, feats, ids, topk=7)
    np.savez(out, ranks=res.ranks, scores=res.scores, S=S, idf=np.asarray(sidx.idf.addressable_data(0)),
             local=np.array(shard.local_shards(mesh, "s")), held=np.array(held), ranks2=res2.ranks,
             scores2=res2.scores)
""")


@pytest.mark.slow
def test_two_processes_over_loopback(tmp_path):
    """Two JAX processes (2 CPU devices each, one 4-device mesh) joined by jax.distributed over loopback: each
    process builds and holds only its own shards; adds (cross-process psum of counts), the merged top-k and the
    score matrix equal the single-device index in both processes; a checkpoint saved from a 1-device mesh loads
    onto the 4-device mesh in both processes with the same results."""
    if not hasattr(jax, "distributed") or getattr(jax.config, "jax_cpu_collectives_implementation", None) is None:
        pytest.skip("this jaxlib has no CPU collectives for jax.distributed")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    feats, ids, cent = data()
    m = ids < 16
    one = shard.build_sharded(feats[m], ids[m], codebook=cent, mesh=mesh_of(1), use_idf=True)
    shard.save_sharded_index(tmp_path / "ckpt", shard.add_images(one, feats[~m], ids[~m]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), "2", str(port), str(tmp_path / f"out{i}.npz"),
                               HERE, str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any("gloo" in log.lower() and "not" in log.lower() and "support" in log.lower() for log in logs) \
            and any(p.returncode for p in procs):
        pytest.skip("this jaxlib's CPU backend does not support multi-process collectives: " + logs[0][-500:])
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ref = jasmk.build_index(feats[m], ids[m], codebook=cent, use_idf=True)
    ref = jasmk.add_images(ref, feats[~m], ids[~m])
    want = jasmk.query(ref, feats, ids, topk=7)
    want_s = jasmk.score_matrix(ref, feats, ids)
    for i in range(2):
        got = np.load(tmp_path / f"out{i}.npz")
        np.testing.assert_array_equal(got["ranks"], want.ranks)
        np.testing.assert_array_equal(got["scores"], want.scores)
        np.testing.assert_array_equal(got["S"], want_s)
        np.testing.assert_array_equal(got["idf"], np.asarray(ref.idf))
        np.testing.assert_array_equal(got["local"], [2 * i, 2 * i + 1])  # mesh order: process i holds 2i, 2i+1
        np.testing.assert_array_equal(got["held"], [i, i])  # and its arrays lie on its own two devices only
        np.testing.assert_array_equal(got["ranks2"], want.ranks)  # the checkpoint loaded in both processes
        np.testing.assert_array_equal(got["scores2"], want.scores)


# ---------------------------------------------------------------------------------------------------------
# four devices (run in the subprocess above)


@four_devices
def test_four_devices_query_and_score_matrix_match_one_device():
    """Ranks, scores (bit for bit) and the score matrix equal the single-device index, ASMK* and ASMK, idf on and
    off, for top-k and for every image slot (id gaps: empty slots score 0 and tie by id across shards)."""
    feats, ids, cent = data()
    mesh = mesh_of(4)
    gappy = ids * 2 + 1
    # ASMK*: every kernel gives the same bits, so the reference runs its own choice (the numba kernel on the CPU);
    # ASMK: the float32 dot products of the dense and sparse kernels may differ in the last bit, so both sides
    # run the same kernel
    runs = [(True, True, ids, [(5, "auto"), (None, "sparse-xla")], "auto"),
            (True, False, gappy, [(None, "dense")], None),
            (False, True, ids, [(5, "dense")], None)]
    for binary, use_idf, qids, queries, matrix in runs:
        ref = jasmk.build_index(feats, qids, codebook=cent, use_idf=use_idf, binary=binary)
        sidx = shard.build_sharded(feats, qids, codebook=cent, mesh=mesh, use_idf=use_idf, binary=binary)
        entries = sidx.shard_entries
        assert entries.sum() == ref.n_entries and entries.min() > 0.7 * entries.max()  # balanced by postings
        for topk, eng in queries:
            assert_same(shard.query(sidx, feats, qids, topk=topk, kernel=eng),
                        jasmk.query(ref, feats, qids, topk=topk, kernel="auto" if binary else eng))
        if matrix:
            np.testing.assert_array_equal(shard.score_matrix(sidx, feats, qids, kernel=matrix),
                                          jasmk.score_matrix(ref, feats, qids))
        sharded = sum(getattr(sidx, f).nbytes for f in ("vecs", "words", "images", "offsets", "norm_factor",
                                                          "scale", "gids", "shard_images"))
        replicated = sum(getattr(sidx, f).nbytes for f in ("centroids", "counts", "idf", "image_slots"))
        held = sidx.device_bytes()  # each device holds its own shard (a quarter) and the replicated arrays
        assert len(held) == 4 and set(held.values()) == {sharded // 4 + replicated}


@four_devices
def test_four_devices_adds_keep_idf_global_and_match_one_device():
    """Adds in chunks spread the new images over the emptiest shards (postings stay balanced; shards own several
    id ranges); counts are a cross-shard sum and idf follows asmk's rule: equal to one device's adds. Also
    sharding an existing index, and distractors."""
    feats, ids, cent = data()
    mesh = mesh_of(4)
    ref, sidx = None, None
    for lo, hi in [(0, 5), (5, 6), (6, 13), (13, 24)]:
        m = (ids >= lo) & (ids < hi)
        if ref is None:
            ref = jasmk.build_index(feats[m], ids[m], codebook=cent, use_idf=True)
            sidx = shard.build_sharded(feats[m], ids[m], codebook=cent, mesh=mesh, use_idf=True)
        else:
            ref = jasmk.add_images(ref, feats[m], ids[m])
            sidx = shard.add_images(sidx, feats[m], ids[m])
        np.testing.assert_array_equal(np.asarray(sidx.counts), np.asarray(ref.counts))
        np.testing.assert_array_equal(np.asarray(sidx.idf), np.asarray(ref.idf))
    owned = sorted(i for r in sidx.shard_ranges for a, b in r for i in range(a, b))
    assert owned == list(range(24)) and max(len(r) for r in sidx.shard_ranges) > 1
    assert_same(shard.query(sidx, feats, ids, topk=5), jasmk.query(ref, feats, ids, topk=5))
    assert_same(shard.query(shard.shard_index(ref, mesh), feats, ids, topk=5), jasmk.query(ref, feats, ids, topk=5))
    # distractors: the first 10 images as a distractor set, the rest numbered from 0
    m = ids < 10
    dref = jasmk.build_index(feats[m], ids[m], codebook=cent, use_idf=True)
    dsh = shard.build_sharded(feats[m], ids[m], codebook=cent, mesh=mesh, use_idf=True)
    ref = jasmk.build_index(feats[~m], ids[~m] - 10, codebook=cent, use_idf=True, distractors=dref)
    sidx = shard.build_sharded(feats[~m], ids[~m] - 10, codebook=cent, mesh=mesh, use_idf=True, distractors=dsh)
    assert_same(shard.query(sidx, feats, ids, topk=None), jasmk.query(ref, feats, ids, topk=None))
    assert shard.query(sidx, feats, ids, topk=None).ranks.min() == -10


@four_devices
def test_four_devices_checkpoint_round_trip_onto_other_mesh_sizes(tmp_path, monkeypatch):
    """A sharded checkpoint loads onto 4, 2, 3 and 1 devices with the same results; it is written atomically
    (an interrupted save keeps the old one), versioned and checked on load (damage raises ValueError)."""
    feats, ids, cent = data()
    mesh = mesh_of(4)
    m = ids < 14
    sidx = shard.build_sharded(feats[m], ids[m], codebook=cent, mesh=mesh, use_idf=True)
    sidx = shard.add_images(sidx, feats[~m], ids[~m])
    ref = jasmk.query(sidx_ref := jasmk.add_images(jasmk.build_index(feats[m], ids[m], codebook=cent, use_idf=True),
                                                   feats[~m], ids[~m]), feats, ids, topk=6)
    path = tmp_path / "sh"
    shard.save_sharded_index(path, sidx)
    for n in (4, 2, 3, 1):
        loaded = shard.load_sharded_index(path, mesh_of(n, "d"))
        assert loaded.n_shards == n and loaded.n_images == 24
        if n == 4:
            assert loaded.shard_ranges == sidx.shard_ranges
        assert_same(shard.query(loaded, feats, ids, topk=6), ref)
    # shards without images or postings (2 images on 4 shards) save and load too (Orbax stores no empty arrays)
    tiny = shard.build_sharded(feats[ids < 2], ids[ids < 2], codebook=cent, mesh=mesh, use_idf=True)
    assert (tiny.shard_entries == 0).sum() == 2
    shard.save_sharded_index(tmp_path / "tiny", tiny)
    want = jasmk.query(jasmk.build_index(feats[ids < 2], ids[ids < 2], codebook=cent, use_idf=True), feats, ids)
    for n in (4, 2):
        assert_same(shard.query(shard.load_sharded_index(tmp_path / "tiny", mesh_of(n)), feats, ids), want)
    # interrupted save: the old checkpoint stays
    import orbax.checkpoint as ocp

    small = shard.build_sharded(feats[ids < 4], ids[ids < 4], codebook=cent, mesh=mesh, use_idf=True)

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        shard.save_sharded_index(path, small)
    monkeypatch.undo()
    assert shard.load_sharded_index(path, mesh).n_images == 24
    with pytest.raises(ValueError, match="not a sharded index"):
        checkpoint.save_index(tmp_path / "single", sidx_ref)
        shard.load_sharded_index(tmp_path / "single", mesh)
    with pytest.raises(ValueError, match="holds a 'index' checkpoint"):
        shard.save_sharded_index(tmp_path / "single", sidx)  # never replaces another kind
    # damaged arrays (checksums) and inconsistent contents
    arrays, fields = shard.to_arrays(sidx)
    key = sorted(arrays["shards"])[1]
    sh = arrays["shards"][key]
    bad = [
        ({**fields, "shard_ranges": [[[0, 30]]] + fields["shard_ranges"][1:]}, arrays, "outside"),
        ({**fields, "shard_ranges": [fields["shard_ranges"][0] * 2] + fields["shard_ranges"][1:]}, arrays,
         "overlaps|normalization"),
        (fields, {**arrays, "shards": {**arrays["shards"], key: {**sh, "images": sh["images"] + 100}}}, "image ids"),
        (fields, {**arrays, "shards": {**arrays["shards"], key: {**sh, "words": sh["words"][::-1].copy()}}},
         "word ids"),
        (fields, {**arrays, "counts": arrays["counts"] + 1}, "counts"),
        (fields, {**arrays, "idf": np.full_like(arrays["idf"], np.nan)}, "idf"),
    ]
    for f, a, msg in bad:
        with pytest.raises(ValueError, match=msg):
            shard.from_arrays(a, f, mesh=mesh)
    version = [d for d in os.listdir(path) if d.startswith("v-")][0]
    victim = max((os.path.join(r, f) for r, _, fs in os.walk(path / version / "arrays") for f in fs),
                 key=os.path.getsize)
    with open(victim, "r+b") as handle:
        handle.seek(os.path.getsize(victim) // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="corrupt|checksum"):
        shard.load_sharded_index(path, mesh)


@four_devices
def test_four_devices_limits_and_no_recompilation(monkeypatch):
    """A shard past MAX_SHARD_ENTRIES is refused with the fix named; a query after an add that stays on the
    capacity steps compiles nothing."""
    feats, ids, cent = data(n_images=40)
    mesh = mesh_of(4)
    sidx = shard.build_sharded(feats[ids < 30], ids[ids < 30], codebook=cent, mesh=mesh)
    shard.query(sidx, feats[ids < 3], ids[ids < 3], topk=5, kernel="dense")
    with count_compilations() as compiles:
        grown = shard.add_images(sidx, feats[ids == 30], ids[ids == 30])
        assert grown.vecs.shape == sidx.vecs.shape and grown.norm_factor.shape == sidx.norm_factor.shape
        compiles.clear()
        res = shard.query(grown, feats[ids < 3], ids[ids < 3], topk=5, kernel="dense")
        assert compiles == [], f"{len(compiles)} compilations after an add"
        assert res.ranks.shape == (3, 5)
        monkeypatch.setattr(sharded, "MAX_SHARD_ENTRIES", 100)
        with pytest.raises(ValueError, match="more devices"):
            shard.add_images(grown, feats[ids >= 31], ids[ids >= 31])
