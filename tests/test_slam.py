"""MASt3R-SLAM's retrieval database: :class:`jasmk.mast3r.RetrievalDatabase` against MASt3R-SLAM's loop re-derived.

The oracle is MASt3R-SLAM's ``RetrievalDatabase`` re-derived from its formulas: MASt3R's head in torch (float64
whitening), word assignment by float32 expanded squared distances and ``torch.topk`` (five words to query, the
first of them to add), asmk 0.1.1's kernel and inverted file (``aggregate_image``, ``search``, ``aggregate``,
``add``) with MASt3R's parameters, ``torch.topk`` of the scores and the ``min_thresh`` cut. The keyframes are a
camera sequence through scenes and back (loop closures), with relocalisation queries (query only, then query and
add on success, as MASt3R-SLAM's ``relocalization``), seen by a backbone ending in a LayerNorm with MASt3R's
badly conditioned whitening.
"""

import multiprocessing
import pickle
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL.Image")
pytest.importorskip("asmk")

from helpers import (  # noqa: E402
    LN_IMSIZE,
    LN_NCLUSTERS,
    LayerNormBackbone,
    asmk_params,
    asmk_with_centroids,
    build_checkpoint,
    count_compilations,
    reference_load,
    write_scenes,
)

K, MIN_THRESH = 3, 5e-3  # MASt3R-SLAM's config: retrieval k and min_thresh
TIE = 1e-6  # scores closer than this (to each other at the k-th place, or to min_thresh) may order either way


class SlamOracle:
    """MASt3R-SLAM's ``RetrievalDatabase.update`` re-derived with asmk 0.1.1 and torch (see the module doc)."""

    def __init__(self, head, centroids):
        self.head = head
        self.params = asmk_params(size=LN_NCLUSTERS)  # MASt3R's: ASMK*, no idf, MA 1 / 5, alpha 3, threshold 0
        method = asmk_with_centroids(self.params, centroids)
        self.builder = method.create_ivf_builder()
        self.centroids = torch.from_numpy(np.asarray(centroids, np.float32))
        self.kf_counter, self.kf_ids = 0, []
        self.last_scores = None

    def words(self, x, k):
        c = self.centroids
        d = (x ** 2).sum(1)[:, None] + (c ** 2).sum(1)[None, :] - 2 * (x @ c.mT)
        return torch.topk(d, k, dim=1, largest=False).indices.numpy()

    def update(self, frame, add_after_query, k, min_thresh=0.0):
        x = self.head.forward_local(frame.feat)[0][0]  # [nfeat, dim] float32 torch
        x_np = x.numpy()
        ids = np.full(x_np.shape[0], self.kf_counter, np.int64)
        kern, ivf = self.builder.kernel, self.builder.ivf
        found, words = [], None
        self.last_scores = None
        if self.kf_counter > 0:
            q = self.params["query_ivf"]
            words = self.words(x, q["quantize"]["multiple_assignment"])
            ades, uwords = kern.aggregate_image(x_np, words)
            ranks, ranked = ivf.search(ades, uwords, topk=None,
                                       similarity_func=lambda *a: kern.similarity(*a, **q["similarity"]))
            scores = np.empty_like(ranked)
            scores[ranks] = ranked
            top = torch.topk(torch.from_numpy(scores), min(k, ivf.n_images))
            found = top.indices[top.values > min_thresh].tolist()
            self.last_scores = scores
        if add_after_query:
            ma = self.params["build_ivf"]["quantize"]["multiple_assignment"]
            words = self.words(x, ma) if words is None else words[:, :ma]
            ivf.add(*kern.aggregate(x_np, words, ids))
            self.kf_ids.append(int(ids[0]))
            self.kf_counter += 1
        return found


def near_tie(scores, k, thresh, tol=TIE):
    """Whether the top-``k`` list above ``thresh`` of ``scores`` could change with a near-tie."""
    s = np.sort(scores)[::-1]
    top = s[:k]
    if np.any(np.abs(np.diff(top)) < tol) or (k < len(s) and s[k - 1] - s[k] < tol):
        return True
    return bool((np.abs(scores - thresh) < tol).any())


def make_sequence(folder):
    """Keyframes of a camera going through 12 scenes (3 views each), then back through four of them (loop
    closures), with relocalisation events: ``[(kind, tokens [1, N, C])]``, kind ``"kf"`` (query and add),
    ``"reloc-ok"`` (query only, then query and add) or ``"reloc-fail"`` (query only)."""
    rng = np.random.default_rng(5)
    backbone = LayerNormBackbone()
    train = write_scenes(folder / "train", rng, 30, 1, "t")
    scenes = write_scenes(folder / "seq", rng, 12, 5, "s")  # views 0-2 on the way out, 3-4 when coming back
    by_scene = [scenes[5 * s:5 * s + 5] for s in range(12)]
    events = [("kf", p) for s in range(12) for p in by_scene[s][:3]]
    events.insert(20, ("reloc-fail", scenes[5 * 11 + 4]))  # a scene not seen yet: the relocalisation fails
    for s in (3, 7, 1, 9):  # coming back: loop closures
        events.append(("kf", by_scene[s][3]))
        events.append(("reloc-ok", by_scene[s][4]))
    tokens = [(kind, backbone(reference_load(p, LN_IMSIZE))) for kind, p in events]
    return backbone, train, tokens


@pytest.fixture(scope="module")
def slam_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slam")
    backbone, train, seq = make_sequence(folder)
    ckpt, head = build_checkpoint(folder, "slam", backbone=backbone, train_paths=train, prewhiten=None, hdims="",
                                  postwhiten=-1)
    with open(ckpt.replace("_trainingfree.pth", "_codebook.pkl"), "rb") as handle:
        centroids = pickle.load(handle)["state"]["centroids"]
    return dict(ckpt=ckpt, head=head, seq=seq, centroids=centroids, backbone=backbone)


def run_loop(db, seq, convert=lambda t: t):
    """MASt3R-SLAM's calls on ``db``: each keyframe ``update(add_after_query=True)``; a relocalisation queries only,
    and on success (``reloc-ok`` with a retrieval) queries again and adds. Returns every call's result and the
    reference scores of every query (when ``db`` is the oracle)."""
    out = []
    for kind, tokens in seq:
        frame = types.SimpleNamespace(feat=convert(tokens.clone()))
        if kind == "kf":
            out.append(("kf", db.update(frame, add_after_query=True, k=K, min_thresh=MIN_THRESH),
                        getattr(db, "last_scores", None)))
        else:
            found = db.update(frame, add_after_query=False, k=K, min_thresh=MIN_THRESH)
            out.append((kind, found, getattr(db, "last_scores", None)))
            if found and kind == "reloc-ok":
                out.append(("reloc-add", db.update(frame, add_after_query=True, k=K, min_thresh=MIN_THRESH),
                            getattr(db, "last_scores", None)))
        frame.feat = None  # MASt3R-SLAM may reuse the buffer: the database keeps nothing of it
    return out


def compare(ref, got):
    """Same calls, same keyframe lists in the same order, except where the oracle's scores hold a near-tie."""
    assert [r[0] for r in ref] == [g[0] for g in got]
    differing = 0
    for i, ((kind, a, scores), (_, b, _)) in enumerate(zip(ref, got)):
        if a != b:
            assert scores is not None and near_tie(scores, K, MIN_THRESH), (i, kind, a, b)
            differing += 1
    return differing


def test_retrieval_database_matches_mast3r_slams_loop(slam_case):
    from jasmk.mast3r import RetrievalDatabase

    m, p = slam_case["head"].whiteners["postwhiten"]
    assert np.linalg.cond(p.numpy()) > 1e7  # MASt3R's whitening of LayerNorm'd tokens
    oracle = SlamOracle(slam_case["head"], slam_case["centroids"])
    ref = run_loop(oracle, slam_case["seq"])
    db = RetrievalDatabase(slam_case["ckpt"], backbone=slam_case["backbone"], device="cpu")
    got = run_loop(db, slam_case["seq"])
    assert compare(ref, got) == 0
    assert db.kf_counter == oracle.kf_counter and db.kf_ids == oracle.kf_ids == list(range(oracle.kf_counter))
    # the sequence exercises what it should: loop closures (a keyframe retrieving one from long before) and a
    # relocalisation that succeeds (query, then query and add) and one that fails (query only)
    loops = [(i, r) for i, (kind, r, _) in enumerate(ref) if kind == "kf" and any(j < i - 6 for j in r)]
    assert len(loops) >= 3, ref
    assert any(kind == "reloc-add" for kind, _, _ in ref)
    assert any(kind == "reloc-fail" for kind, _, _ in ref)
    # the index holds what asmk's does: the first keyframes' scores against every keyframe, within float32 rounding
    import jasmk
    from jasmk import api

    codebook = jasmk.Codebook.from_centroids(slam_case["centroids"])

    kfs = [t for kind, t in slam_case["seq"] if kind == "kf"][:5]
    q = oracle.params["query_ivf"]
    kern, ivf = oracle.builder.kernel, oracle.builder.ivf
    for t in kfs:
        x = slam_case["head"].forward_local(t)[0][0]
        ades, uwords = kern.aggregate_image(x.numpy(), oracle.words(x, 5))
        ranks, ranked = ivf.search(ades, uwords, topk=None,
                                   similarity_func=lambda *a: kern.similarity(*a, **q["similarity"]))
        ref_scores = np.empty_like(ranked)
        ref_scores[ranks] = ranked
        f = np.asarray(db.prep_features(t)[0])
        words = jasmk.quantize(codebook, f, multiple_assignment=5, method="jax")  # SLAM's assignment
        got = api.score_matrix(db.index, f, np.zeros(len(f), np.int64), word_ids=words)[0]
        np.testing.assert_allclose(got, ref_scores, atol=1e-6)


def test_feature_kinds_and_a_float32_head_control(slam_case):
    """numpy and JAX features give the torch results; a float32-whitening head (jasmk before float64 whitening)
    changes retrievals on this sequence (the comparison can fail)."""
    import jax.numpy as jnp

    from jasmk.mast3r import RetrievalDatabase

    oracle = SlamOracle(slam_case["head"], slam_case["centroids"])
    ref = run_loop(oracle, slam_case["seq"])
    for convert in (lambda t: t.numpy(), lambda t: jnp.asarray(t.numpy())):
        db = RetrievalDatabase(slam_case["ckpt"], device="cpu")  # no backbone: the database needs none
        assert compare(ref, run_loop(db, slam_case["seq"], convert)) == 0
    head32 = type(slam_case["head"])(projector=slam_case["head"].projector, residual=False,
                                     nfeat=slam_case["head"].nfeat, whitening_dtype=torch.float32)
    head32.whiteners = slam_case["head"].whiteners
    control = run_loop(SlamOracle(head32, slam_case["centroids"]), slam_case["seq"])
    assert [r[1] for r in control] != [r[1] for r in ref]


def test_bad_calls_say_what_is_wrong(slam_case, tmp_path):
    import PIL.Image

    from jasmk.mast3r import RetrievalDatabase

    db = RetrievalDatabase(slam_case["ckpt"], device="cuda")  # no CUDA here: runs on the CPU, not an error
    tokens = slam_case["seq"][0][1]
    with pytest.raises(ValueError, match="k must be"):
        db.update(types.SimpleNamespace(feat=tokens), True, k=-1)
    with pytest.raises(ValueError, match=r"\.feat"):
        db.update(tokens, True, k=3)
    with pytest.raises(ValueError, match="one frame at a time"):
        db.update(types.SimpleNamespace(feat=torch.cat([tokens, tokens])), True, k=3)
    assert db.kf_counter == 0 and db.index is None
    with pytest.raises(ValueError, match="without a backbone"):
        PIL.Image.new("RGB", (64, 48)).save(tmp_path / "x.png")
        db([str(tmp_path / "x.png")])


def test_no_compilation_after_the_first_keyframe_on_the_xla_kernels(slam_case, monkeypatch):
    """The GPU path (XLA kernels; here on the CPU with the CPU kernel out of the way): after the first keyframe,
    queries and adds of the whole sequence compile nothing, and retrieve what the oracle retrieves."""

    from jasmk.core import cpu_kernel
    from jasmk.mast3r import RetrievalDatabase

    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    db = RetrievalDatabase(slam_case["ckpt"], device="cpu", reserve=64)
    seq = slam_case["seq"]
    first = db.update(types.SimpleNamespace(feat=seq[0][1]), True, k=K, min_thresh=MIN_THRESH)
    second = db.update(types.SimpleNamespace(feat=seq[1][1]), True, k=K, min_thresh=MIN_THRESH)  # first query
    assert db.wait_until_warm(timeout=300)  # the reserved shapes, compiled in the background from keyframe 0
    with count_compilations() as compiles:
        got = run_loop(db, seq[2:])
    assert compiles == [], f"{len(compiles)} compilations"
    oracle = SlamOracle(slam_case["head"], slam_case["centroids"])
    ref = run_loop(oracle, seq)
    assert compare(ref, [("kf", first, None), ("kf", second, None)] + got) == 0


def _spawned(ckpt, seq, queue):
    from jasmk.mast3r import RetrievalDatabase

    db = RetrievalDatabase(ckpt, device="cpu")
    queue.put([db.update(types.SimpleNamespace(feat=t), True, k=K, min_thresh=MIN_THRESH) for _, t in seq])


def test_works_in_a_spawned_process(slam_case):
    """MASt3R-SLAM's backend is a spawned process that receives the features as torch tensors."""
    from jasmk.mast3r import RetrievalDatabase

    seq = slam_case["seq"][:12]
    db = RetrievalDatabase(slam_case["ckpt"], device="cpu")
    here = [db.update(types.SimpleNamespace(feat=t), True, k=K, min_thresh=MIN_THRESH) for _, t in seq]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_spawned, args=(slam_case["ckpt"], seq, queue))
    proc.start()
    there = queue.get(timeout=300)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and there == here


def test_torch_frames_of_other_sizes_compile_nothing(slam_case):
    """Keyframes of other sizes (aspect ratios) within one step of the token ladder: the torch tensor is padded in
    torch before it reaches JAX, so neither the head nor its checks compile again; the features equal those of the
    unpadded frame."""

    from jasmk.head import model as head_mod
    from jasmk.mast3r import RetrievalDatabase

    db = RetrievalDatabase(slam_case["ckpt"], device="cpu")
    tokens = slam_case["seq"][0][1]
    sizes = [n for n in range(90, tokens.shape[1] + 1) if head_mod.token_capacity(n) == head_mod.token_capacity(100)]
    assert len(sizes) >= 4
    db.prep_features(tokens[:, :sizes[0]])
    with count_compilations() as compiles:
        got = [np.asarray(db.prep_features(tokens[:, :n])) for n in sizes[1:]]
    assert compiles == [], f"{len(compiles)} compilations"
    for n, g in zip(sizes[1:], got):
        ref = slam_case["head"].forward_local(tokens[:, :n])[0].numpy()
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)
