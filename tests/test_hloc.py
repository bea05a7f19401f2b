"""hloc in and out: features.h5 written the way hloc writes it (h5py, one group per image name nested at every
``/``, ``descriptors [D, N]`` float16, keypoints, scores, image_size), pairs files parsed the way hloc parses them,
and the pairs' content checked against asmk 0.1.1 on the same descriptors."""

import os
import sys

import numpy as np
import pytest

import jasmk
from jasmk import cli, pairs
from jasmk.storage import checkpoint, hloc, index_format

h5py = pytest.importorskip("h5py")

DIM = 32


def write_hloc(path, images, *, as_half=True, transpose=True):
    """A features.h5 as hloc's extract_features writes it: ``{name: [N, D] descriptors}``."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "a", libver="latest") as fd:
        for name, desc in images.items():
            n = desc.shape[0]
            pred = {"keypoints": rng.uniform(0, 640, (n, 2)).astype(np.float32),
                    "descriptors": (desc.T if transpose else desc).astype(np.float32),
                    "scores": rng.uniform(0, 1, n).astype(np.float32), "image_size": np.array([640, 480])}
            if as_half:
                pred = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in pred.items()}
            grp = fd.create_group(name)
            for key, value in pred.items():
                grp.create_dataset(key, data=value)


def hloc_list_names(path):
    """hloc.utils.io.list_h5_names: the parents of every dataset."""
    names = []
    with h5py.File(str(path), "r", libver="latest") as fd:
        fd.visititems(lambda _, obj: names.append(obj.parent.name.strip("/")) if isinstance(obj, h5py.Dataset)
                      else None)
    return list(set(names))


def hloc_parse_pairs(path):
    """How hloc's match_features reads a pairs file."""
    with open(path) as handle:
        return [tuple(p.split()) for p in handle.read().rstrip("\n").split("\n") if p]


def scenes_h5(path, rng, *, n_db=24, n_query=8, n_scenes=6):
    """Images of scenes with varied descriptor counts, database under db/<seq>/, queries under query/."""
    pts = rng.standard_normal((n_scenes, 300, DIM)).astype(np.float32)
    images = {}
    for kind, n in (("db", n_db), ("query", n_query)):
        for i in range(n):
            s = i % n_scenes
            m = int(rng.integers(40, 160))
            x = pts[s, rng.integers(0, 300, m)] + 0.35 * rng.standard_normal((m, DIM)).astype(np.float32)
            images[f"{kind}/seq{s}/frame_{i:04d}.jpg"] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(
                np.float32)
    write_hloc(path, images)
    return images


def half(x):
    return np.asarray(x, np.float16).astype(np.float32)


def test_read_features_is_hloc_layout(tmp_path, caplog):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "features.h5")
    images = scenes_h5(path, rng)
    assert hloc.list_names(path) == sorted(hloc_list_names(path))
    got = hloc.read_features(path, prefix="db/")
    db = sorted(n for n in images if n.startswith("db/"))
    assert got.names == db
    np.testing.assert_array_equal(got.feats, np.concatenate([half(images[n]) for n in db]))
    assert got.feats.dtype == np.float32 and got.feats.shape[1] == DIM
    np.testing.assert_array_equal(got.ids, np.repeat(np.arange(len(db)), [len(images[n]) for n in db]))
    # a list keeps its order; first_id numbers after an index's images
    listed = [db[3], db[0]]
    (tmp_path / "list.txt").write_text(f"# images\n{listed[0]} 640 480\n\n{listed[1]}\n")
    got = hloc.read_features(path, names=hloc.read_image_list(str(tmp_path / "list.txt")), first_id=100)
    assert got.names == listed and set(got.ids.tolist()) == {100, 101}
    with pytest.raises(ValueError, match="no image .* starting with 'nope/'"):
        hloc.read_features(path, prefix="nope/")
    with pytest.raises(ValueError, match="not in"):
        hloc.read_features(path, names=["db/missing.jpg"])

    # an image without keypoints is left out, with a warning
    write_hloc(path, {"db/empty.jpg": np.zeros((0, DIM), np.float32)})
    with caplog.at_level("WARNING", logger="jasmk"):
        got = hloc.read_features(path, prefix="db/")
    assert "db/empty.jpg" not in got.names and got.skipped == ["db/empty.jpg"]
    assert "no descriptors" in caplog.text

    # descriptors stored [N, D] (not hloc's layout) are refused, naming the layout
    bad = str(tmp_path / "nd.h5")
    write_hloc(bad, {"a.jpg": rng.standard_normal((50, DIM)), "b.jpg": rng.standard_normal((70, DIM))},
               transpose=False)
    with pytest.raises(ValueError, match=r"\[N, D\]; hloc stores \[D, N\]"):
        hloc.read_features(bad)
    glob = str(tmp_path / "global.h5")
    with h5py.File(glob, "w") as fd:
        fd.create_group("a.jpg").create_dataset("global_descriptor", data=np.ones(8, np.float16))
    with pytest.raises(ValueError, match="global_descriptor"):
        hloc.read_features(glob)
    nan = str(tmp_path / "nan.h5")
    write_hloc(nan, {"a.jpg": np.full((5, DIM), np.inf, np.float32)})
    with pytest.raises(ValueError, match="NaN or inf"):
        hloc.read_features(nan)


def test_missing_h5py_says_which_extra(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "features.h5")
    scenes_h5(path, np.random.default_rng(0), n_db=3, n_query=1)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r'pip install "jasmk\[hloc\]"'):
        hloc.read_features(path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quiet", "codebook", path, "--size", "8", "--out", str(tmp_path / "cb")])
    assert exc.value.code == 2
    assert 'pip install "jasmk[hloc]"' in capsys.readouterr().err


def asmk_scores(centroids, db_feats, db_ids, q_feats, q_ids, n_db):
    """asmk 0.1.1's [n_query, n_db] scores (every database image ranked)."""
    pytest.importorskip("asmk")
    from helpers import asmk_params, asmk_with_centroids

    method = asmk_with_centroids(asmk_params(size=centroids.shape[0], topk=None), centroids)
    built = method.build_ivf(db_feats, db_ids)
    _, qids, ranks, scores = built.query_ivf(q_feats, q_ids)
    dense = np.zeros((len(qids), n_db))
    dense[np.arange(len(qids))[:, None], ranks] = scores
    return dense


def check_topk_against(pairs_read, qnames, dnames, dense, k, *, exclude_self):
    """Each query's pairs are k database images whose asmk scores are the k best of its row (ties either way)."""
    by_query = {}
    for q, d in pairs_read:
        by_query.setdefault(q, []).append(d)
    assert list(by_query) == qnames
    col = {n: j for j, n in enumerate(dnames)}
    for qi, q in enumerate(qnames):
        row = dense[qi].copy()
        if exclude_self and q in col:
            row[col[q]] = -np.inf
            assert q not in by_query[q]
        got = np.sort([row[col[d]] for d in by_query[q]])[::-1]
        assert len(by_query[q]) == k == len(set(by_query[q]))
        np.testing.assert_allclose(got, np.sort(row)[::-1][:k], atol=1e-5)


def test_cli_hloc_round_trip_matches_asmk(tmp_path, capsys):
    """features.h5 -> codebook, index (names kept), pairs for queries and for the database itself, in hloc's
    pairs format; the pairs are asmk 0.1.1's top-k on the same (float16) descriptors."""
    rng = np.random.default_rng(3)
    h5 = str(tmp_path / "features.h5")
    images = scenes_h5(h5, rng)
    d = str(tmp_path)

    def run(*argv):
        assert cli.main(["--quiet", *argv]) == 0

    run("codebook", h5, "--prefix", "db/", "--size", "32", "--out", f"{d}/cb")
    run("index", h5, "--db-prefix", "db/", "--codebook", f"{d}/cb", "--out", f"{d}/idx")
    index = checkpoint.load_index(f"{d}/idx")
    db = sorted(n for n in images if n.startswith("db/"))
    queries = sorted(n for n in images if n.startswith("query/"))
    assert index.names.tolist() == db
    run("pairs", "--index", f"{d}/idx", "--queries", h5, "--query-prefix", "query/", "--topk", "5",
        "--out", f"{d}/pairs.txt")
    run("pairs", "--index", f"{d}/idx", "--queries", h5, "--prefix", "db/", "--topk", "4", "--out", f"{d}/self.txt")

    cents = np.asarray(index.centroids)
    db_feats = np.concatenate([half(images[n]) for n in db])
    db_ids = np.repeat(np.arange(len(db)), [len(images[n]) for n in db])
    q_feats = np.concatenate([half(images[n]) for n in queries])
    q_ids = np.repeat(np.arange(len(queries)), [len(images[n]) for n in queries])
    dense = asmk_scores(cents, db_feats, db_ids, q_feats, q_ids, len(db))
    check_topk_against(hloc_parse_pairs(f"{d}/pairs.txt"), queries, db, dense, 5, exclude_self=True)
    self_dense = asmk_scores(cents, db_feats, db_ids, db_feats, db_ids, len(db))
    check_topk_against(hloc_parse_pairs(f"{d}/self.txt"), db, db, self_dense, 4, exclude_self=True)

    # the same pairs from jasmk query's results and from the score matrix's .npz
    run("query", f"{d}/idx", h5, "--prefix", "query/", "--topk", "10", "--out", f"{d}/res.npz")
    res = np.load(f"{d}/res.npz")
    assert res["query_names"].tolist() == queries and res["db_names"].tolist() == db
    run("pairs", f"{d}/res.npz", "--topk", "5", "--out", f"{d}/from_res.txt")
    run("score-matrix", f"{d}/idx", h5, "--prefix", "query/", "--out", f"{d}/S.npz")
    run("pairs", f"{d}/S.npz", "--topk", "5", "--out", f"{d}/from_S.txt")
    for name in ("from_res.txt", "from_S.txt"):
        check_topk_against(hloc_parse_pairs(f"{d}/{name}"), queries, db, dense, 5, exclude_self=True)

    # pictures straight from the names: the image folder hloc's names are relative to
    if __import__("importlib").util.find_spec("matplotlib") is not None:
        from PIL import Image

        for i, name in enumerate(db + queries):
            os.makedirs(os.path.dirname(tmp_path / "images" / name), exist_ok=True)
            Image.fromarray(np.full((12, 16, 3), 20 * (i % 12), np.uint8)).save(tmp_path / "images" / name, "PNG")
        run("show", f"{d}/res.npz", "--image-dir", f"{d}/images", "--grid", f"{d}/grid.png", "--max-queries", "3")
        run("show", f"{d}/S.npz", "--image-dir", f"{d}/images", "--grid", f"{d}/grid2.png", "--heatmap",
            f"{d}/heat.png")
        for png in ("grid.png", "grid2.png", "heat.png"):
            assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
        with pytest.raises(SystemExit):
            cli.main(["--quiet", "show", f"{d}/S.npy" if os.path.exists(f"{d}/S.npy") else f"{d}/res.npz",
                      "--image-dir", f"{d}/images", "--images", f"{d}/x.txt", "--grid", f"{d}/g3.png"])
        assert "not both" in capsys.readouterr().err

    # add the queries to the index (numbered after it, names kept, saved in place)
    run("add", f"{d}/idx", h5, "--prefix", "query/")
    grown = checkpoint.load_index(f"{d}/idx")
    assert grown.names.tolist() == db + queries and grown.image_ids.tolist() == list(range(len(db) + len(queries)))
    with pytest.raises(SystemExit):  # the same images again: their names are taken
        cli.main(["--quiet", "add", f"{d}/idx", h5, "--prefix", "query/"])
    assert "already in the index" in capsys.readouterr().err


def test_pairs_file_refuses_whitespace_and_replaces_only_text(tmp_path):
    with pytest.raises(ValueError, match="hold no spaces"):
        hloc.write_pairs(tmp_path / "p.txt", [("query/a b.jpg", "db/c.jpg")])
    assert not (tmp_path / "p.txt").exists()
    (tmp_path / "model.bin").write_bytes(b"\0\1\2binary")
    with pytest.raises(ValueError, match="not a text pairs file"):
        hloc.write_pairs(tmp_path / "model.bin", [("a", "b")])
    hloc.write_pairs(tmp_path / "p.txt", [("q/1.jpg", "db/2.jpg"), ("q/1.jpg", "db/3.jpg")])
    assert hloc_parse_pairs(tmp_path / "p.txt") == [("q/1.jpg", "db/2.jpg"), ("q/1.jpg", "db/3.jpg")]
    assert hloc.read_pairs(tmp_path / "p.txt") == hloc_parse_pairs(tmp_path / "p.txt")


def test_topk_pairs_from_a_query_by_database_matrix(tmp_path, capsys):
    """A 20 x 200 score matrix with name lists: each query's top k (numpy's stable argsort as the oracle);
    a non-square matrix without --topk says what to do."""
    rng = np.random.default_rng(5)
    scores = rng.random((20, 200)).astype(np.float32)
    scores[3, 7] = scores[3, 8] = 2.0  # a tie: the lower column first
    qn = [f"q/{i}.jpg" for i in range(20)]
    dn = [f"db/{j}.jpg" for j in range(200)]
    np.save(tmp_path / "S.npy", scores)
    (tmp_path / "q.txt").write_text("\n".join(qn) + "\n")
    (tmp_path / "db.txt").write_text("\n".join(dn) + "\n")
    assert cli.main(["--quiet", "pairs", str(tmp_path / "S.npy"), "--topk", "3", "--query-names",
                     str(tmp_path / "q.txt"), "--db-names", str(tmp_path / "db.txt"), "--out",
                     str(tmp_path / "p.txt")]) == 0
    expect = [(qn[i], dn[j]) for i in range(20) for j in np.argsort(-scores[i].astype(np.float64), kind="stable")[:3]]
    assert hloc_parse_pairs(tmp_path / "p.txt") == expect
    assert expect[9:11] == [(qn[3], dn[7]), (qn[3], dn[8])]
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quiet", "pairs", str(tmp_path / "S.npy"), "--out", str(tmp_path / "g.txt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "20 x 200, not square: give --topk" in err
    with pytest.raises(ValueError, match="one name per row"):
        pairs.topk_pairs(scores, 3, query_names=qn[:5], db_names=dn)


def test_names_are_kept_by_checkpoints_adds_and_shards(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1200, 16)).astype(np.float32)
    ids = np.repeat(np.arange(12) * 5 + 3, 100)  # gapped ids
    names = [f"seq/{i:02d}/image.png" for i in range(12)]
    cb = jasmk.train_codebook(x, size=16)
    index = jasmk.build_index(x[:800], ids[:800], codebook=cb, names=names[:8])
    path = str(tmp_path / "idx")
    jasmk.save_index(path, index)
    loaded = jasmk.load_index(path)
    assert loaded.names == index.names and loaded.names.tolist() == names[:8]
    grown = jasmk.add_images(loaded, x[800:], ids[800:], names=names[8:])
    jasmk.save_index(path, grown)  # incremental
    again = jasmk.load_index(path)
    assert again.names.tolist() == names and again.image_ids.tolist() == sorted(set(ids.tolist()))
    with pytest.raises(ValueError, match="give names="):
        jasmk.add_images(again, x[:100], np.full(100, 500))
    with pytest.raises(ValueError, match="already in the index"):
        jasmk.add_images(again, x[:100], np.full(100, 500), names=[names[0]])
    with pytest.raises(ValueError, match="2 names for 1 new images"):
        jasmk.add_images(again, x[:100], np.full(100, 500), names=["a", "b"])
    unnamed = jasmk.build_index(x, ids, codebook=cb)
    with pytest.raises(ValueError, match="without names"):
        jasmk.add_images(unnamed, x[:100], np.full(100, 500), names=["a"])
    with pytest.raises(ValueError, match="more than once"):
        jasmk.build_index(x[:200], ids[:200], codebook=cb, names=["a", "a"])
    # a checkpoint whose names were tampered with is refused
    arrays, fields = index_format.to_arrays(again)
    arrays["names_blob"] = arrays["names_blob"].copy()
    arrays["names_blob"][:8] = np.frombuffer(b"seq/01/i", np.uint8)  # now two images share a name
    with pytest.raises(ValueError, match="more than once|inconsistent"):
        index_format.from_arrays(arrays, fields)
    arrays, fields = index_format.to_arrays(again)
    arrays["names_offsets"] = arrays["names_offsets"][:-1]
    with pytest.raises(ValueError, match="offsets"):
        index_format.from_arrays(arrays, fields)

    shard = pytest.importorskip("jasmk.shard")
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("s",))
    sidx = shard.shard_index(again, mesh)
    assert sidx.names == again.names
    spath = str(tmp_path / "sidx")
    shard.save_sharded_index(spath, sidx)
    back = shard.load_sharded_index(spath, mesh)
    assert back.names.tolist() == names
    more = shard.add_images(back, x[:100], np.full(100, 500), names=["extra.png"], quantizer="faiss")
    assert more.names.tolist() == names + ["extra.png"]
    res = pairs.query_pairs(again, x[:200], ids[:200], 2, query_names=names[:2])
    assert [q for q, _ in res] == [names[0]] * 2 + [names[1]] * 2 and all(q != d for q, d in res)


def test_query_pairs_name_database_images_of_any_ids(tmp_path):
    """Database ids with gaps, far from 0 and beyond int32 (1M distractors numbered after the scenes), query ids
    that overlap them: each query's pairs are the names of jasmk.query's top ids, self left out."""
    rng = np.random.default_rng(7)
    db_ids = np.array([3, 17, 18, 40, 2**31 + 5, 2**33, 2**40 + 1])
    per = 60
    base = rng.standard_normal((len(db_ids), 16)).astype(np.float32)
    x = np.concatenate([base[i] + 0.4 * rng.standard_normal((per, 16)).astype(np.float32)
                        for i in range(len(db_ids))])
    ids = np.repeat(db_ids, per)
    names = [f"img_{i}.jpg" for i in range(len(db_ids))]
    index = jasmk.build_index(x, ids, codebook=jasmk.train_codebook(x, size=16), names=names)
    q = [1, 4, 6]  # three database images queried with themselves, under their own names
    qmask = np.isin(ids, db_ids[q])
    got = pairs.query_pairs(index, x[qmask], ids[qmask], 3, query_names=[names[i] for i in q])
    res = jasmk.query(index, x[qmask], ids[qmask])
    by_id = dict(zip(db_ids.tolist(), names))
    expected = []
    for i, ranks in zip(q, res.ranks):
        assert sorted(ranks.tolist()) == db_ids.tolist()  # every database image ranked, by id
        expected.extend([(names[i], by_id[int(r)]) for r in ranks if int(r) != db_ids[i]][:3])
    assert got == expected and all(a != b for a, b in got)


def test_info_describes_indexes_codebooks_and_features(tmp_path, capsys):
    import json

    rng = np.random.default_rng(0)
    h5 = str(tmp_path / "features.h5")
    scenes_h5(h5, rng, n_db=6, n_query=2)
    assert cli.main(["--quiet", "codebook", h5, "--size", "16", "--out", str(tmp_path / "cb")]) == 0
    assert cli.main(["--quiet", "index", h5, "--prefix", "db/", "--codebook", str(tmp_path / "cb"), "--use-idf",
                     "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "idx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    index = checkpoint.load_index(str(tmp_path / "idx"))
    assert info["kind"] == "index" and info["images"] == 6 == index.n_images
    assert info["postings"] == index.n_entries and info["words"] == 16 and info["dim"] == DIM
    assert info["idf"] is True and info["segments"] == len(index.segments) and "db/seq0/frame_0000.jpg" in info["names"]
    assert cli.main(["info", str(tmp_path / "cb")]) == 0
    out = capsys.readouterr().out
    assert "codebook" in out and "16" in out
    got = hloc.read_features(h5)
    summary = hloc.summarize(h5)
    assert summary.names == got.names and summary.dim == DIM and summary.dtype == "float16"
    np.testing.assert_array_equal(summary.counts, np.bincount(got.ids, minlength=len(got.names)))
    with pytest.MonkeyPatch.context() as mp:  # info reads the metadata only, never the descriptors
        mp.setattr(hloc, "read_features", lambda *a, **k: pytest.fail("info read every descriptor"))
        assert cli.main(["info", h5, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 8 and info["dim"] == DIM and info["descriptors"] == len(got.feats)
    assert info["without descriptors"] == 0 and info["dtype"] == "float16"
    assert os.path.exists(tmp_path / "idx")
