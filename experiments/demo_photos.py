"""Real-photo retrieval demo that runs offline: RootSIFT, jasmk retrieval, revisited mAP and pictures.

With Debian's ``opencv-doc`` package (``apt install opencv-doc``: its examples/data holds real photo pairs of one
scene seen twice: Graffiti ``graf1``/``graf3``, ``box``/``box_in_scene``, the Leuven and aerial pairs, the
``aloe`` and book stereo pairs, ...) the database holds both real views of every scene plus the photos bundled
with scikit-image as distractors; each real view is a query (its other view is the positive, itself junk) and
so is a crop of it (a "hard" query: its source is an easy positive, the other view a hard one). The Middlebury
motorcycle stereo pair from scikit-image is one more real scene. The codebook is trained on synthetic views of
other opencv-doc photos (baboon, fruits, building, ...), never on database or query images.

Without opencv-doc the demo says how to get it and runs on what it has: synthetic views (``cv2.warpPerspective``:
random homographies, rotations, scalings, crops, lighting) of the scikit-image photos. The database then holds
``--db-views`` views of every photo, half mild ("easy" positives) and half strong ("hard"); the queries are
other, cropped views (for the motorcycle, the database comes from the right camera, the queries from the left).

Results follow the revisited Oxford/Paris protocol (Easy / Medium / Hard mAP) next to a random ranking; the
database is also turned into MASt3R-SfM ``retrieval-Na-k`` pairs. ``--results-png`` / ``--scores-png`` write a
picture of queries with their top results (green correct, red wrong, yellow junk) and the score heat map.

Needs the ``sift`` extra: ``pip install opencv-python-headless scikit-image``. Nothing is downloaded and no
system package is installed.

    python experiments/demo_photos.py [--results-png docs/photos_results.png --scores-png docs/photos_scores.png]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import sys
import time

import numpy as np

import jasmk
from jasmk import evaluation as jeval
from jasmk import pairs as jpairs

# Natural photos shipped inside the scikit-image wheel (skimage/data/*); the others need pooch and a network.
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text")
STEREO = "stereo_motorcycle"

# Debian's opencv-doc sample pictures (files may also be stored gzip-compressed, NAME.gz).
OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
# Real scenes photographed (or rendered) twice: viewpoint, zoom, lighting, stereo or object-in-clutter changes.
REAL_SCENES = (
    ("graffiti", ("graf1.png", "graf3.png")),
    ("box", ("box.png", "box_in_scene.png")),
    ("aloe", ("aloeL.jpg", "aloeR.jpg")),
    ("books", ("left.jpg", "right.jpg")),
    ("leuven", ("leuvenA.jpg", "leuvenB.jpg")),
    ("aerial", ("aero1.jpg", "aero3.jpg")),
    ("suzanne", ("Blender_Suzanne1.jpg", "Blender_Suzanne2.jpg")),
    ("basketball", ("basketball1.png", "basketball2.png")),
    ("rubberwhale", ("rubberwhale1.png", "rubberwhale2.png")),
    ("notebook", ("ela_original.jpg", "ela_modified.jpg")),
    ("text", ("imageTextN.png", "imageTextR.png")),
    ("chessboard", ("left01.jpg", "right01.jpg")),
)
# Other opencv-doc photos: codebook training data only.
TRAIN_PHOTOS = ("baboon.jpg", "fruits.jpg", "building.jpg", "home.jpg", "starry_night.jpg", "messi5.jpg",
                "orange.jpg", "apple.jpg", "butterfly.jpg", "board.jpg", "stuff.jpg", "smarties.png",
                "HappyFish.jpg", "squirrel_cls.jpg", "sudoku.png")


def _gray(img, max_side: int):
    import cv2

    img = np.asarray(img)
    if img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img[..., :3]).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if img.dtype != np.uint8:
        f = img.astype(np.float64)
        img = (255 * (f - f.min()) / max(float(np.ptp(f)), 1e-9)).astype(np.uint8)
    scale = max_side / max(img.shape)
    if scale < 1:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return img


def _load(name):
    """The image(s) of ``skimage.data.<name>``, or None when it is not bundled (would need a download)."""
    from skimage import data

    fn = getattr(data, name, None)
    if fn is None:
        return None
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001  (ModuleNotFoundError for pooch, or pytest's skip under pytest)
        return None


def load_photos(max_side: int = 512) -> dict:
    """``{name: (database source, query source)}`` grayscale uint8 photos that load offline.

    Both sources are the same array except for the stereo pair (right camera for the database, left for queries).
    Duplicates (``cat`` is ``chelsea``) are dropped by content.
    """
    photos, seen = {}, set()
    for name in PHOTOS:
        img = _load(name)
        if img is None:
            continue
        digest = hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        g = _gray(img, max_side)
        photos[name] = (g, g)
    pair = _load(STEREO)
    if pair is not None:
        left, right = pair[0], pair[1]
        photos["motorcycle"] = (_gray(right, max_side), _gray(left, max_side))
    return photos


def random_view(img, rng, *, strength: str = "easy", crop: bool = False):
    """A synthetic view of ``img``: perspective jitter, rotation, scale, shift, lighting (``"hard"``: stronger,
    with blur and noise); ``crop`` keeps a random 55-85 % window, like a query's bounding box."""
    import cv2

    h, w = img.shape
    hard = strength == "hard"
    jitter, max_rot = (0.16, 50.0) if hard else (0.06, 12.0)
    scale = rng.uniform(0.55, 0.75) if hard and rng.uniform() < 0.5 else (
        rng.uniform(1.3, 1.6) if hard else rng.uniform(0.9, 1.1))
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = src + rng.uniform(-jitter, jitter, src.shape).astype(np.float32) * np.float32([w, h])
    hom = cv2.getPerspectiveTransform(src, dst)
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-max_rot, max_rot), scale)
    rot[:, 2] += rng.uniform(-0.05, 0.05, 2) * np.array([w, h])
    hom = np.vstack([rot, [0, 0, 1]]) @ hom
    out = cv2.warpPerspective(img, hom, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out = out.astype(np.float32)
    if hard:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.6, 1.4))
        out += rng.normal(0, 6, out.shape).astype(np.float32)
    gain, bias = (rng.uniform(0.6, 1.4), rng.uniform(-40, 40)) if hard else (rng.uniform(0.85, 1.15),
                                                                            rng.uniform(-15, 15))
    out = np.clip(out * gain + bias, 0, 255).astype(np.uint8)
    if crop:
        ch, cw = int(h * rng.uniform(0.55, 0.85)), int(w * rng.uniform(0.55, 0.85))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out = out[y:y + ch, x:x + cw]
    return np.ascontiguousarray(out)


def rootsift(img, nfeatures: int) -> np.ndarray:
    """RootSIFT descriptors ``[n, 128] float32``: SIFT, L1-normalized, square-rooted (unit L2 norm)."""
    import cv2

    _, desc = cv2.SIFT_create(nfeatures=nfeatures).detectAndCompute(img, None)
    if desc is None:
        return np.zeros((0, 128), np.float32)
    desc = desc.astype(np.float64)
    desc /= np.maximum(desc.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(desc).astype(np.float32)


def _small_rgb(img, max_side: int = 256):
    """A small RGB uint8 copy of ``img`` for the pictures."""
    import cv2

    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3])
    if img.dtype != np.uint8:
        f = img.astype(np.float64)
        img = (255 * (f - f.min()) / max(float(np.ptp(f)), 1e-9)).astype(np.uint8)
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return img


def read_opencv_image(folder, name):
    """RGB uint8 array of ``folder/name`` (or ``name.gz``), or None when absent or unreadable."""
    import cv2

    for path, opener in ((os.path.join(folder, name), open), (os.path.join(folder, name + ".gz"), gzip.open)):
        if not os.path.isfile(path):
            continue
        try:
            with opener(path, "rb") as handle:
                data = np.frombuffer(handle.read(), np.uint8)
        except (OSError, EOFError):
            return None
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
        return None if img is None else np.ascontiguousarray(img[..., ::-1])
    return None


def load_real_scenes(folder, max_side: int = 512) -> dict:
    """``{scene: [(file name, gray uint8, small RGB)]}`` for the opencv-doc scenes with at least two readable
    views in ``folder``, plus scikit-image's motorcycle stereo pair; ``{}`` when ``folder`` holds none."""
    scenes = {}
    if folder and os.path.isdir(folder):
        for scene, files in REAL_SCENES:
            views = [(f, read_opencv_image(folder, f)) for f in files]
            views = [(f, _gray(v, max_side), _small_rgb(v)) for f, v in views if v is not None]
            if len(views) >= 2:
                scenes[scene] = views
    if scenes:
        pair = _load(STEREO)
        if pair is not None:
            scenes["motorcycle"] = [(f"{STEREO}[{i}]", _gray(pair[i], max_side), _small_rgb(pair[i]))
                                    for i in (0, 1)]
    return scenes


def _crop(rng, shape, lo=0.45, hi=0.7):
    """A random window ``(y, x, h, w)`` covering ``lo``-``hi`` of each side: a query's bounding box."""
    h, w = shape[:2]
    ch, cw = int(h * rng.uniform(lo, hi)), int(w * rng.uniform(lo, hi))
    return rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1), ch, cw


def _real_dataset(scenes, photos, rng, *, nfeatures, train_views, folder, max_side):
    """Database, queries and codebook data from the real scenes (queries and positives) and the
    scikit-image photos (distractors)."""
    db, qs = [], []
    for scene in sorted(scenes):
        for f, gray, rgb in scenes[scene]:
            db.append({"scene": scene, "file": f, "desc": rootsift(gray, nfeatures), "img": rgb})
    for name in sorted(photos):
        if name == "motorcycle":  # a real scene here, not a distractor
            continue
        g = photos[name][0]
        db.append({"scene": f"distractor:{name}", "file": name, "desc": rootsift(g, nfeatures),
                   "img": _small_rgb(g)})
    for scene in sorted(scenes):
        for f, gray, rgb in scenes[scene]:
            qs.append({"scene": scene, "file": f, "crop": False, "desc": rootsift(gray, nfeatures), "img": rgb})
            y, x, h, w = _crop(rng, gray.shape)
            sy, sx = rgb.shape[0] / gray.shape[0], rgb.shape[1] / gray.shape[1]
            small = rgb[int(y * sy):int((y + h) * sy), int(x * sx):int((x + w) * sx)]
            qs.append({"scene": scene, "file": f, "crop": True,
                       "desc": rootsift(np.ascontiguousarray(gray[y:y + h, x:x + w]), nfeatures), "img": small})
    train = []
    sources = [read_opencv_image(folder, n) for n in TRAIN_PHOTOS]
    sources = [_gray(s, max_side) for s in sources if s is not None]
    if not sources:  # no other opencv-doc photos: synthetic views of the distractors (never the scenes)
        sources = [photos[n][0] for n in sorted(photos) if n != "motorcycle"]
    for src in sources:
        for v in range(train_views):
            train.append(rootsift(random_view(src, rng, strength="easy" if v % 2 == 0 else "hard"), nfeatures))
    db = [d for d in db if len(d["desc"])]
    qs = [q for q in qs if len(q["desc"])]
    gnd = []
    for q in qs:
        same = [i for i, d in enumerate(db) if d["scene"] == q["scene"]]
        self_ = [i for i in same if db[i]["file"] == q["file"]]
        others = [i for i in same if db[i]["file"] != q["file"]]
        # a full view: its other view(s) positive, itself junk; a crop: its source easy, the other view(s) hard
        gnd.append({"easy": self_, "hard": others, "junk": []} if q["crop"] else
                   {"easy": others, "hard": [], "junk": self_})
    return db, qs, train, gnd


def _synthetic_dataset(photos, rng, *, db_views, query_views, train_views, nfeatures):
    """Synthetic views of the scikit-image photos (the demo without opencv-doc)."""
    db, qs, train = [], [], []
    for name in sorted(photos):
        db_src, q_src = photos[name]
        for v in range(db_views):
            kind = "easy" if v % 2 == 0 else "hard"
            view = random_view(db_src, rng, strength=kind)
            db.append({"scene": name, "file": f"{name} view {v} ({kind})", "kind": kind,
                       "desc": rootsift(view, nfeatures), "img": _small_rgb(view)})
        for v in range(query_views):
            view = random_view(q_src, rng, crop=True)
            qs.append({"scene": name, "file": f"{name} query {v}", "crop": True, "desc": rootsift(view, nfeatures),
                       "img": _small_rgb(view)})
        for v in range(train_views):
            kind = "easy" if v % 2 == 0 else "hard"
            train.append(rootsift(random_view(db_src, rng, strength=kind), nfeatures))
    db = [d for d in db if len(d["desc"])]
    qs = [q for q in qs if len(q["desc"])]
    gnd = [{"easy": [i for i, d in enumerate(db) if d["scene"] == q["scene"] and d["kind"] == "easy"],
            "hard": [i for i, d in enumerate(db) if d["scene"] == q["scene"] and d["kind"] == "hard"],
            "junk": []} for q in qs]
    return db, qs, train, gnd


def _stack(entries):
    """``[{"desc": [n, 128], ...}]`` -> ``(feats [N, 128], ids [N])``."""
    feats = np.concatenate([e["desc"] for e in entries])
    ids = np.repeat(np.arange(len(entries)), [len(e["desc"]) for e in entries])
    return feats, ids


def _label(entry):
    return entry["file"] + (" crop" if entry.get("crop") and "query" not in entry["file"] else "")


def run(*, db_views: int = 4, query_views: int = 2, train_views: int = 2, nfeatures: int = 1000,
        codebook="1k", max_side: int = 512, na: int = 5, k: int = 3, seed: int = 0, verbose: bool = True,
        opencv_data: str | None = OPENCV_DATA, results_png: str | None = None, scores_png: str | None = None,
        show_queries: int = 8, show_topk: int = 5, quantizer: str = "auto", sampled_codebook: bool = False) -> dict:
    """Run the demo; returns its figures (mAP in percent, seconds) plus the ranks, gnd and labels behind them.

    ``opencv_data``: the folder of opencv-doc's sample pictures (None or a folder without them: the synthetic
    views of scikit-image's photos). ``db_views`` and ``query_views`` only apply to those synthetic views.
    """
    if db_views < 1 or query_views < 1 or train_views < 1:
        raise ValueError("db_views, query_views and train_views must be >= 1")
    say = print if verbose else (lambda *a, **kw: None)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    photos = load_photos(max_side)
    scenes = load_real_scenes(opencv_data, max_side) if opencv_data else {}
    if scenes:
        source = "opencv-doc"
        db, qs, train, gnd = _real_dataset(scenes, photos, rng, nfeatures=nfeatures, train_views=train_views,
                                           folder=opencv_data, max_side=max_side)
        say(f"{len(scenes)} real scenes seen twice (opencv-doc in {opencv_data} + scikit-image's motorcycle), "
            f"{len(db) - sum(len(v) for v in scenes.values())} scikit-image distractor photos")
    else:
        source = "synthetic"
        say(f"demo_photos: no opencv-doc sample pictures in {opencv_data or '(none given)'}: for real multi-view "
            "photo pairs install them (Debian/Ubuntu: sudo apt install opencv-doc). Running on synthetic views "
            "of scikit-image's photos.")
        if len(photos) < 3:
            raise SystemExit("demo_photos: fewer than 3 photos could be loaded from scikit-image")
        db, qs, train, gnd = _synthetic_dataset(photos, rng, db_views=db_views, query_views=query_views,
                                                train_views=train_views, nfeatures=nfeatures)
    feats, ids = _stack(db)
    qfeats, qids = _stack(qs)
    train = np.concatenate(train)
    t_feat = time.perf_counter() - t0
    n_scenes = len({d["scene"] for d in db})
    say(f"{len(db)} database images ({n_scenes} scenes/photos), {len(qs)} queries, "
        f"{len(feats) + len(qfeats)} RootSIFT descriptors ({t_feat:.1f}s)")

    t = time.perf_counter()
    if sampled_codebook:  # words = a seeded sample of training descriptors: large codebooks without k-means
        size = min(jasmk.parse_size(codebook), len(train))
        pick = np.sort(np.random.default_rng(seed).choice(len(train), size, replace=False))
        cb = jasmk.Codebook.from_centroids(train[pick])
    else:
        size = min(jasmk.parse_size(codebook), max(16, len(train) // 40))  # >= 40 training points per word
        cb = jasmk.train_codebook(train, size=size)
    t_cb = time.perf_counter() - t
    t = time.perf_counter()
    index = jasmk.build_index(feats, ids, codebook=cb, quantizer=quantizer)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    res = jasmk.query(index, qfeats, qids, quantizer=quantizer)
    t_query = time.perf_counter() - t
    t = time.perf_counter()
    jasmk.query(index, qfeats, qids, quantizer=quantizer)  # again, compiled: the steady-state query time
    t_query_warm = time.perf_counter() - t

    n_db = index.n_images
    out = jeval.evaluate_revisited(res.ranks, gnd, n_db=n_db, ks=(1, 5))
    chance = np.mean([jeval.evaluate_revisited(np.stack([rng.permutation(n_db) for _ in gnd]), gnd,
                                               n_db=n_db)["medium"]["map"] for _ in range(20)])
    say(f"codebook {cb.size} words ({t_cb:.1f}s); index {t_index:.2f}s; {len(qs)} queries {t_query:.2f}s with "
        f"jit compilation, {t_query_warm:.2f}s compiled ({1000 * t_query_warm / len(qs):.1f} ms/query)")
    for name in ("easy", "medium", "hard"):
        r = out[name]
        say(f"  {name:6s} mAP {r['map']:5.1f}   mP@1 {r['mp@k'][1]:5.1f}   mP@5 {r['mp@k'][5]:5.1f}   "
            f"({r['n_queries']} queries)")
    say(f"  random ranking, medium mAP {chance:.1f}")

    # MASt3R-SfM pairs over the database, from its score matrix against itself
    t = time.perf_counter()
    db_scores = jasmk.score_matrix(index, feats, ids)
    na_used = min(na, n_db)
    pair_list, keys = jpairs.retrieval_pairs(db_scores, na=na_used, k=k, seed=seed)
    t_pairs = time.perf_counter() - t
    db_scene = np.array([d["scene"] for d in db])
    same = db_scene[pair_list[:, 0]] == db_scene[pair_list[:, 1]]
    knn, _ = jpairs.retrieval_pairs(db_scores, na=0, k=k, seed=seed)
    knn_same = db_scene[knn[:, 0]] == db_scene[knn[:, 1]]
    true_pairs = {(i, j) for i in range(n_db) for j in range(i + 1, n_db) if db_scene[i] == db_scene[j]}
    found = {tuple(int(v) for v in p) for p in pair_list}
    recall = len(true_pairs & found) / max(1, len(true_pairs))
    say(f"retrieval-{na_used}-{k} pairs: {len(pair_list)} ({100 * same.mean():.1f} % join views of one scene; "
        f"the k-NN part alone {100 * knn_same.mean():.1f} %; {100 * recall:.1f} % of the {len(true_pairs)} "
        f"same-scene pairs found), score matrix + pairs {t_pairs:.2f}s")

    q_scores = None
    if results_png or scores_png:
        from jasmk import show

        t = time.perf_counter()
        q_names, db_names = [_label(q) for q in qs], [_label(d) for d in db]
        if results_png:
            rows = np.unique(np.linspace(0, len(qs) - 1, min(show_queries, len(qs))).round().astype(int)).tolist()
            show.results_grid([q["img"] for q in qs], [d["img"] for d in db], res.ranks, results_png, gnd=gnd,
                              scores=res.scores, topk=show_topk, rows=rows, query_names=q_names, db_names=db_names,
                              title=f"jasmk ASMK*: {len(qs)} queries, {n_db} images, medium mAP "
                                    f"{out['medium']['map']:.1f} (green correct, red wrong, yellow junk)")
            say(f"picture of {len(rows)} queries and their top {show_topk} results: {results_png}")
        if scores_png:
            q_scores = jasmk.score_matrix(index, qfeats, qids)
            show.score_heatmap(q_scores, scores_png, row_names=q_names, col_names=db_names, names_max=60,
                               size=(11, 10), title=f"jasmk score matrix, {len(qs)} queries x {n_db} database images")
            say(f"score heat map: {scores_png}")
        say(f"pictures {time.perf_counter() - t:.1f}s")

    return {
        "source": source, "photos": n_scenes, "scenes": n_scenes, "db_images": int(n_db), "queries": len(qs),
        "descriptors": int(len(feats) + len(qfeats)), "codebook": int(cb.size),
        "map": {n: out[n]["map"] for n in ("easy", "medium", "hard")},
        "mp@1": {n: out[n]["mp@k"][1] for n in ("easy", "medium", "hard")},
        "n_queries": {n: out[n]["n_queries"] for n in ("easy", "medium", "hard")},
        "chance_medium": float(chance),
        "pairs": int(len(pair_list)), "pairs_same_photo": float(same.mean()),
        "knn_pairs_same_photo": float(knn_same.mean()), "pair_recall": float(recall),
        "seconds": {"features": t_feat, "codebook": t_cb, "index": t_index, "query": t_query,
                    "query_compiled": t_query_warm, "pairs": t_pairs},
        "ranks": res.ranks, "scores": db_scores, "query_scores": q_scores, "query_ids": res.ids, "gnd": gnd,
        "db_photo": db_scene, "query_photo": np.array([q["scene"] for q in qs]),
        "db_files": [d["file"] for d in db], "query_files": [q["file"] for q in qs],
        "query_crop": np.array([bool(q.get("crop")) for q in qs]),
        "pair_list": pair_list, "key_images": keys,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opencv-data", default=OPENCV_DATA, help="opencv-doc's sample pictures ('' : do not use them)")
    ap.add_argument("--db-views", type=int, default=4, help="synthetic mode: database views per photo")
    ap.add_argument("--query-views", type=int, default=2, help="synthetic mode: cropped query views per photo")
    ap.add_argument("--train-views", type=int, default=2, help="codebook training views per photo")
    ap.add_argument("--nfeatures", type=int, default=1000, help="SIFT keypoints per image")
    ap.add_argument("--codebook", default="1k", help="codebook size (capped at training descriptors / 40)")
    ap.add_argument("--max-side", type=int, default=512, help="photos are downscaled to this longest side")
    ap.add_argument("--scene-graph", default="retrieval-5-3", help="MASt3R-SfM pairs, retrieval-Na-k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampled-codebook", action="store_true",
                    help="words = a seeded sample of training descriptors (no k-means, no 40-per-word cap)")
    ap.add_argument("--quantizer", default="auto", choices=("auto", "faiss", "jax", "hnsw"),
                    help="word assignment (hnsw: approximate, see the README)")
    ap.add_argument("--results-png", default=None, help="write a picture of queries and their top results")
    ap.add_argument("--scores-png", default=None, help="write a heat map of the query x database scores")
    ap.add_argument("--show-queries", type=int, default=8, help="query rows in --results-png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    na, k = jpairs.parse_scene_graph(args.scene_graph)
    run(db_views=args.db_views, query_views=args.query_views, train_views=args.train_views,
        nfeatures=args.nfeatures, codebook=args.codebook, max_side=args.max_side, na=na, k=k, seed=args.seed,
        opencv_data=args.opencv_data or None, results_png=args.results_png, scores_png=args.scores_png,
        show_queries=args.show_queries, quantizer=args.quantizer, sampled_codebook=args.sampled_codebook)
    return 0


if __name__ == "__main__":
    sys.exit(main())
