"""Everything that builds, saves: random id sets (gaps wider than a segment, single-image segments, distractors,
several adds, ASMK and ASMK*, idf on and off) go through build -> save -> load -> query and give the in-memory
results bit for bit, on a single device and sharded."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jasmk
from jasmk import shard
from jasmk.core import ivf
from jasmk.storage import checkpoint

D, PER = 16, 5


def random_case(seed):
    """``(batches of (feats, ids), binary, use_idf, distractor count)``: ids ascending across batches, with gaps
    (some wider than a segment's image slots) and runs of consecutive ids."""
    rng = np.random.default_rng(seed)
    ids, nxt = [], int(rng.integers(0, 3))
    for _ in range(int(rng.integers(6, 14))):
        ids.append(nxt)
        gap = rng.choice([1, 1, 1, 2, 50, ivf.MAX_SEGMENT_IMAGES + int(rng.integers(1, 1000))],
                         p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.1])
        nxt += int(gap)
    cuts = sorted(rng.choice(np.arange(1, len(ids)), size=min(2, len(ids) - 1), replace=False))
    batches = []
    for part in np.split(np.array(ids), cuts):
        n = np.repeat(part, PER)
        batches.append((rng.standard_normal((len(n), D)).astype(np.float32), n))
    return batches, seed % 2 == 0, seed % 4 >= 2, int(rng.integers(0, 3))  # every (binary, idf) pair twice


def test_the_cases_cover_what_they_should():
    cases = [random_case(s) for s in range(8)]
    wide = [c for c in cases if np.diff(np.unique(np.concatenate([i for _, i in c[0]]))).max()
            > ivf.MAX_SEGMENT_IMAGES]
    assert len(wide) >= 2 and sum(c[3] > 0 for c in cases) >= 2
    assert {(c[1], c[2]) for c in cases} == {(True, True), (True, False), (False, True), (False, False)}


def same(a, b):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("seed", range(8))
def test_build_save_load_query_is_bit_for_bit(tmp_path, seed):
    batches, binary, use_idf, n_distractors = random_case(seed)
    codebook = np.random.default_rng(100 + seed).standard_normal((24, D)).astype(np.float32)
    distractors = None
    if n_distractors:
        d = np.repeat(np.arange(n_distractors), PER)
        distractors = jasmk.build_index(np.random.default_rng(seed).standard_normal((len(d), D)).astype(np.float32),
                                        d, codebook=codebook, binary=binary, use_idf=use_idf)
    (f0, i0), rest = batches[0], batches[1:]
    dense = seed % 3 == 0  # asmk's dense layout (jasmk.compat's): a slot per id up to the largest
    if dense:
        start = ivf.empty(codebook, binary=binary, use_idf=use_idf, dense_ids=True)
        if distractors is not None:
            start = ivf.with_distractors(jasmk.add_images(start, *_distractor_feats(seed, n_distractors)))
        index = jasmk.add_images(start, f0, i0)
    else:
        index = jasmk.build_index(f0, i0, codebook=codebook, binary=binary, use_idf=use_idf, distractors=distractors)
    for f, i in rest:
        index = jasmk.add_images(index, f, i)
    names = np.unique(np.concatenate([i for _, i in batches]))
    if not dense:  # compact: a slot per image, distractors first (negative ids)
        np.testing.assert_array_equal(index.image_ids, np.r_[np.arange(-n_distractors, 0), names])
    q = np.concatenate([f for f, _ in batches])[: 6 * PER]
    qi = np.repeat(np.arange(6), PER)
    checkpoint.save_index(tmp_path / "idx", index)
    back = checkpoint.load_index(tmp_path / "idx")
    assert back.n_images == index.n_images and back.n_entries == index.n_entries
    same(jasmk.query(index, q, qi, topk=7), jasmk.query(back, q, qi, topk=7))
    # one more add after a gap, saved over the same checkpoint (an incremental save), loads bit for bit
    more = jasmk.add_images(back, q[:PER], np.full(PER, names[-1] + 1000))
    checkpoint.save_index(tmp_path / "idx", more)
    same(jasmk.query(more, q, qi, topk=7), jasmk.query(checkpoint.load_index(tmp_path / "idx"), q, qi, topk=7))
    # sharded (one device here: the save and load paths are the same for more)
    mesh = Mesh(np.array(jax.devices()[:1]), ("s",))
    sidx = shard.shard_index(index, mesh)
    shard.save_sharded_index(tmp_path / "sidx", sidx)
    sback = shard.load_sharded_index(tmp_path / "sidx", mesh)
    same(shard.query(sidx, q, qi, topk=7), shard.query(sback, q, qi, topk=7))
    same(shard.query(sidx, q, qi, topk=7), jasmk.query(index, q, qi, topk=7))
    # the sharded index grows the same way (and its id map saves)
    smore = shard.add_images(sback, q[:PER], np.full(PER, names[-1] + 1000))
    same(shard.query(smore, q, qi, topk=7), jasmk.query(more, q, qi, topk=7))
    shard.save_sharded_index(tmp_path / "sidx", smore)
    same(shard.query(shard.load_sharded_index(tmp_path / "sidx", mesh), q, qi, topk=7),
         jasmk.query(more, q, qi, topk=7))


def _distractor_feats(seed, n):
    d = np.repeat(np.arange(n), PER)
    return np.random.default_rng(seed).standard_normal((len(d), D)).astype(np.float32), d
