"""Up-front memory checks honour the limits a user can set: here the process's address-space limit (``ulimit -v``),
set for real in a subprocess."""

import os
import subprocess
import sys
import textwrap

import pytest

resource = pytest.importorskip("resource")

SCRIPT = textwrap.dedent("""
    import resource, sys
    from jasmk.core import memory
    vm = memory.status_bytes("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, resource.RLIM_INFINITY))
    avail, source = memory.host_budget()
    print(avail <= 2 * 2**30, "RLIMIT_AS" in source)
    memory.require(2**30, "one GiB", hint="a test")  # within the limit: fine
    try:
        memory.require(3 * 2**30, "three GiB", hint="a test")
    except ValueError as exc:
        print("refused", "ulimit -v" in str(exc))
""")


def test_the_address_space_limit_is_part_of_the_budget(tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc: the limits cannot be read here")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True", "refused", "True"], run.stdout


HUGE_IDS = textwrap.dedent("""
    import resource, sys, tempfile
    import numpy as np
    import jasmk
    from jasmk.core import memory
    from jasmk.storage import checkpoint
    limit = 6 * 2**30  # ulimit -v 6G, as on many clusters
    if memory.status_bytes("VmSize") > limit - 2**30:
        print("skip"); sys.exit(0)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    ids = np.repeat([0, 10**9], 20)
    index = jasmk.build_index(x, ids, codebook=x[::3])
    res = jasmk.query(index, x, ids)
    path = tempfile.mkdtemp() + "/idx"
    checkpoint.save_index(path, index)
    back = jasmk.query(checkpoint.load_index(path), x, ids)
    assert (back.ranks == res.ranks).all() and (back.scores == res.scores).all()
    print(index.n_images, sorted(set(res.ranks.ravel().tolist())),
          (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
""")


def test_ids_up_to_a_billion_under_ulimit_v_6g():
    """Two images with ids 0 and 10**9 (40 descriptors) build, query, save and load under ``ulimit -v 6G``: slots
    follow the images (asmk's dense layout would need 10**9 slots, ~16 GB)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc: the limits cannot be read here")
    run = subprocess.run([sys.executable, "-c", HUGE_IDS], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    if run.stdout.strip() == "skip":
        pytest.skip("this process's address space is already near 6 GiB")
    words = run.stdout.split()
    assert words[0] == "2" and " ".join(words[1:3]) == "[0, 1000000000]", run.stdout
    assert int(words[3]) < 1024, f"peak RSS grew by {words[3]} MB"  # compilers and imports; no per-id arrays


def test_query_and_score_matrix_work_through_bounded_blocks_of_images(monkeypatch):
    """jasmk.query and jasmk.score_matrix quantize and aggregate a bounded block of whole query images at a time
    (the aggregated rows of a large query set are never all held): the same ranks, scores and matrix as one block,
    with gapped and huge ids, an image named in query_ids without descriptors, and precomputed words."""
    import numpy as np

    import jasmk
    from jasmk import api

    rng = np.random.default_rng(11)
    centroids = rng.standard_normal((32, 24)).astype(np.float32)
    sizes = rng.integers(1, 60, 40)
    qid_values = np.sort(rng.choice(10**6, 40, replace=False)) + 2**33  # beyond int32
    ids = np.repeat(qid_values, sizes)
    feats = (centroids[rng.integers(0, 32, ids.size)] + 0.4 * rng.standard_normal((ids.size, 24))).astype(np.float32)
    index = jasmk.build_index(feats[: ids.size // 2], ids[: ids.size // 2], codebook=centroids)
    named = np.concatenate([qid_values[:5], [7], qid_values[5:]])  # image 7 has no descriptors
    words = jasmk.quantize(centroids, feats, multiple_assignment=3)
    whole = jasmk.query(index, feats, ids, query_ids=named, word_ids=words, multiple_assignment=3)
    whole_matrix = jasmk.score_matrix(index, feats, ids, query_ids=named)
    sizes_seen = []
    real = api._aggregate_checked  # what each block runs

    def spy(cb, feats, ids, words, **kwargs):
        sizes_seen.append(len(feats))
        return real(cb, feats, ids, words, **kwargs)

    monkeypatch.setattr(api, "QUERY_BLOCK_DESCRIPTORS", 100)
    monkeypatch.setattr(api, "_aggregate_checked", spy)
    blocked = jasmk.query(index, feats, ids, query_ids=named, word_ids=words, multiple_assignment=3)
    assert len(sizes_seen) > 5 and max(sizes_seen) < 100 + sizes.max() and sum(sizes_seen) == ids.size
    for a, b in zip(blocked, whole):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jasmk.score_matrix(index, feats, ids, query_ids=named), whole_matrix)
    np.testing.assert_array_equal(whole.ids, named)
    assert (whole.scores[5] == 0).all() and whole.scores[6].max() > 0
    plain = jasmk.query(index, feats, ids, topk=3, word_ids=words, multiple_assignment=3)
    np.testing.assert_array_equal(plain.ids, qid_values)
    np.testing.assert_array_equal(plain.scores, whole.scores[np.arange(41) != 5][:, :3])
