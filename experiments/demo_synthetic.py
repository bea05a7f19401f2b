"""End-to-end demo on data it makes itself: scenes seen by several images, retrieval and MASt3R-style pairs.

    python experiments/demo_synthetic.py [--images 60] [--per-image 300] [--dim 64] [--codebook auto] [--verbose]
"""

import argparse
import time

import numpy as np

import jasmk
from jasmk import configure_logging


def make_scenes(rng, *, n_images, per_image, dim, n_scenes, noise):
    """Each scene is a cloud of 3*per_image points; each image sees a random subset with noise."""
    scenes = rng.standard_normal((n_scenes, 3 * per_image, dim)).astype(np.float32)
    feats, ids, labels = [], [], []
    for i in range(n_images):
        s = i % n_scenes
        pick = rng.choice(3 * per_image, per_image, replace=False)
        feats.append(scenes[s, pick] + noise * rng.standard_normal((per_image, dim)).astype(np.float32))
        ids.append(np.full(per_image, i))
        labels.append(s)
    return np.concatenate(feats), np.concatenate(ids), np.array(labels)


def mean_average_precision(ranks, query_labels, db_labels, exclude_self=True):
    aps = []
    for q, row in enumerate(ranks):
        if exclude_self:
            row = row[row != q]
        rel = db_labels[row] == query_labels[q]
        if rel.sum() == 0:
            continue
        hits = np.cumsum(rel)
        aps.append((hits[rel] / (np.flatnonzero(rel) + 1)).mean())
    return float(np.mean(aps))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--per-image", type=int, default=300)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--noise", type=float, default=0.6)
    ap.add_argument("--codebook", default="auto", help="visual words: a size (1024, '1k') or 'auto' (as many as the "
                    "training descriptors support, at least 39 each, at most 1024)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print jasmk's info messages on stderr")
    args = ap.parse_args()
    configure_logging(verbose=args.verbose, prefix="demo_synthetic")  # quiet libraries; jasmk's INFO on request

    rng = np.random.default_rng(args.seed)
    feats, ids, labels = make_scenes(rng, n_images=args.images, per_image=args.per_image, dim=args.dim,
                                     n_scenes=args.scenes, noise=args.noise)
    train, _, _ = make_scenes(rng, n_images=args.images, per_image=args.per_image, dim=args.dim,
                              n_scenes=args.scenes, noise=args.noise)
    print(f"data: {args.images} images x {args.per_image} descriptors x {args.dim}-d, {args.scenes} scenes")

    t = time.perf_counter()
    size = args.codebook
    if size == "auto":  # k-means wants >= 39 descriptors per word: a power of two the training data supports
        size = min(1024, 1 << max(4, (len(train) // jasmk.core.codebook.MIN_PER_WORD).bit_length() - 1))
    cb = jasmk.train_codebook(train, size=size)
    print(f"codebook: {cb.size} words in {time.perf_counter() - t:.2f}s")
    t = time.perf_counter()
    index = jasmk.build_index(feats, ids, codebook=cb, binary=True, multiple_assignment=1)
    print(f"index: {index.n_entries} entries, {index.n_images} images in {time.perf_counter() - t:.2f}s")
    t = time.perf_counter()
    res = jasmk.query(index, feats, ids, multiple_assignment=5, alpha=3.0, similarity_threshold=0.0)
    print(f"query: {len(res.ids)} images in {time.perf_counter() - t:.2f}s")
    m = mean_average_precision(res.ranks, labels, labels)
    shuffled = np.array([rng.permutation(args.images) for _ in range(args.images)])
    chance = mean_average_precision(shuffled, labels, labels)
    print(f"mAP (same-scene retrieval, self excluded): {100 * m:.1f}  (random ranking: {100 * chance:.1f})")
    scores = jasmk.score_matrix(index, feats, ids)
    print(f"score matrix: {scores.shape}, diagonal is the row maximum for "
          f"{100 * np.mean(scores.argmax(1) == np.arange(len(scores))):.0f}% of images")


if __name__ == "__main__":
    main()
