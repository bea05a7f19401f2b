"""Real multi-view photos with SIFT: jasmk against COLMAP's VisualIndex and asmk 0.1.1, ground truth by verified
overlap.

The images come from packages and repositories that ship them (docs/real_photos.md lists each source and its
licence); nothing is downloaded and no image is stored in jasmk's repository:

* Debian's ``opencv-doc`` (``/usr/share/doc/opencv-doc/examples/data``): twelve scenes seen twice (Graffiti, box
  in scene, the Leuven, aerial, aloe, book stereo pairs, ...); its other photos train the vocabulary;
* scikit-image's bundled photos (distractors) and its Middlebury motorcycle stereo pair;
* hloc's example Sacre Coeur photos (``datasets/sacre_coeur/mapping``) and LightGlue's ``assets`` (two more Sacre
  Coeur photos and a pair of one scene), from checkouts of those repositories (``--hloc``, ``--lightglue``).

Queries: every database image that is not a distractor (itself junk) and a crop of it (a hard query). Ground truth
is **verified overlap**: a database image is a positive of a query when their mutual nearest-neighbour SIFT matches
that pass the ratio test (0.75) leave at least ``--min-inliers`` inliers of a RANSAC fundamental matrix
(USAC_ACCURATE, 1 px); the scene-label view (same named scene) is reported beside it. The vocabulary is trained
on synthetic views of other photos, never on test images.

Engines, each in its own process (peak memory is that process's), one CPU thread, the same SIFT features:

* ``jasmk`` (RootSIFT, ASMK*, MA 5 for queries; word assignment ``auto``, which is exact at 1k words and the
  list search at 4k and 16k, exact faiss, or HNSW);
* ``asmk`` 0.1.1 with the same centroids;
* ``colmap``: pycolmap's vocabulary tree (``VisualIndex`` built on the same training descriptors, COLMAP's
  uint8 RootSIFT convention, Hamming embedding, idf, burstiness weighting) through ``VocabTreePairGenerator``,
  without and with spatial verification of every database image.

Metrics per scene and overall: mAP, P@5, top-10 recall (share of a query's positives among its first 10, out of
at most 10), query ms (word assignment included), build seconds, peak RSS.

    python experiments/bench_real.py --hloc PATH/TO/Hierarchical-Localization --lightglue PATH/TO/LightGlue \\
        [--words 1024 4096 16384] [--min-inliers 15] [--work /tmp/bench_real]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one CPU thread for every engine
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import demo_photos  # noqa: E402  (the opencv-doc and scikit-image loaders)

MAX_SIDE = 640
# COLMAP's vocabulary tree k-means: 100 iterations x 3 rounds by default took over 17 minutes for 4,096 words on
# this 2-core machine; the tree is built once, off the clock, with these settings instead (docs/real_photos.md).
COLMAP_ITERATIONS = 20


# ---------------------------------------------------------------------------------------------------------
# images and features


def _gray_file(path, max_side):
    import cv2

    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    return None if img is None else _resized(img, max_side)


def _resized(img, max_side):
    import cv2

    scale = max_side / max(img.shape)
    if scale < 1:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return img


def collect(args, rng):
    """``(database, queries, train)``: lists of ``(name, scene, gray uint8)``; the database's distractors have
    scenes named ``distractor/...``."""
    import cv2

    db = []
    for scene, views in sorted(demo_photos.load_real_scenes(demo_photos.OPENCV_DATA, MAX_SIDE).items()):
        db += [(f"opencv/{name}", scene, gray) for name, gray, _ in views]
    if args.hloc:
        for path in sorted(glob.glob(os.path.join(args.hloc, "datasets", "sacre_coeur", "mapping", "*.jpg"))):
            db.append((f"hloc/{os.path.basename(path)}", "sacre_coeur", _gray_file(path, MAX_SIDE)))
    if args.lightglue:
        for name, scene in (("sacre_coeur1.jpg", "sacre_coeur"), ("sacre_coeur2.jpg", "sacre_coeur"),
                            ("DSC_0410.JPG", "lightglue_dsc"), ("DSC_0411.JPG", "lightglue_dsc")):
            path = os.path.join(args.lightglue, "assets", name)
            if os.path.isfile(path):
                db.append((f"lightglue/{name}", scene, _gray_file(path, MAX_SIDE)))
    db = [d for d in db if d[2] is not None]
    queries = []
    for name, scene, gray in db:
        queries.append((name, scene, gray))
        h, w = (int(n * rng.uniform(0.45, 0.7)) for n in gray.shape)  # a bounding box of 45-70 % per side
        y, x = rng.integers(0, gray.shape[0] - h + 1), rng.integers(0, gray.shape[1] - w + 1)
        queries.append((f"{name}[crop]", scene, np.ascontiguousarray(gray[y:y + h, x:x + w])))
    for name, (gray, _) in sorted(demo_photos.load_photos(MAX_SIDE).items()):
        if name != "motorcycle":
            db.append((f"skimage/{name}", f"distractor/{name}", gray))
    train = []
    for name in demo_photos.TRAIN_PHOTOS:
        img = demo_photos.read_opencv_image(demo_photos.OPENCV_DATA, name)
        if img is None:
            continue
        gray = _resized(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), MAX_SIDE)
        train += [(f"train/{name}/{v}", "train", demo_photos.random_view(gray, rng, strength="hard" if v % 2 else
                                                                         "easy")) for v in range(args.train_views)]
    return db, queries, train


def sift(gray, nfeatures):
    """``(keypoints [n, 2] float32, SIFT descriptors [n, 128] float32 as OpenCV gives them)``."""
    import cv2

    kps, desc = cv2.SIFT_create(nfeatures=nfeatures).detectAndCompute(gray, None)
    if desc is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    return np.float32([k.pt for k in kps]), desc.astype(np.float32)


def rootsift(desc):
    d = desc.astype(np.float64)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(d).astype(np.float32)


def colmap_uint8(desc):
    """COLMAP's convention: L1-root normalized SIFT, times 512, rounded into uint8."""
    return np.round(np.minimum(rootsift(desc) * 512.0, 255.0)).astype(np.uint8)


def verified_inliers(a, b, ratio=0.75):
    """RANSAC fundamental-matrix inliers (USAC_ACCURATE, 1 px) of the mutual nearest-neighbour SIFT matches that
    pass the ratio test between two images' ``(kps, desc)``."""
    import cv2

    (ka, da), (kb, db) = a, b
    if len(da) < 8 or len(db) < 8:
        return 0
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    back = {m.queryIdx: m.trainIdx for m in matcher.match(db, da)}
    good = [m for m, n in (p for p in matcher.knnMatch(da, db, k=2) if len(p) == 2)
            if m.distance < ratio * n.distance and back.get(m.trainIdx) == m.queryIdx]
    if len(good) < 8:
        return 0
    pa = np.float32([ka[m.queryIdx] for m in good])
    pb = np.float32([kb[m.trainIdx] for m in good])
    try:
        _, mask = cv2.findFundamentalMat(pa, pb, cv2.USAC_ACCURATE, 1.0, 0.999, 10000)
    except cv2.error:  # degenerate point sets (all matches on a line, say): no model, no overlap
        return 0
    return 0 if mask is None else int(mask.sum())


def prepare(args):
    """Images, features and the verified-overlap inlier counts, cached in ``args.work/data.npz``."""
    path = os.path.join(args.work, "data.npz")
    if os.path.isfile(path):
        return dict(np.load(path, allow_pickle=False))
    import cv2

    cv2.setNumThreads(1)
    rng = np.random.default_rng(args.seed)
    db, queries, train = collect(args, rng)
    feats = {}
    for group, items in (("db", db), ("q", queries), ("train", train)):
        kp, desc, ids = [], [], []
        for i, (_, _, gray) in enumerate(items):
            k, d = sift(gray, args.nfeatures)
            kp.append(k)
            desc.append(d)
            ids.append(np.full(len(d), i))
        feats[group] = (kp, desc)
        feats[group + "_ids"] = np.concatenate(ids)
    t0 = time.perf_counter()
    inliers = np.zeros((len(queries), len(db)), np.int32)
    for qi in range(len(queries)):  # every pair, distractors included: one that overlaps a query is a positive
        for di in range(len(db)):
            inliers[qi, di] = verified_inliers((feats["q"][0][qi], feats["q"][1][qi]),
                                               (feats["db"][0][di], feats["db"][1][di]))
    print(f"verified overlap of {inliers.size} query x database pairs in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    out = {"db_names": np.array([d[0] for d in db]), "db_scenes": np.array([d[1] for d in db]),
           "q_names": np.array([q[0] for q in queries]), "q_scenes": np.array([q[1] for q in queries]),
           "inliers": inliers}
    for group in ("db", "q", "train"):
        kp, desc = feats[group]
        out[f"{group}_kp"] = np.concatenate(kp)
        out[f"{group}_desc"] = np.concatenate(desc)
        out[f"{group}_ids"] = feats[group + "_ids"]
    os.makedirs(args.work, exist_ok=True)
    np.savez(path, **out)
    return out


# ---------------------------------------------------------------------------------------------------------
# engines (each runs in its own process: ``--engine``)


def _split(desc, ids):
    return [desc[ids == i] for i in range(int(ids.max()) + 1)]


def codebook(work, words):
    """The ``words``-word codebook trained by the main process (faiss k-means on RootSIFT of the training views)."""
    import jasmk

    return jasmk.Codebook.from_centroids(np.load(os.path.join(work, f"codebook-{words}.npy")))


def run_jasmk(data, words, quantizer, work):
    import jasmk

    cb = codebook(work, words)
    t0 = time.perf_counter()
    index = jasmk.build_index(rootsift(data["db_desc"]), data["db_ids"], codebook=cb, quantizer=quantizer)
    build = time.perf_counter() - t0
    q = rootsift(data["q_desc"])
    q_ids = data["q_ids"]
    n_db = index.n_images
    jasmk.query(index, q[q_ids == 0], q_ids[q_ids == 0], topk=n_db, quantizer=quantizer)  # warm-up
    ranks, times = [], []
    for i in range(int(q_ids.max()) + 1):
        sel = q_ids == i
        t0 = time.perf_counter()
        res = jasmk.query(index, q[sel], np.zeros(int(sel.sum()), np.int64), topk=n_db, quantizer=quantizer)
        times.append(time.perf_counter() - t0)
        ranks.append(res.ranks[0])
    return np.stack(ranks), times, build


def run_asmk(data, words, work):
    from asmk import asmk_method
    from asmk import codebook as cdb_pkg
    from asmk import index as idx_pkg

    cb = codebook(work, words)  # the same centroids
    params = {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": words}},
              "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                            "quantize": {"multiple_assignment": 1}, "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {}, "search": {"topk": None},
                            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}
    cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=words)
    cdb.index(np.ascontiguousarray(cb.centroids, np.float32))
    t0 = time.perf_counter()
    built = asmk_method.ASMKMethod(params, {}, codebook=cdb).build_ivf(rootsift(data["db_desc"]), data["db_ids"])
    build = time.perf_counter() - t0
    q = rootsift(data["q_desc"])
    q_ids = data["q_ids"]
    ranks, times = [], []
    for i in range(int(q_ids.max()) + 1):
        sel = q_ids == i
        t0 = time.perf_counter()
        _, _, r, _ = built.query_ivf(q[sel], np.zeros(int(sel.sum()), np.int64))
        times.append(time.perf_counter() - t0)
        ranks.append(r[0])
    return np.stack(ranks), times, build


def run_colmap(data, words, verify, work):
    import pycolmap

    kind = pycolmap.FeatureExtractorType.SIFT
    tree_path = os.path.join(work, f"vocab-{words}.bin")
    if not os.path.isfile(tree_path):
        tree = pycolmap.VisualIndex.create(128, 64)
        opts = pycolmap.VisualIndex.BuildOptions()  # built once, off the clock: all cores, fewer k-means rounds
        opts.num_visual_words, opts.num_threads = int(words), -1
        opts.num_iterations, opts.num_rounds = COLMAP_ITERATIONS, 1
        tree.build(opts, pycolmap.FeatureDescriptorsFloat(kind, colmap_uint8(data["train_desc"]).astype(np.float32)))
        tree.write(tree_path)
    db_path = os.path.join(work, f"colmap-{words}-{int(verify)}-{os.getpid()}.db")
    database = pycolmap.Database.open(db_path) if hasattr(pycolmap.Database, "open") else pycolmap.Database(db_path)
    n_db = len(data["db_names"])
    groups = (("db", data["db_kp"], data["db_desc"], data["db_ids"]),
              ("q", data["q_kp"], data["q_desc"], data["q_ids"]))
    image_ids = {}
    camera = pycolmap.Camera.create_from_model_id(1, pycolmap.CameraModelId.SIMPLE_RADIAL, 500.0, 640, 480)
    camera_id = database.write_camera(camera)
    for group, kp, desc, ids in groups:
        for i in range(int(ids.max()) + 1):
            sel = ids == i
            image = pycolmap.Image(name=f"{group}{i}", camera_id=camera_id)
            image_id = database.write_image(image)
            image_ids[(group, i)] = image_id
            pts = kp[sel]
            keypoints = np.c_[pts, np.ones(len(pts)), np.zeros(len(pts))].astype(np.float32)
            database.write_keypoints(image_id, keypoints)
            database.write_descriptors(image_id, pycolmap.FeatureDescriptors(kind, colmap_uint8(desc[sel])))
    opts = pycolmap.VocabTreePairingOptions()
    opts.vocab_tree_path, opts.num_threads = tree_path, 1
    opts.num_images = n_db + len(data["q_names"])
    opts.num_images_after_verification = opts.num_images if verify else 0
    queries = [image_ids[("q", i)] for i in range(len(data["q_names"]))]
    slot = {image_ids[("db", i)]: i for i in range(n_db)}
    t0 = time.perf_counter()
    generator = pycolmap.VocabTreePairGenerator(opts, database, queries)
    build = time.perf_counter() - t0
    ranked = {q: [] for q in queries}
    t0 = time.perf_counter()
    while not generator.has_finished():
        for a, b in generator.next():
            q, d = (a, b) if a in ranked else (b, a)
            if d in slot and q in ranked:
                ranked[q].append(slot[d])
    total = time.perf_counter() - t0
    database.close()
    os.remove(db_path)
    ranks = np.full((len(queries), n_db), -1, np.int64)
    for row, q in enumerate(queries):
        got = list(dict.fromkeys(ranked[q]))
        returned = set(got)
        rest = [j for j in range(n_db) if j not in returned]
        ranks[row] = got + rest  # images COLMAP did not return rank last, in id order
    return ranks, [total / len(queries)] * len(queries), build


def engine_main(args):
    data = dict(np.load(os.path.join(args.work, "data.npz"), allow_pickle=False))
    if args.engine.startswith("jasmk"):
        ranks, times, build = run_jasmk(data, args.engine_words, args.engine.split(":")[1], args.work)
    elif args.engine == "asmk":
        ranks, times, build = run_asmk(data, args.engine_words, args.work)
    else:
        ranks, times, build = run_colmap(data, args.engine_words, args.engine == "colmap:verified", args.work)
    # VmHWM: this program's own high-water mark. ru_maxrss is not: Linux carries it over fork and exec, so a child
    # would report at least the parent's size when it was started.
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024
    np.save(os.path.join(args.work, f"ranks-{args.engine.replace(':', '_')}-{args.engine_words}.npy"), ranks)
    print(json.dumps({"query_ms": 1000 * float(np.median(times)), "build_s": build, "peak_mb": peak}))


# ---------------------------------------------------------------------------------------------------------
# metrics


def metrics(ranks, positive, junk):
    """``(mAP, P@5, top-10 recall)`` in percent over the queries with at least one positive, and per query AP."""
    aps, p5, r10 = [], [], []
    for row, pos, jnk in zip(ranks, positive, junk):
        if not pos.any():
            aps.append(np.nan)
            p5.append(np.nan)
            r10.append(np.nan)
            continue
        row = row[~jnk[row]]
        hits = pos[row]
        cum = np.cumsum(hits)
        ranks_hit = np.flatnonzero(hits)
        aps.append(float(np.mean((cum[ranks_hit]) / (ranks_hit + 1))))
        p5.append(float(hits[:5].mean()))
        r10.append(float(hits[:10].sum() / min(int(pos.sum()), 10)))
    aps, p5, r10 = (np.array(x) for x in (aps, p5, r10))
    return 100 * np.nanmean(aps), 100 * np.nanmean(p5), 100 * np.nanmean(r10), aps


def ground_truth(data, min_inliers):
    """``(verified positives, label positives, junk)`` as ``[n_query, n_db]`` masks."""
    q_names, db_names = data["q_names"], data["db_names"]
    junk = np.array([[d == q.replace("[crop]", "") for d in db_names] for q in q_names])
    verified = (data["inliers"] >= min_inliers) & ~junk
    labels = (data["q_scenes"][:, None] == data["db_scenes"][None, :]) & ~junk
    return verified, labels, junk


def failures(args, data, verified, junk, n: int = 6):
    """Draw the ``n`` queries with the lowest AP of jasmk (``auto``, the middle vocabulary size) and their top 5."""
    from jasmk import show

    words = sorted(args.words)[len(args.words) // 2]
    path = os.path.join(args.work, f"ranks-jasmk_auto-{words}.npy")
    if not os.path.isfile(path):
        print(f"--failures-png: no jasmk:auto ranks at {words} words", file=sys.stderr)
        return
    ranks = np.load(path)
    aps = metrics(ranks, verified, junk)[3]
    worst = [int(q) for q in np.argsort(np.nan_to_num(aps, nan=2.0), kind="stable")[:n] if aps[q] < 1]
    db, queries, _ = collect(args, np.random.default_rng(args.seed))  # the same images as the cached features
    gnd = [{"easy": np.flatnonzero(verified[q]).tolist(), "hard": [], "junk": np.flatnonzero(junk[q]).tolist()}
           for q in range(len(queries))]
    show.results_grid([q[2] for q in queries], [d[2] for d in db], ranks, args.failures_png, gnd=gnd, topk=5,
                      rows=worst, query_names=[q[0] for q in queries], db_names=[d[0] for d in db])
    print(f"wrote {args.failures_png}: queries {', '.join(queries[q][0] for q in worst)}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hloc", default=None, help="checkout of cvg/Hierarchical-Localization (Sacre Coeur photos)")
    ap.add_argument("--lightglue", default=None, help="checkout of cvg/LightGlue (assets/)")
    ap.add_argument("--words", type=int, nargs="+", default=[1024, 4096, 16384], help="vocabulary sizes")
    ap.add_argument("--nfeatures", type=int, default=3000, help="SIFT features per image (OpenCV)")
    ap.add_argument("--train-views", type=int, default=24, help="synthetic views per training photo")
    ap.add_argument("--min-inliers", type=int, default=15, help="RANSAC inliers that make a verified positive")
    ap.add_argument("--engines", nargs="+", default=["jasmk:auto", "jasmk:faiss", "jasmk:hnsw", "asmk", "colmap",
                                                     "colmap:verified"])
    ap.add_argument("--work", default="/tmp/bench_real", help="folder for cached features and results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--failures-png", default=None, help="picture of the queries jasmk ranks worst (auto, the "
                    "middle vocabulary size) with their top 5: green verified positive, red not, yellow junk")
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine-words", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine:
        return engine_main(args)
    from jasmk import configure_logging

    configure_logging()
    data = prepare(args)
    verified, labels, junk = ground_truth(data, args.min_inliers)
    n_q, n_db = verified.shape
    print(f"{n_db} database images ({int(np.sum([s.startswith('distractor/') for s in data['db_scenes']]))} "
          f"distractors), {n_q} queries, {len(data['db_desc']) // n_db} SIFT per database image, "
          f"{int(verified.any(1).sum())} queries with a verified positive; positives: verified "
          f"{int(verified.sum())}, by label {int(labels.sum())}, both {int((verified & labels).sum())}")
    rows, per_scene = [], {}
    import jasmk

    for words in args.words:
        path = os.path.join(args.work, f"codebook-{words}.npy")
        if not os.path.isfile(path):
            train = rootsift(data["train_desc"])
            t0 = time.perf_counter()
            cb = jasmk.train_codebook(train, size=words, seed=args.seed)
            np.save(path, cb.centroids)
            print(f"codebook of {words} words from {len(train)} training descriptors in "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for engine in args.engines:
            cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--engine-words", str(words),
                   "--work", args.work, "--seed", str(args.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{engine} {words}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            ranks = np.load(os.path.join(args.work, f"ranks-{engine.replace(':', '_')}-{words}.npy"))
            m_v = metrics(ranks, verified, junk)
            m_l = metrics(ranks, labels, junk)
            rows.append((words, engine, m_v[:3], m_l[0], info))
            for scene in sorted(set(data["q_scenes"])):
                sel = data["q_scenes"] == scene
                per_scene.setdefault(scene, {})[(words, engine)] = np.nanmean(m_v[3][sel]) * 100
    print("\n| words | engine | mAP (verified) | P@5 | top-10 recall | mAP (labels) | query ms | build s | peak MB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for words, engine, (m, p5, r10), ml, info in rows:
        print(f"| {words:,} | {engine} | {m:.1f} | {p5:.1f} | {r10:.1f} | {ml:.1f} | {info['query_ms']:.1f} | "
              f"{info['build_s']:.2f} | {info['peak_mb']:.0f} |")
    if args.failures_png:
        failures(args, data, verified, junk)
    keys = [(w, e) for w, e, *_ in rows]
    print("\nPer scene, mAP (verified overlap):\n")
    print("| scene | " + " | ".join(f"{e} {w}" for w, e in keys) + " |")
    print("| --- | " + " | ".join("---:" for _ in keys) + " |")
    for scene, vals in per_scene.items():
        print(f"| {scene} | " + " | ".join("—" if np.isnan(vals.get(k, np.nan)) else f"{vals[k]:.1f}" for k in keys)
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
