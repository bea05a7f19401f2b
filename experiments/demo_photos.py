"""Real-photo retrieval demo that runs offline: RootSIFT on the photos bundled with scikit-image.

Each source photo (astronaut, camera, coffee, chelsea, rocket, brick, ... and the Middlebury motorcycle stereo
pair) is seen through synthetic views made with ``cv2.warpPerspective``: random homographies, rotations,
scalings, crops and lighting changes. The database holds ``--db-views`` views of every photo, half of them
mild ("easy" positives) and half strong ("hard": larger rotation and perspective, zoom, blur, noise); the queries
are other, cropped views of each photo (for the motorcycle, the database comes from the right camera and the
queries from the left one). The codebook is trained on yet other views. Results follow the revisited
Oxford/Paris protocol (Easy / Medium / Hard mAP) next to a random ranking, and the database is also turned
into MASt3R-SfM ``retrieval-Na-k`` pairs whose precision (pairs of views of one photo) is reported.

Needs the ``sift`` extra: ``pip install opencv-python-headless scikit-image``. Nothing is downloaded.

    python experiments/demo_photos.py [--db-views 4] [--query-views 2] [--nfeatures 1000] [--codebook 1k]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time

import numpy as np

import jasmk
from jasmk import eval as jeval
from jasmk import pairs as jpairs

# Natural photos shipped inside the scikit-image wheel (skimage/data/*); the others need pooch and a network.
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text")
STEREO = "stereo_motorcycle"


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


def _stack(descs):
    """``[(photo, kind, [n, 128])]`` -> ``(feats [N, 128], ids [N], photo [n_images], kinds)``.

    Views without descriptors are dropped."""
    keep = [(p, k, d) for p, k, d in descs if len(d)]
    feats = np.concatenate([d for _, _, d in keep])
    ids = np.repeat(np.arange(len(keep)), [len(d) for _, _, d in keep])
    return feats, ids, np.array([p for p, _, _ in keep]), [k for _, k, _ in keep]


def run(*, db_views: int = 4, query_views: int = 2, train_views: int = 2, nfeatures: int = 1000,
        codebook="1k", max_side: int = 512, na: int = 5, k: int = 3, seed: int = 0, verbose: bool = True) -> dict:
    """Run the demo; returns its figures (mAP in percent, seconds) plus the ranks, gnd and labels behind them."""
    if db_views < 1 or query_views < 1 or train_views < 1:
        raise ValueError("db_views, query_views and train_views must be >= 1")
    say = print if verbose else (lambda *a, **kw: None)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    photos = load_photos(max_side)
    if len(photos) < 3:
        raise SystemExit("demo_photos: fewer than 3 photos could be loaded from scikit-image")
    names = sorted(photos)
    db, qs, train = [], [], []
    for p, name in enumerate(names):
        db_src, q_src = photos[name]
        for v in range(db_views):
            kind = "easy" if v % 2 == 0 else "hard"
            db.append((p, kind, rootsift(random_view(db_src, rng, strength=kind), nfeatures)))
        for _ in range(query_views):
            qs.append((p, "query", rootsift(random_view(q_src, rng, crop=True), nfeatures)))
        for v in range(train_views):
            kind = "easy" if v % 2 == 0 else "hard"
            train.append(rootsift(random_view(db_src, rng, strength=kind), nfeatures))
    feats, ids, db_photo, db_kind = _stack(db)
    qfeats, qids, q_photo, _ = _stack(qs)
    train = np.concatenate(train)
    t_feat = time.perf_counter() - t0
    say(f"{len(names)} photos: {len(db_photo)} database views, {len(q_photo)} query views, "
        f"{len(feats) + len(qfeats)} RootSIFT descriptors ({t_feat:.1f}s)")

    size = min(jasmk.parse_size(codebook), max(16, len(train) // 40))  # >= 40 training points per word
    t = time.perf_counter()
    cb = jasmk.train_codebook(train, size=size)
    t_cb = time.perf_counter() - t
    t = time.perf_counter()
    index = jasmk.build_index(feats, ids, codebook=cb)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    res = jasmk.query(index, qfeats, qids)
    t_query = time.perf_counter() - t
    t = time.perf_counter()
    jasmk.query(index, qfeats, qids)  # again, compiled: the steady-state query time
    t_query_warm = time.perf_counter() - t

    db_kind = np.asarray(db_kind)
    gnd = [{"easy": np.flatnonzero((db_photo == p) & (db_kind == "easy")).tolist(),
            "hard": np.flatnonzero((db_photo == p) & (db_kind == "hard")).tolist(), "junk": []} for p in q_photo]
    out = jeval.evaluate_revisited(res.ranks, gnd, n_db=index.n_images, ks=(1, 5))
    n_db = index.n_images
    chance = np.mean([jeval.evaluate_revisited(np.stack([rng.permutation(n_db) for _ in gnd]), gnd,
                                               n_db=n_db)["medium"]["map"] for _ in range(20)])
    say(f"codebook {cb.size} words ({t_cb:.1f}s); index {t_index:.2f}s; {len(q_photo)} queries {t_query:.2f}s with "
        f"jit compilation, {t_query_warm:.2f}s compiled ({1000 * t_query_warm / len(q_photo):.1f} ms/query)")
    for name in ("easy", "medium", "hard"):
        r = out[name]
        say(f"  {name:6s} mAP {r['map']:5.1f}   mP@1 {r['mp@k'][1]:5.1f}   mP@5 {r['mp@k'][5]:5.1f}")
    say(f"  random ranking, medium mAP {chance:.1f}")

    # MASt3R-SfM pairs over the database views, from their score matrix against the database itself
    t = time.perf_counter()
    scores = jasmk.score_matrix(index, feats, ids)
    na_used = min(na, n_db)
    pairs, keys = jpairs.retrieval_pairs(scores, na=na_used, k=k, seed=seed)
    t_pairs = time.perf_counter() - t
    same = db_photo[pairs[:, 0]] == db_photo[pairs[:, 1]]
    knn, _ = jpairs.retrieval_pairs(scores, na=0, k=k, seed=seed)
    knn_same = db_photo[knn[:, 0]] == db_photo[knn[:, 1]]
    say(f"retrieval-{na_used}-{k} pairs: {len(pairs)} ({100 * same.mean():.1f} % join views of one photo; "
        f"the k-NN part alone {100 * knn_same.mean():.1f} %), score matrix + pairs {t_pairs:.2f}s")
    return {
        "photos": len(names), "db_images": int(n_db), "queries": len(q_photo),
        "descriptors": int(len(feats) + len(qfeats)), "codebook": int(cb.size),
        "map": {n: out[n]["map"] for n in ("easy", "medium", "hard")},
        "mp@1": {n: out[n]["mp@k"][1] for n in ("easy", "medium", "hard")},
        "chance_medium": float(chance),
        "pairs": int(len(pairs)), "pairs_same_photo": float(same.mean()),
        "knn_pairs_same_photo": float(knn_same.mean()),
        "seconds": {"features": t_feat, "codebook": t_cb, "index": t_index, "query": t_query,
                    "query_compiled": t_query_warm, "pairs": t_pairs},
        "ranks": res.ranks, "query_ids": res.ids, "gnd": gnd, "db_photo": db_photo, "query_photo": q_photo,
        "scores": scores, "pair_list": pairs, "key_images": keys,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db-views", type=int, default=4, help="database views per photo (half easy, half hard)")
    ap.add_argument("--query-views", type=int, default=2, help="cropped query views per photo")
    ap.add_argument("--train-views", type=int, default=2, help="codebook training views per photo")
    ap.add_argument("--nfeatures", type=int, default=1000, help="SIFT keypoints per view")
    ap.add_argument("--codebook", default="1k", help="codebook size (capped at training descriptors / 40)")
    ap.add_argument("--max-side", type=int, default=512, help="photos are downscaled to this longest side")
    ap.add_argument("--scene-graph", default="retrieval-5-3", help="MASt3R-SfM pairs, retrieval-Na-k")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    na, k = jpairs.parse_scene_graph(args.scene_graph)
    run(db_views=args.db_views, query_views=args.query_views, train_views=args.train_views,
        nfeatures=args.nfeatures, codebook=args.codebook, max_side=args.max_side, na=na, k=k, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
