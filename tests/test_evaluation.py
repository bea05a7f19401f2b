"""Revisited Oxford/Paris evaluation against a loop-by-loop numpy re-derivation of revisitop's compute_map."""

import numpy as np
import pytest

from jasmk import evaluation as ev


def oracle_ap(pos, npos):
    """revisitop compute_ap: trapezoid over the (junk-shifted, 0-based) positions of the positives found."""
    ap = 0.0
    for j, r in enumerate(pos):
        prec0 = 1.0 if r == 0 else j / r
        prec1 = (j + 1) / (r + 1)
        ap += (prec0 + prec1) / 2.0 / npos
    return ap


def oracle_map(ranks_db_q, gnd, kappas):
    """revisitop compute_map with ranks [n_db, n_query] and gnd dicts with 'ok' / 'junk'.

    A positive missing from a truncated ranking adds nothing; mP@k of a query whose positives are all
    missing is 0 (revisitop itself would fail on max([]))."""
    nq = ranks_db_q.shape[1]
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i in range(nq):
        ok = list(gnd[i]["ok"])
        if len(ok) == 0:
            continue
        junk = list(gnd[i].get("junk", []))
        col = list(ranks_db_q[:, i])
        pos = [p for p, x in enumerate(col) if x in ok]
        jpos = [p for p, x in enumerate(col) if x in junk]
        shifted = []
        for p in pos:
            shifted.append(p - sum(1 for q in jpos if q < p))
        aps[i] = oracle_ap(shifted, len(ok))
        one_based = [p + 1 for p in shifted]
        for t, kk in enumerate(kappas):
            kq = min(max(one_based), kk) if one_based else 0
            prs[i, t] = sum(1 for p in one_based if p <= kq) / kq if kq else 0.0
    keep = ~np.isnan(aps)
    return aps[keep].mean(), aps, prs[keep].mean(axis=0), prs


def random_gnd(rng, n_db, nq):
    gnd = []
    for _ in range(nq):
        perm = rng.permutation(n_db)
        ne, nh, nj = rng.integers(0, 6), rng.integers(0, 5), rng.integers(0, 6)
        gnd.append({"easy": perm[:ne].tolist(), "hard": perm[ne:ne + nh].tolist(),
                    "junk": perm[ne + nh:ne + nh + nj].tolist(), "bbx": [0.0, 0.0, 10.0, 10.0]})
    gnd[0]["easy"], gnd[0]["hard"] = [], []  # no positives anywhere: left out of all three means
    gnd[1]["hard"], gnd[1]["easy"] = [], [int(gnd[1]["junk"][0]) if gnd[1]["junk"] else 0]
    gnd[1]["junk"] = [x for x in gnd[1]["junk"] if x not in gnd[1]["easy"]]
    return gnd


def protocol_gnd(gnd, name):
    ok_keys, junk_keys = {"easy": (["easy"], ["junk", "hard"]), "medium": (["easy", "hard"], ["junk"]),
                          "hard": (["hard"], ["junk", "easy"])}[name]
    return [{"ok": sum((list(g[k]) for k in ok_keys), []), "junk": sum((list(g[k]) for k in junk_keys), [])}
            for g in gnd]


@pytest.mark.parametrize("seed,n_db,nq,topk", [(0, 40, 12, None), (1, 80, 9, 25), (2, 15, 20, None)])
def test_revisited_protocol_matches_revisitop_oracle(seed, n_db, nq, topk):
    rng = np.random.default_rng(seed)
    gnd = random_gnd(rng, n_db, nq)
    # rankings biased towards the positives so that APs spread over (0, 1)
    scores = rng.standard_normal((nq, n_db))
    for q, g in enumerate(gnd):
        scores[q, g["easy"]] += 1.5
        scores[q, g["hard"]] += 0.7
    ranks = np.argsort(-scores, axis=1)[:, :topk]
    kappas = (1, 3, 5, 10)
    res = ev.evaluate_revisited(ranks, gnd, ks=kappas, n_db=n_db)
    for name in ("easy", "medium", "hard"):
        m, aps, mp, _ = oracle_map(ranks.T, protocol_gnd(gnd, name), kappas)
        assert res[name]["map"] == pytest.approx(100 * m, abs=1e-4), name
        np.testing.assert_allclose(res[name]["aps"], 100 * aps, atol=1e-4, equal_nan=True)
        assert res[name]["n_queries"] == int(np.isfinite(aps).sum())
        for kk, v in zip(kappas, mp):
            assert res[name]["mp@k"][kk] == pytest.approx(100 * v, abs=1e-4), (name, kk)
    assert all(np.isnan(res[n]["aps"][0]) for n in ("easy", "medium", "hard"))
    assert np.isnan(res["hard"]["aps"][1]) and np.isfinite(res["easy"]["aps"][1])
    if topk is None:
        # the same evaluation from the scores themselves
        res_s = ev.evaluate_revisited(scores=scores, gnd=gnd, ks=kappas)
        for name in ("easy", "medium", "hard"):
            assert res_s[name]["map"] == pytest.approx(res[name]["map"], abs=1e-6)


def test_compute_map_revisitop_layout_and_chunking(monkeypatch):
    rng = np.random.default_rng(5)
    n_db, nq = 50, 11
    gnd = [{"ok": rng.choice(n_db, rng.integers(1, 8), replace=False).tolist(),
            "junk": rng.choice(n_db, 3, replace=False).tolist()} for _ in range(nq)]
    gnd[2]["junk"].append(gnd[2]["ok"][0])  # overlapping lists: revisitop counts it as both positive and junk
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)  # [n_db, n_query]
    m_ref, aps_ref, pr_ref, prs_ref = oracle_map(ranks, gnd, [1, 5, 10])
    m, aps, pr, prs = ev.compute_map(ranks, gnd, kappas=[1, 5, 10])
    assert m == pytest.approx(m_ref, abs=1e-6)
    np.testing.assert_allclose(aps, aps_ref, atol=1e-6)
    np.testing.assert_allclose(pr, pr_ref, atol=1e-6)
    np.testing.assert_allclose(prs, prs_ref, atol=1e-6)
    # several padded chunks of queries give the same numbers
    monkeypatch.setattr(ev, "_CHUNK_ELEMENTS", 4 * n_db)
    m2, aps2, pr2, _ = ev.compute_map(ranks, gnd, kappas=[1, 5, 10])
    np.testing.assert_allclose(aps2, aps, atol=1e-7)
    assert m2 == pytest.approx(m, abs=1e-7)


def test_perfect_and_worst_rankings():
    n_db = 30
    gnd = [{"easy": [3, 7], "hard": [11], "junk": [0]}, {"easy": [1], "hard": [2, 29], "junk": []}]
    perfect = []
    for g in gnd:
        first = g["easy"] + g["hard"]
        perfect.append(first + [i for i in range(n_db) if i not in first])
    res = ev.evaluate_revisited(np.array(perfect), gnd, n_db=n_db)
    assert res["medium"]["map"] == pytest.approx(100.0)
    assert res["easy"]["map"] == pytest.approx(100.0)
    assert res["medium"]["mp@k"][1] == pytest.approx(100.0)
    worst = np.array([p[::-1] for p in perfect])
    m, _, _, _ = oracle_map(worst.T, protocol_gnd(gnd, "medium"), [1])
    assert ev.evaluate_revisited(worst, gnd, n_db=n_db)["medium"]["map"] == pytest.approx(100 * m, abs=1e-4)
    assert 100 * m < 20


def test_bad_input():
    gnd = [{"easy": [1], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match="more than once"):
        ev.evaluate_revisited(np.array([[1, 1, 2]]), gnd, n_db=5)
    with pytest.raises(ValueError, match="outside"):
        ev.evaluate_revisited(np.array([[0, 1, 9]]), gnd, n_db=5)
    with pytest.raises(ValueError, match="outside"):
        ev.evaluate_revisited(np.array([[0, 1, 2]]), [{"easy": [7], "hard": []}], n_db=5)
    with pytest.raises(ValueError, match="one per query"):
        ev.evaluate_revisited(np.array([[0, 1], [1, 0]]), gnd, n_db=5)
    with pytest.raises(ValueError, match="NaN"):
        ev.evaluate_revisited(scores=np.array([[0.5, np.nan, 0.1]]), gnd=gnd)
    with pytest.raises(ValueError, match="scores="):
        ev.evaluate_revisited(np.array([[0.5, 0.2, 0.1]]), gnd)
    with pytest.raises(ValueError, match="exactly one"):
        ev.evaluate_revisited(np.array([[0, 1, 2]]), gnd, scores=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="no 'hard'"):
        ev.evaluate_revisited(np.array([[0, 1, 2]]), [{"easy": [1]}], n_db=5)
    with pytest.raises(ValueError, match="kappas"):
        ev.evaluate_revisited(np.array([[0, 1, 2]]), gnd, ks=(0, 5), n_db=5)
    with pytest.raises(ValueError, match="n_query"):
        ev.mean_average_precision(np.zeros((2, 3), int), np.zeros((1, 5), bool), np.zeros((1, 5), bool))


def _import_reproduce_how():
    from helpers import load_experiment

    return load_experiment("reproduce_how")


def test_reproduce_how_reads_the_published_layout(tmp_path, capsys):
    """A toy stand-in for the HOW pickles in the asmk demo layout; the script's mAP equals the oracle's."""
    import pickle

    import jasmk

    rh = _import_reproduce_how()
    n_db, n_q = 12, 4
    desc, gnd = _standin(np.random.default_rng(3), n_db, n_q, n_easy=2)
    vecs, qvecs = desc["vecs"], desc["qvecs"]
    feats = tmp_path / "features"
    (tmp_path / "test" / "roxford5k").mkdir(parents=True)
    feats.mkdir()
    for path, obj in ((feats / "sfm120k_subset20k_how_r18_1000.pkl", {"vecs": vecs}),
                      (feats / "roxford5k_how_r18_1000.pkl", desc),
                      (tmp_path / "test" / "roxford5k" / "gnd_roxford5k.pkl",
                       {"gnd": gnd, "imlist": [f"db{i}" for i in range(n_db)],
                        "qimlist": [f"q{i}" for i in range(n_q)]})):
        with open(path, "wb") as handle:
            pickle.dump(obj, handle)
    out_json = tmp_path / "res.json"
    assert rh.main(["--data-root", str(tmp_path), "--datasets", "roxford5k", "--codebook-size", "16",
                    "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    cb = jasmk.train_codebook(vecs, size=16)
    res = jasmk.query(jasmk.build_index(desc["vecs"], desc["imids"], codebook=cb, multiple_assignment=1),
                      qvecs, desc["qimids"], multiple_assignment=5, alpha=3.0, similarity_threshold=0.0)
    maps = {name: 100 * oracle_map(res.ranks.T, protocol_gnd(gnd, name), [1])[0] for name in ("easy", "medium", "hard")}
    assert f"roxford5k: mAP E: {maps['easy']:.1f}, M: {maps['medium']:.1f}, H: {maps['hard']:.1f} " \
           f"(seed table M: 75.1)" in printed
    import json

    saved = json.loads(out_json.read_text())
    assert saved["params"]["codebook_size"] == 16 and saved["params"]["query_ma"] == 5
    assert saved["params"]["name"] == "eccv20_how_r18_1000"
    assert saved["results"][0]["medium"]["map"] == pytest.approx(maps["medium"], abs=1e-3)
    assert maps["medium"] > 50  # the toy scenes are retrievable

    # missing files: a clear message naming the file and where to get it, before any work starts
    (feats / "roxford5k_how_r18_1000.pkl").unlink()
    with pytest.raises(SystemExit, match=r"not found: .*roxford5k_how_r18_1000.pkl .*ptak\.felk"):
        rh.main(["--data-root", str(tmp_path), "--datasets", "roxford5k"])
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        rh.main(["--codebook-features", str(feats / "sfm120k_subset20k_how_r18_1000.pkl")])
    with pytest.raises(SystemExit, match="not a directory"):
        rh.main(["--data-root", str(tmp_path / "nope")])
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as handle:
        pickle.dump({"vecs": vecs}, handle)
    with pytest.raises(SystemExit, match=r"lacks \['imids', 'qvecs', 'qimids'\]"):
        rh.main(["--codebook-features", str(feats / "sfm120k_subset20k_how_r18_1000.pkl"), "--codebook-size", "16",
                 "--eval", "roxford5k", str(bad), str(tmp_path / "test" / "roxford5k" / "gnd_roxford5k.pkl")])


# ---------------------------------------------------------------------------------------------------------
# reproduce_how with asmk's other parameter files, asmk's codebook.pkl, R1M distractors; stand-in files in the
# formats asmk's demo reads, the rankings checked against asmk 0.1.1 and the mAP against the revisitop oracle


def _standin(rng, n_db, n_q, dim=16, per=30, n_scenes=None, n_easy=1):
    """(features dict as in <dataset>_<features>.pkl, gnd list) for toy scenes: the first ``n_easy`` images of a
    query's scene are easy positives, the others hard."""
    n_scenes = n_scenes or n_q
    scenes = rng.standard_normal((n_scenes, 60, dim)).astype(np.float32)

    def image(scene):
        return scenes[scene][rng.choice(60, per, replace=False)] + 0.25 * rng.standard_normal((per, dim))

    vecs = np.concatenate([image(i % n_q) for i in range(n_db)]).astype(np.float32)
    qvecs = np.concatenate([image(q) for q in range(n_q)]).astype(np.float32)
    desc = {"vecs": vecs, "imids": np.repeat(np.arange(n_db), per), "qvecs": qvecs,
            "qimids": np.repeat(np.arange(n_q), per)}
    gnd = [{"easy": [i for i in range(n_db) if i % n_q == q][:n_easy],
            "hard": [i for i in range(n_db) if i % n_q == q][n_easy:], "junk": [], "bbx": None} for q in range(n_q)]
    return desc, gnd


def _write_pickle(path, obj):
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _asmk_maps(desc, gnd, centroids, *, distractors_path=None, n_distractors=0):
    """asmk 0.1.1's ranking of the stand-in with these centroids, scored by the revisitop oracle (percent)."""
    from helpers import asmk_params, asmk_with_centroids

    params = asmk_params(size=centroids.shape[0])
    ref = asmk_with_centroids(params, centroids).build_ivf(desc["vecs"], desc["imids"].copy(),
                                                          distractors_path=distractors_path)
    _, _, ranks, _ = ref.query_ivf(desc["qvecs"], desc["qimids"])
    n_db = int(desc["imids"].max()) + 1
    ranks = np.where(ranks < 0, ranks + n_distractors + n_db, ranks)  # distractors after the database
    return {name: 100 * oracle_map(ranks.T, protocol_gnd(gnd, name), [1])[0] for name in ("easy", "medium", "hard")}


def _line(dataset, maps, suffix=""):
    return f"{dataset}{suffix}: mAP E: {maps['easy']:.1f}, M: {maps['medium']:.1f}, H: {maps['hard']:.1f}"


@pytest.fixture
def how_layout(tmp_path):
    """The asmk demo's data folder for eccv20_how_r50-_2000: the codebook set is the n=1000 one (asmk's
    eccv20_how_r50-_2000.yml), the n=2000 name holds a decoy that breaks the run if it is read."""
    rng = np.random.default_rng(5)
    root = tmp_path / "data"
    train = rng.standard_normal((900, 16)).astype(np.float32)
    _write_pickle(root / "features" / "sfm120k_subset20k_how_r50-_1000.pkl", {"vecs": train})
    (root / "features" / "sfm120k_subset20k_how_r50-_2000.pkl").write_bytes(b"not a pickle")
    sets = {}
    for dataset, (n_db, n_q) in {"roxford5k": (12, 4), "rparis6k": (15, 5)}.items():
        desc, gnd = _standin(rng, n_db, n_q)
        _write_pickle(root / "features" / f"{dataset}_how_r50-_2000.pkl", desc)
        _write_pickle(root / "test" / dataset / f"gnd_{dataset}.pkl",
                      {"gnd": gnd, "imlist": [f"db{i}" for i in range(n_db)], "qimlist": [f"q{i}" for i in range(n_q)]})
        sets[dataset] = (desc, gnd)
    return root, train, sets


def test_reproduce_how_follows_asmk_parameter_files(how_layout, capsys):
    import jasmk

    rh = _import_reproduce_how()
    root, train, sets = how_layout
    setup = rh.resolve_params("eccv20_how_r50-_2000")
    assert (setup.eval_features, setup.codebook_features) == ("how_r50-_2000", "how_r50-_1000")
    assert setup.params == rh.PARAMS and setup.eval_datasets == ("roxford5k", "rparis6k")
    assert rh.main(["--data-root", str(root), "--params", "eccv20_how_r50-_2000", "--codebook-size", "16"]) == 0
    printed = capsys.readouterr().out
    cb = jasmk.train_codebook(train, size=16)  # trained on the n=1000 set, as asmk does
    for dataset, table in (("roxford5k", 79.4), ("rparis6k", 81.6)):
        desc, gnd = sets[dataset]
        maps = _asmk_maps(desc, gnd, np.asarray(cb.centroids))
        assert f"{_line(dataset, maps)} (seed table M: {table})" in printed, printed
        assert maps["medium"] > 40

    # asmk's parameter files themselves (a template and the file naming it) give the same setup
    params_dir = root.parent / "params"
    params_dir.mkdir()
    (params_dir / "_eccv20_how.yml").write_text(
        "demo_how:\n  data_folder: data\n  eval_datasets: [roxford5k, rparis6k]\n  eval_features: null\n"
        "  codebook_dataset: sfm120k_subset20k\n  codebook_features: null\nindex:\n  gpu_id: 0\n"
        "train_codebook:\n  codebook:\n    size: \"64k\"\nbuild_ivf:\n  kernel:\n    binary: True\n  ivf:\n"
        "    use_idf: False\n  quantize:\n    multiple_assignment: 1\n  aggregate: {}\nquery_ivf:\n  quantize:\n"
        "    multiple_assignment: 5\n  aggregate: {}\n  search:\n    topk: null\n  similarity:\n"
        "    similarity_threshold: 0.0\n    alpha: 3.0\n")
    (params_dir / "eccv20_how_r50-_2000.yml").write_text(
        "__template__: _eccv20_how.yml\n\ndemo_how:\n  eval_features: how_r50-_2000\n"
        "  codebook_features: how_r50-_1000\n")
    assert rh.resolve_params(str(params_dir / "eccv20_how_r50-_2000.yml")) == setup
    with pytest.raises(SystemExit, match="unknown parameter set 'eccv20_how_r50_2000'"):
        rh.main(["--data-root", str(root), "--params", "eccv20_how_r50_2000"])


def test_reproduce_how_uses_asmk_codebook_pkl(how_layout, capsys, tmp_path):
    from asmk import asmk_method
    from helpers import asmk_params

    rh = _import_reproduce_how()
    root, train, sets = how_layout
    # asmk's demo leaves its codebook in data/experiments/<params>/codebook.pkl
    pkl = root / "experiments" / "eccv20_how_r50-_2000" / "codebook.pkl"
    pkl.parent.mkdir(parents=True)
    trained = asmk_method.ASMKMethod.initialize_untrained(asmk_params(size=16)).train_codebook(
        train[::-1].copy(), cache_path=str(pkl))
    centroids = np.asarray(trained.codebook.centroids, np.float32)
    (root / "features" / "sfm120k_subset20k_how_r50-_1000.pkl").unlink()  # not needed with asmk's codebook
    assert rh.main(["--data-root", str(root), "--params", "eccv20_how_r50-_2000", "--datasets", "rparis6k"]) == 0
    printed = capsys.readouterr().out
    assert f"codebook: asmk's 16 words from {pkl}" in printed
    desc, gnd = sets["rparis6k"]
    assert _line("rparis6k", _asmk_maps(desc, gnd, centroids)) in printed
    # given explicitly, and a damaged one is a clear error
    bad = tmp_path / "codebook.pkl"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(SystemExit, match=r"cannot read asmk's codebook from .*codebook.pkl"):
        rh.main(["--data-root", str(root), "--params", "eccv20_how_r50-_2000", "--codebook", str(bad)])


def test_reproduce_how_with_distractors(how_layout, capsys, tmp_path):
    from helpers import asmk_params, asmk_with_centroids

    import jasmk

    rh = _import_reproduce_how()
    root, train, sets = how_layout
    rng = np.random.default_rng(9)
    dvecs = rng.standard_normal((20 * 30, 16)).astype(np.float32)
    dimids = np.repeat(np.arange(20), 30)
    dfeat = tmp_path / "revisitop1m_how_r50-_2000.pkl"
    _write_pickle(dfeat, {"vecs": dvecs, "imids": dimids})
    cb = jasmk.train_codebook(train, size=16)
    centroids = np.asarray(cb.centroids)
    divf = str(tmp_path / "ivf_distractors.pkl")  # asmk's distractor ivf (build_ivf's cache)
    asmk_with_centroids(asmk_params(size=16), centroids).build_ivf(dvecs, dimids.copy(), cache_path=divf)
    desc, gnd = sets["roxford5k"]
    maps = _asmk_maps(desc, gnd, centroids, distractors_path=divf, n_distractors=20)
    for dpath in (str(dfeat), divf):
        assert rh.main(["--data-root", str(root), "--params", "eccv20_how_r50-_2000", "--codebook-size", "16",
                        "--datasets", "roxford5k", "--distractors", dpath]) == 0
        printed = capsys.readouterr().out
        assert "distractors: 20 images" in printed
        assert _line("roxford5k", maps, " +20 distractors") in printed, printed
        assert "seed table" not in printed  # the table has no R1M numbers
    with pytest.raises(SystemExit, match="--distractors .* not found"):
        rh.main(["--data-root", str(root), "--params", "eccv20_how_r50-_2000", "--distractors",
                 str(tmp_path / "nope.pkl")])


def test_reproduce_how_checks_database_ids_against_imlist(how_layout):
    rh = _import_reproduce_how()
    root, _, sets = how_layout
    gpath = root / "test" / "rparis6k" / "gnd_rparis6k.pkl"
    desc, gnd = sets["rparis6k"]
    args = ["--data-root", str(root), "--params", "eccv20_how_r50-_2000", "--codebook-size", "16",
            "--datasets", "rparis6k"]
    _write_pickle(gpath, {"gnd": gnd, "imlist": [f"db{i}" for i in range(14)], "qimlist": []})
    with pytest.raises(SystemExit, match=r"database image ids in \[0, 14\] but .*gnd_rparis6k.pkl lists 14 "):
        rh.main(args)
    _write_pickle(gpath, {"gnd": gnd, "imlist": [f"db{i}" for i in range(16)], "qimlist": []})
    with pytest.raises(SystemExit, match=r"descriptors for 15 database images but .*lists 16 \(imlist\)"):
        rh.main(args)
    _write_pickle(gpath, {"gnd": gnd})
    with pytest.raises(SystemExit, match=r"lacks \['imlist'\]"):
        rh.main(args)
