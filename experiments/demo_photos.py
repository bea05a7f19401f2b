"""Real-photo retrieval demo that runs offline: RootSIFT on photos shipped inside scikit-image, plus warped views.

Each photo bundled with scikit-image is seen in several synthetic views (random perspective warps, rotation,
scale and brightness changes). Every view queries all views; the other views of the same photo are the
positives, the query view itself is ignored. Needs the ``sift`` extra (opencv-python-headless, scikit-image).

    python experiments/demo_photos.py [--views 5] [--nfeatures 800] [--codebook 1024]
"""

import argparse
import logging
import sys
import time

import numpy as np

import jasmk
from jasmk import eval as jeval

PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "moon", "page",
          "text", "clock", "coins", "hubble_deep_field", "immunohistochemistry", "retina", "cat", "logo",
          "colorwheel", "horse", "motorcycle_left", "motorcycle_right", "microaneurysms", "eagle", "cell"]


def load_photos(max_side=512):
    """Grayscale uint8 photos from skimage.data that load without a network."""
    import cv2
    from skimage import data

    photos = {}
    for name in PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            img = np.asarray(fn())
        except KeyboardInterrupt:
            raise
        except BaseException:  # not bundled: a download was needed (under pytest skimage raises a skip)
            continue
        if img.ndim == 3:
            img = cv2.cvtColor(np.ascontiguousarray(img[..., :3]).astype(np.uint8), cv2.COLOR_RGB2GRAY)
        if img.ndim != 2 or min(img.shape) < 64:
            continue
        if img.dtype != np.uint8:
            f = img.astype(np.float64)
            img = (255 * (f - f.min()) / max(float(np.ptp(f)), 1e-9)).astype(np.uint8)
        scale = max_side / max(img.shape)
        if scale < 1:
            img = cv2.resize(img, (int(img.shape[1] * scale), int(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        photos[name] = img
    return photos


def random_view(img, rng):
    """A perspective-warped, rotated, rescaled, re-lit view of ``img``."""
    import cv2

    h, w = img.shape
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = src + rng.uniform(-0.12, 0.12, src.shape).astype(np.float32) * np.float32([w, h])
    hom = cv2.getPerspectiveTransform(src, dst)
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-25, 25), rng.uniform(0.75, 1.2))
    hom = np.vstack([rot, [0, 0, 1]]) @ hom
    out = cv2.warpPerspective(img, hom, (w, h), borderMode=cv2.BORDER_REFLECT)
    out = np.clip(out.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25), 0, 255)
    return out.astype(np.uint8)


def rootsift(img, nfeatures):
    """RootSIFT descriptors ``[n, 128] float32`` (L1-normalized, square-rooted SIFT)."""
    import cv2

    _, desc = cv2.SIFT_create(nfeatures=nfeatures).detectAndCompute(img, None)
    if desc is None:
        return np.zeros((0, 128), np.float32)
    desc = desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(desc).astype(np.float32)


def run(*, views=5, nfeatures=800, codebook="1k", seed=0, verbose=True):
    rng = np.random.default_rng(seed)
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    photos = load_photos()
    if len(photos) < 3:
        raise SystemExit("demo_photos: fewer than 3 photos could be loaded from scikit-image")
    feats, ids, labels, train = [], [], [], []
    for p, (name, img) in enumerate(sorted(photos.items())):
        train.append(rootsift(random_view(img, rng), nfeatures))  # codebook views, not in the database
        for _ in range(views):
            d = rootsift(random_view(img, rng), nfeatures)
            if len(d) == 0:
                continue
            feats.append(d)
            ids.append(np.full(len(d), len(labels)))
            labels.append(p)
    feats, ids, labels = np.concatenate(feats), np.concatenate(ids), np.asarray(labels)
    train = np.concatenate(train)
    t_feat = time.perf_counter() - t0
    say(f"{len(photos)} photos x {views} views = {len(labels)} images, {len(feats)} RootSIFT descriptors "
        f"({t_feat:.1f}s)")
    size = min(jasmk.parse_size(codebook), len(train) // 4)
    t = time.perf_counter()
    cb = jasmk.train_codebook(train, size=size)
    index = jasmk.build_index(feats, ids, codebook=cb)
    res = jasmk.query(index, feats, ids)
    t_ret = time.perf_counter() - t
    n = len(labels)
    positive = (labels[:, None] == labels[None, :]) & ~np.eye(n, dtype=bool)
    junk = np.eye(n, dtype=bool)
    m, _, mpk, _ = jeval.mean_average_precision(res.ranks, positive, junk, kappas=(1, 5))
    chance = jeval.mean_average_precision(np.stack([rng.permutation(n) for _ in range(n)]), positive, junk)[0]
    say(f"codebook {cb.size} words; index + query {t_ret:.2f}s")
    say(f"mAP {100 * m:.1f}  mP@1 {100 * mpk[0]:.1f}  mP@5 {100 * mpk[1]:.1f}  (random ranking mAP {100 * chance:.1f})")
    return {"map": m, "chance": chance, "mp1": mpk[0], "images": n, "photos": len(photos),
            "descriptors": len(feats), "seconds_features": t_feat, "seconds_retrieval": t_ret}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--nfeatures", type=int, default=800)
    ap.add_argument("--codebook", default="1k")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run(views=args.views, nfeatures=args.nfeatures, codebook=args.codebook, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
