"""MASt3R's numbers on MASt3R-shaped features.

MASt3R's encoder ends in a LayerNorm, so its tokens lie in a hyperplane and the whitening MASt3R learns for them
(its ``pcawhitenlearn_shrinkage`` on float32 features) has a condition number around 1e7; MASt3R applies it in
float64. The oracle here is MASt3R's Retriever re-derived: DUSt3R's image loading, a backbone ending in a
LayerNorm, MASt3R's head formulas in torch (float64 whitening, float32 projector and attention, MASt3R's casts),
and asmk 0.1.1 with MASt3R's parameters. jasmk's Retriever must give the same features, ASMK* codes, scores,
MASt3R-SfM pairs and SLAM-style retrievals, except where two scores are within 1e-6 of each other (near-ties).
A control run with float32 whitening (jasmk before it computed whitening in float64) shows the checks can fail.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL_Image = pytest.importorskip("PIL.Image")
pytest.importorskip("asmk")

from helpers import (  # noqa: E402
    LN_NCLUSTERS,
    LN_NFEAT,
    LayerNormBackbone,
    MASt3RHead,
    asmk_params,
    build_checkpoint,
    mast3r_oracle,
    tokens_of,
    write_scenes,
)

NCLUSTERS, NFEAT = LN_NCLUSTERS, LN_NFEAT
N_SCENES, VIEWS = 50, 4  # 200 images to index and query
N_TRAIN = 30    # other images: whitening and codebook are learned on them, as MASt3R learns them on its training set
TIE = 1e-6      # scores closer than this are near-ties: their order may differ
NA, K = 10, 5   # MASt3R-SfM scene graph retrieval-10-5
SLAM_K, SLAM_MIN = 3, 5e-3  # MASt3R-SLAM's retrieval: k and min_thresh of its config


def reference_features(ref, backbone, paths):
    """MASt3R's extract_local_features re-derived: per image, the backbone, then forward_local, flattened."""
    feats, ids = [], []
    for i, t in enumerate(tokens_of(backbone, paths)):
        f = ref.forward_local(t)[0][0].numpy()
        feats.append(f)
        ids.append(np.full(f.shape[0], i, np.int64))
    return np.concatenate(feats), np.concatenate(ids)


def asmk_scores(centroids, feats, ids, *, binary):
    """MASt3R's Retriever scoring re-derived with asmk 0.1.1: index all, query all, scores[query, database]."""
    from helpers import asmk_with_centroids

    method = asmk_with_centroids(asmk_params(size=NCLUSTERS, binary=binary), centroids)
    _, _, ranks, ranked = method.build_ivf(feats, ids).query_ivf(feats, ids)
    scores = np.empty_like(ranked)
    scores[np.arange(ranked.shape[0])[:, None], ranks] = ranked
    return scores


# ---------------------------------------------------------------------------------------------------------
# comparisons that tolerate near-ties only


def tie_groups(ref_row, tol=TIE):
    """Group id of each entry of ``ref_row``: entries sorted by decreasing score, a new group wherever the gap to
    the previous one is at least ``tol`` (so near-tied entries chain into one group)."""
    order = np.argsort(-ref_row, kind="stable")
    gaps = -np.diff(ref_row[order])
    groups = np.empty(len(ref_row), np.int64)
    groups[order] = np.concatenate([[0], np.cumsum(gaps >= tol)])
    return groups


def assert_rankings_match(ref, got, tol=TIE):
    """Every row of ``got`` ranks the columns as ``ref`` does, up to the order inside near-tie groups.
    Returns the rows whose order differs at all (inside tie groups)."""
    reordered = []
    for i in range(ref.shape[0]):
        groups = tie_groups(ref[i], tol)
        order = np.argsort(-got[i], kind="stable")
        assert (np.diff(groups[order]) >= 0).all(), f"row {i} ranks differently beyond near-ties"
        if not np.array_equal(order, np.argsort(-ref[i], kind="stable")):
            reordered.append(i)
    return reordered


def tied_at(ref_row, k, thresh=None, tol=TIE):
    """Whether the top-``k`` set of ``ref_row`` (scores above ``thresh``) could change with a near-tie: the k-th and
    (k+1)-th scores within ``tol``, or a score within ``tol`` of the threshold."""
    s = np.sort(ref_row)[::-1]
    if k < len(s) and s[k - 1] - s[k] < tol:
        return True
    return thresh is not None and bool((np.abs(ref_row - thresh) < tol).any())


def slam_retrievals(scores, *, k=SLAM_K, min_thresh=SLAM_MIN):
    """MASt3R-SLAM's retrieval database, re-derived on a score matrix: keyframe ``i`` queries the keyframes added
    before it (no idf, so a score does not depend on what else the database holds), takes the ``k`` best and keeps
    those scoring above ``min_thresh``."""
    out = []
    for i in range(1, scores.shape[0]):
        prev = scores[i, :i]
        top = np.argsort(-prev, kind="stable")[:min(k, i)]
        out.append(set(top[prev[top] > min_thresh].tolist()))
    return out


def compare_pairs_and_slam(ref, got):
    """MASt3R-SfM pairs (retrieval-Na-k, MASt3R's procedure re-derived) and SLAM retrievals from ``ref`` and from
    ``got`` (jasmk's pair graph): equal except in rows with a near-tie at the cut. Returns the counts of pairs,
    differing pairs and differing retrievals explained by near-ties."""
    from jasmk import pairs as pr

    ref_pairs, ref_keys = mast3r_oracle(ref, NA, K, 0)
    pairs, keys = pr.retrieval_pairs(got, na=NA, k=K, seed=0)
    np.testing.assert_array_equal(keys, ref_keys)
    diff = set(map(tuple, ref_pairs)) ^ set(map(tuple, pairs.tolist()))
    tied = {i for i in range(ref.shape[0]) if tied_at(ref[i], K)}
    assert all(i in tied or j in tied for i, j in diff), (sorted(diff), sorted(tied))
    slam_diff = 0
    for i, (a, b) in enumerate(zip(slam_retrievals(ref), slam_retrievals(got)), start=1):
        if a != b:
            assert tied_at(ref[i, :i], SLAM_K, SLAM_MIN), (i, a, b)
            slam_diff += 1
    return len(ref_pairs), len(diff), slam_diff


def code_differences(centroids, ref_feats, feats, ids):
    """ASMK* codes (per image and visual word, the sign bits of the summed residuals) of two feature sets, for the
    database side (one word per feature) and the query side (five). Returns ``(bits that differ, images whose
    words or bits differ)``; asserts every differing bit belongs to a component within rounding of zero."""
    from jasmk import api

    flipped, unclean = 0, set()
    for ma in (1, 5):
        a = api.aggregate_images(centroids, ref_feats, ids, binary=True, multiple_assignment=ma)
        b = api.aggregate_images(centroids, feats, ids, binary=True, multiple_assignment=ma)
        for img in np.unique(ids):
            ra, rb = np.flatnonzero(a.images == img), np.flatnonzero(b.images == img)
            if not np.array_equal(a.words[ra], b.words[rb]):
                unclean.add(int(img))
                continue
            xor = np.asarray(a.vecs[ra] ^ b.vecs[rb], np.uint32)  # packed most significant bit first
            bits = ((xor[..., None] >> np.arange(31, -1, -1, dtype=np.uint32)) & 1).reshape(len(ra), -1)
            bits = bits[:, :centroids.shape[1]]
            if not bits.any():
                continue
            unclean.add(int(img))
            flipped += int(bits.sum())
            # float64 re-derivation: the summed residual of each differing component is ~0 against its vector
            x = ref_feats[ids == img].astype(np.float64)
            d2 = ((x[:, None, :] - centroids[None].astype(np.float64)) ** 2).sum(-1)
            words = np.argsort(d2, axis=1, kind="stable")[:, :ma]
            for r, c in zip(*np.nonzero(bits)):
                w = a.words[ra[r]]
                members = x[(words == w).any(1)] - centroids[w]
                v = members.sum(0)
                assert abs(v[c]) <= 1e-5 * np.linalg.norm(members, axis=1).sum(), (img, w, c, v[c])
    return flipped, unclean


# ---------------------------------------------------------------------------------------------------------
# the cases: MASt3R's training-free head (post-whitening on the tokens), a head with a projector (pre-whitening on
# the tokens, post-whitening on the projected features), and a well-conditioned whitening (no LayerNorm)

CASES = {
    "trainingfree": dict(layernorm=True, prewhiten=None, hdims="", postwhiten=-1),
    "projector": dict(layernorm=True, prewhiten=1, hdims="96_64", postwhiten=0),
    "well-conditioned": dict(layernorm=False, prewhiten=None, hdims="", postwhiten=-1),
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    train = write_scenes(folder / "train", rng, N_TRAIN, 1, "t")
    paths = write_scenes(folder / "db", rng, N_SCENES, VIEWS, "s")
    return folder, train, paths


@pytest.fixture(scope="module", params=list(CASES))
def case(request, scenes):
    from jasmk import mast3r

    folder, train, paths = scenes
    spec = CASES[request.param]
    backbone = LayerNormBackbone(layernorm=spec["layernorm"])
    ckpt, ref = build_checkpoint(folder, request.param.replace("-", ""), backbone=backbone, train_paths=train,
                                 prewhiten=spec["prewhiten"], hdims=spec["hdims"], postwhiten=spec["postwhiten"])
    ref_feats, ref_ids = reference_features(ref, backbone, paths)
    retriever = mast3r.Retriever(ckpt, backbone=backbone, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=__import__("jasmk.head").head.WhiteningPrecisionWarning)
        scores = retriever(paths)
        feats, ids = retriever.local_features(paths)
    import pickle

    with open(retriever.codebook_path, "rb") as handle:
        centroids = pickle.load(handle)["state"]["centroids"]
    return dict(name=request.param, ref=ref, backbone=backbone, paths=paths, ref_feats=ref_feats, ref_ids=ref_ids,
                feats=feats, ids=ids, scores=scores, centroids=centroids,
                ref_scores=asmk_scores(centroids, ref_feats, ref_ids, binary=True))


def test_the_whitening_is_conditioned_as_mast3rs(case):
    conds = {k: np.linalg.cond(p.numpy()) for k, (m, p) in case["ref"].whiteners.items()}
    if case["name"] == "well-conditioned":
        assert conds["postwhiten"] < 1e3
    else:  # learned on LayerNorm'd tokens: MASt3R's ~1e7
        assert conds["postwhiten" if case["name"] == "trainingfree" else "prewhiten"] > 1e7, conds
    print(case["name"], {k: f"{v:.1e}" for k, v in conds.items()})


def test_local_features_match_mast3r(case):
    np.testing.assert_array_equal(case["ids"], case["ref_ids"])
    f, rf = case["feats"], case["ref_feats"]
    err = np.abs(f - rf).max(1) / np.linalg.norm(rf, axis=1)
    if case["ref"].projector:
        # the float32 projector rounds as torch's or XLA's summation order makes it (~1e-7); the post-whitening
        # amplifies that by up to its condition number
        cond = np.linalg.cond(case["ref"].whiteners["postwhiten"][1].numpy())
        assert err.max() <= 1e-7 * cond, (err.max(), cond)
    else:  # whitening alone: float64 from the same float32 tokens, the same float32 result
        assert err.max() <= 1e-6, err.max()
    print(case["name"], f"features: max relative difference {err.max():.1e}")


def test_asmk_star_codes_and_scores_match_mast3r(case):
    flipped, unclean = code_differences(case["centroids"], case["ref_feats"], case["feats"], case["ids"])
    clean = np.setdiff1d(np.arange(len(case["paths"])), sorted(unclean))
    ref, got = case["ref_scores"], case["scores"]
    assert got.shape == ref.shape == (len(case["paths"]),) * 2
    diff = np.abs(got - ref)[np.ix_(clean, clean)]
    assert diff.max() <= 1e-6, diff.max()
    assert len(unclean) <= 2, unclean  # a flipped bit is a rare event (a component within rounding of zero)
    assert len(np.unique(np.round(ref, 4))) > 300  # scores with content to compare
    print(case["name"], f"ASMK*: {flipped} code bits differ ({len(unclean)} images), "
          f"max score difference {diff.max():.1e}")


def test_sfm_pairs_and_slam_retrievals_match_mast3r(case):
    reordered = assert_rankings_match(case["ref_scores"], case["scores"])
    n_pairs, n_diff, slam_diff = compare_pairs_and_slam(case["ref_scores"], case["scores"])
    assert n_pairs > len(case["paths"])
    print(case["name"], f"{n_pairs} pairs, {n_diff} differ at near-ties; {slam_diff} SLAM retrievals differ at "
          f"near-ties; {len(reordered)} rows reorder near-tied images")


def test_real_valued_asmk_matches_mast3r_features_through_asmk(case):
    from jasmk import api

    ref = asmk_scores(case["centroids"], case["ref_feats"], case["ref_ids"], binary=False)
    index = api.build_index(case["feats"], case["ids"], codebook=case["centroids"], binary=False, use_idf=False,
                            multiple_assignment=1)
    got = api.score_matrix(index, case["feats"], case["ids"], multiple_assignment=5, alpha=3.0,
                           similarity_threshold=0.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert_rankings_match(ref, got)
    print(case["name"], f"ASMK: max score difference {np.abs(got - ref).max():.1e}")


def test_float32_whitening_fails_these_checks(scenes):
    """The control: MASt3R's head with its whitening computed in float32 (what jasmk did before) against the same
    oracle. Features, codes, scores, pairs and SLAM retrievals all move: the checks above can fail."""
    from jasmk import api

    folder, train, paths = scenes
    backbone = LayerNormBackbone()
    _, ref = build_checkpoint(folder, "control", backbone=backbone, train_paths=train, **{
        k: v for k, v in CASES["trainingfree"].items() if k != "layernorm"})
    f32 = MASt3RHead(projector=ref.projector, residual=False, nfeat=NFEAT, whitening_dtype=torch.float32)
    f32.whiteners = ref.whiteners
    ref_feats, ids = reference_features(ref, backbone, paths)
    feats, _ = reference_features(f32, backbone, paths)
    err = np.abs(feats - ref_feats).max(1) / np.linalg.norm(ref_feats, axis=1)
    assert err.max() > 1e-2
    centroids = np.asarray(api.train_codebook(ref_feats, size=NCLUSTERS, seed=0).centroids)
    with pytest.raises(AssertionError):  # code bits flip for components far from zero
        code_differences(centroids, ref_feats, feats, ids)
    ref_scores = asmk_scores(centroids, ref_feats, ids, binary=True)
    scores = asmk_scores(centroids, feats, ids, binary=True)
    assert np.abs(scores - ref_scores).max() > 1e-2
    with pytest.raises(AssertionError):
        assert_rankings_match(ref_scores, scores)
    assert slam_retrievals(scores) != slam_retrievals(ref_scores)
    with pytest.raises(AssertionError):
        compare_pairs_and_slam(ref_scores, scores)
