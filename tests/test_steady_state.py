"""A steady state that never compiles: add-then-query loops within a reservation, counted on every kernel.

Compilations are counted with JAX's own monitoring event (one ``backend_compile_duration`` per XLA program
compiled), so a program served from JAX's caches does not count and every new one does.
"""

import numpy as np
import pytest
from helpers import assert_same_ranking, count_compilations

import jasmk
from jasmk.core import aggregate as agg_mod
from jasmk.core import cpu_kernel, ivf
from jasmk.core import engine as engine_mod

STEPS = 300
PER_IMAGE = 20
K, D = 256, 64


def frames(seed, n):
    """Descriptors of ``n`` images along a route through 40 places (revisits share descriptors)."""
    rng = np.random.default_rng(seed)
    places = rng.standard_normal((40, 3 * PER_IMAGE, D)).astype(np.float32)
    out = []
    for i in range(n):
        pick = rng.choice(3 * PER_IMAGE, PER_IMAGE, replace=False)
        out.append(places[(i // 3) % 40, pick] + 0.3 * rng.standard_normal((PER_IMAGE, D)).astype(np.float32))
    return out


def loop(index, cb, feats, kernel, *, start=0):
    """Each step: query the index with the new image (when it holds images), then add it. Returns the query
    results and the compilations counted after the first step that queries (the second)."""
    results = []
    with count_compilations() as compiles:
        for i, f in enumerate(feats):
            ids = np.full(len(f), start + i)
            if index.n_images:
                w = jasmk.quantize(cb, f, multiple_assignment=5)
                r = jasmk.query(index, f, ids, word_ids=w, kernel=kernel)
                results.append((r.ranks[0], r.scores[0]))
            index = jasmk.add_images(index, f, ids, word_ids=jasmk.quantize(cb, f, multiple_assignment=1))
            if i == 1:
                compiles.clear()
        n = len(compiles)
    return index, results, n


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    cb = jasmk.Codebook.from_centroids(rng.standard_normal((K, D)).astype(np.float32))
    return cb, frames(4, STEPS)


@pytest.mark.parametrize("binary,kernel", [(True, "dense"), (True, "sparse-xla"), (True, "auto"), (False, "auto"),
                                           (False, "sparse-xla")])
def test_a_reserved_loop_compiles_nothing_after_its_first_step(data, binary, kernel, monkeypatch):
    """300 keyframes added and queried one by one: with a reservation covering the run, no XLA kernel compiles
    after the first step, and the results are those of the unreserved index (bit for bit for ASMK*)."""
    cb, feats = data
    if binary and kernel == "auto":  # the XLA side of "auto" (the GPU path): the CPU kernel out of the way
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    empty = jasmk.empty_index(cb, binary=binary)
    reserved = jasmk.reserve(empty, images=STEPS, postings=STEPS * PER_IMAGE, kernel=kernel)
    index, got, n = loop(reserved, cb, feats, kernel)
    assert n == 0, f"{n} compilations in a reserved steady state ({kernel})"
    assert index.n_images == STEPS and len(index.segments) <= reserved.reservation.levels + 1
    assert {(s.capacity, s.image_capacity) for s in index.segments} <= set(reserved.reservation.shapes())
    ref = jasmk.build_index(np.concatenate(feats), np.repeat(np.arange(STEPS), PER_IMAGE), codebook=cb,
                            binary=binary, word_ids=jasmk.quantize(cb, np.concatenate(feats)))
    for i in (1, 57, 150, 299):  # query i saw images 0..i-1: the unreserved index cut to them gives the same
        sub = jasmk.build_index(np.concatenate(feats[:i]), np.repeat(np.arange(i), PER_IMAGE), codebook=cb,
                                binary=binary, word_ids=jasmk.quantize(cb, np.concatenate(feats[:i])))
        r = jasmk.query(sub, feats[i], np.full(PER_IMAGE, i), word_ids=jasmk.quantize(cb, feats[i],
                                                                                        multiple_assignment=5))
        if binary:  # ASMK*: the same bits from any kernel and segment layout
            np.testing.assert_array_equal(got[i - 1][0], r.ranks[0])
            np.testing.assert_array_equal(got[i - 1][1], r.scores[0])
        else:  # ASMK: float32 dot products rounded per kernel shape
            assert_same_ranking(got[i - 1][0][None], got[i - 1][1][None], r.ranks, r.scores)
    assert ref.n_images == index.n_images


def test_without_a_reservation_compilations_are_few_and_logged(data, caplog):
    """Without a reservation an XLA kernel compiles once per new segment shape (image slots double, postings
    follow their ladder), each logged at INFO: a handful over a 300-step run, never one per step."""
    cb, feats = data
    with caplog.at_level("INFO", logger="jasmk.core.engine"):
        index, _, n = loop(jasmk.empty_index(cb), cb, feats, "dense")
    logged = [r for r in caplog.records if "new shape" in r.getMessage()]
    assert 0 < n <= 8, n
    assert len(logged) >= 1
    assert {s.image_capacity for s in index.segments} <= {64, 128, 256}


def test_a_run_past_its_reservation_keeps_working(data, caplog):
    cb, feats = data
    reserved = jasmk.reserve(jasmk.empty_index(cb), images=40, postings=40 * PER_IMAGE, kernel="dense")
    with caplog.at_level("INFO", logger="jasmk"):
        index, got, _ = loop(reserved, cb, feats[:120], "dense")
    assert index.n_images == 120
    ref = jasmk.build_index(np.concatenate(feats[:119]), np.repeat(np.arange(119), PER_IMAGE), codebook=cb,
                            word_ids=jasmk.quantize(cb, np.concatenate(feats[:119])))
    r = jasmk.query(ref, feats[119], np.full(PER_IMAGE, 119),
                    word_ids=jasmk.quantize(cb, feats[119], multiple_assignment=5))
    np.testing.assert_array_equal(got[-1][1], r.scores[0])


def test_query_padded_in_a_reserved_loop_compiles_nothing(data):
    """``query_padded`` is compiled in pieces (aggregation, one per segment shape, the merge): segments that are
    added or merged within a reservation reuse them all."""
    cb, feats = data
    index = jasmk.reserve(jasmk.empty_index(cb), images=120, postings=120 * PER_IMAGE, kernel="dense",
                          topk=10, padded=(1, PER_IMAGE))
    with count_compilations() as compiles:
        for i, f in enumerate(feats[:120]):
            if index.n_images:
                ranks, scores = jasmk.query_padded(index, f[None], np.ones((1, PER_IMAGE), bool), topk=10)
            index = jasmk.add_images(index, f, np.full(PER_IMAGE, i), word_ids=jasmk.quantize(cb, f))
            if i == 1:
                compiles.clear()
        assert len(compiles) == 0, f"{len(compiles)} compilations"
    assert len(index.segments) > 1
    ref = jasmk.query(index, feats[0], np.zeros(PER_IMAGE, np.int64), topk=10, word_ids=np.asarray(
        jasmk.quantize_jax(index.centroids, feats[0], multiple_assignment=5)), kernel="dense")
    ranks, scores = jasmk.query_padded(index, feats[0][None], np.ones((1, PER_IMAGE), bool), topk=10)
    np.testing.assert_array_equal(np.asarray(ranks), ref.ranks)
    np.testing.assert_allclose(np.asarray(scores), ref.scores, rtol=1e-6)  # rsqrt on the device, 1/sqrt on the host


def test_a_background_warm_up_lets_the_caller_go_on(data):
    """``warm="background"`` compiles in a daemon thread; once it is done, the loop compiles nothing."""
    import threading

    cb, feats = data
    index = jasmk.reserve(jasmk.empty_index(cb), images=64, postings=64 * PER_IMAGE, kernel="dense",
                          warm="background")
    workers = [t for t in threading.enumerate() if t.name == "jasmk-warm-up"]
    assert workers
    for t in workers:
        t.join(timeout=300)
    _, _, n = loop(index, cb, feats[:64], "dense")
    assert n == 0


def test_reserve_checks_its_arguments(data):
    cb, _ = data
    empty = jasmk.empty_index(cb)
    with pytest.raises(ValueError, match="postings="):
        jasmk.reserve(empty, images=10)
    with pytest.raises(ValueError, match="images must be"):
        jasmk.reserve(empty, images=0, postings=10)
    with pytest.raises(ValueError, match="kernel must be"):
        jasmk.reserve(empty, images=10, postings=10, kernel="fast")
    with pytest.raises(ValueError, match="warm must be"):
        jasmk.reserve(empty, images=10, postings=10, warm="later")
    with pytest.raises(ValueError, match="padded must be"):
        jasmk.reserve(empty, images=10, postings=10, padded=(1,))
    assert engine_mod.xla_kernels(empty, "dense") == ("dense",)
    assert ivf.reserve(empty, images=10, postings=100).reservation.shapes()[0] == (4096, 16)


@pytest.mark.parametrize("jitted_aggregation", [False, True], ids=["host-aggregation", "jitted-aggregation"])
def test_query_keeps_a_bounded_set_of_programs_for_1_to_64_images_and_any_ma(data, jitted_aggregation, monkeypatch):
    """``jasmk.query`` on the XLA kernels pads batches (powers of two), rows (a ladder) and aggregation chunks
    (buckets): every query of 1..64 images at several multiple assignments runs one of a bounded set of programs,
    so a second pass with other images and other sizes compiles (almost) nothing: at most a step of the row ladder
    that the first pass's images did not reach. Also with ASMK* aggregated by the jitted path, as on a GPU (the CPU
    backend aggregates on the host)."""
    if jitted_aggregation:
        monkeypatch.setattr(agg_mod, "host_serves", lambda n_pairs, **_: False)
    cb, feats = data
    index = jasmk.build_index(np.concatenate(feats[:100]), np.repeat(np.arange(100), PER_IMAGE), codebook=cb)
    rng = np.random.default_rng(9)

    def run(order):
        with count_compilations() as compiles:
            for n, ma in order:
                pick = rng.choice(STEPS, n, replace=False)
                f = np.concatenate([feats[i] for i in pick])
                jasmk.query(index, f, np.repeat(np.arange(n), PER_IMAGE), multiple_assignment=ma, topk=5,
                            kernel="dense")
            return len(compiles)

    first = run([(n, 5) for n in range(1, 65)])
    assert 0 < first <= 40, first
    # other images in another order: their row counts may reach a step of the ladder not seen yet, nothing else
    assert run([(n, 5) for n in range(64, 0, -1)]) <= 3
    sizes = [(n, ma) for ma in range(1, 9) for n in (1, 7, 40)]
    assert run(sizes) <= 8 * 6  # a few aggregation / row programs per multiple assignment
    assert run(sizes[::-1]) <= 3  # the same sizes with other images
