"""Saving and loading an index: a full save against an incremental one (a save over the index's own checkpoint
after adding one image), and loads, at 100k and 1M images.

The index is made from synthetic postings (ASMK*, 128-d: 16-byte codes; ``--per-image`` postings per image, words
drawn from a Zipf-like law over ``--words``) through ``jasmk.ivf.from_postings``: what is timed is the storage, not
aggregation. For each size:

* full save: a new checkpoint of the whole index (what every save cost before incremental saves);
* incremental save: one image added (a new segment), then saved over the checkpoint: only the new segment's
  postings, the per-image and per-word arrays and a manifest are written;
* load: ``checkpoint.load_index`` (every array read and its crc32 checked), against reading the same files'
  bytes with plain ``read()`` (the peer: the page cache is warm for both, as after a save).

Usage: python experiments/bench_save.py [--sizes 100000 1000000] [--per-image 100] [--dir /tmp]
Prints one row per size: MB written and seconds for each save, MB/s for the load and for the raw read.
"""

import argparse
import os
import shutil
import tempfile
import time


def _files(path) -> dict:
    return {os.path.join(r, f): os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs}


def _tree_bytes(path) -> int:
    return sum(_files(path).values())


def _raw_read(path) -> float:
    t = time.perf_counter()
    for r, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(r, f), "rb") as handle:
                while handle.read(1 << 24):
                    pass
    return time.perf_counter() - t


def synthetic_index(n_images: int, per_image: int, n_words: int, dim: int, seed: int = 0):
    import numpy as np

    from jasmk.core import ivf

    rng = np.random.default_rng(seed)
    e = n_images * per_image
    words = np.minimum((rng.pareto(1.2, e) * n_words / 20).astype(np.int64), n_words - 1).astype(np.int32)
    images = np.repeat(np.arange(n_images, dtype=np.int64), per_image)
    order = np.lexsort((images, words))
    width = -(-dim // 32)
    vecs = rng.integers(0, 2**32, size=(e, width), dtype=np.uint32)
    centroids = rng.standard_normal((n_words, dim)).astype(np.float32)
    norm = np.full(n_images, float(per_image), np.float32)
    return ivf.from_postings(centroids, vecs, words[order], images[order], idf=np.ones(n_words, np.float32),
                             norm_factor=norm, n_images=n_images, imid_offset=0, binary=True, use_idf=False,
                             order=None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="images in the index")
    ap.add_argument("--per-image", type=int, default=100, help="postings per image")
    ap.add_argument("--words", type=int, default=65536, help="codebook size")
    ap.add_argument("--dim", type=int, default=128, help="descriptor dimension")
    ap.add_argument("--dir", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = ap.parse_args(argv)

    import numpy as np

    from jasmk.core import ivf
    from jasmk.core.aggregate import Aggregated
    from jasmk.storage import checkpoint

    root = tempfile.mkdtemp(prefix="bench_save_", dir=args.dir)
    print(f"{'images':>9} {'postings':>11} {'full save':>20} {'incremental save':>22} {'full save of grown':>20} "
          f"{'load':>18} {'raw read':>10}")
    try:
        for n in args.sizes:
            index = synthetic_index(n, args.per_image, args.words, args.dim)
            full = os.path.join(root, f"full{n}")
            t = time.perf_counter()
            checkpoint.save_index(full, index)
            t_full = time.perf_counter() - t
            mb_full = _tree_bytes(full) / 1e6
            rng = np.random.default_rng(1)
            one = Aggregated(rng.integers(0, 2**32, size=(args.per_image, index.width), dtype=np.uint32),
                             np.sort(rng.integers(0, args.words, args.per_image)).astype(np.int32),
                             np.full(args.per_image, n, np.int32))
            grown = ivf.add(index, one)
            before = _files(full)
            t = time.perf_counter()
            checkpoint.save_index(full, grown)
            t_inc = time.perf_counter() - t
            mb_inc = sum(s for f, s in _files(full).items() if f not in before) / 1e6
            again = os.path.join(root, f"again{n}")
            t = time.perf_counter()
            checkpoint.save_index(again, grown)
            t_again = time.perf_counter() - t
            shutil.rmtree(again)
            t = time.perf_counter()
            back = checkpoint.load_index(full)
            t_load = time.perf_counter() - t
            assert back.n_entries == grown.n_entries
            del back
            mb_now = _tree_bytes(full) / 1e6
            t_raw = _raw_read(full)
            print(f"{n:>9} {grown.n_entries:>11} {mb_full:>9.0f} MB {t_full:>6.2f} s {mb_inc:>11.2f} MB "
                  f"{t_inc:>6.3f} s {t_again:>18.2f} s {mb_now / t_load:>9.0f} MB/s {t_load:>4.2f} s "
                  f"{mb_now / t_raw:>5.0f} MB/s",
                  flush=True)
            shutil.rmtree(full)
            del index, grown
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
