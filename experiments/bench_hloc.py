"""hloc's retrieval pairs from local features: jasmk against asmk 0.1.1 doing the same work in the same run.

For each size, a ``features.h5`` written as hloc writes it (one group per image name, ``descriptors [D, N]``
float16) holds database images ``db/...`` and query images ``query/...`` of synthetic scenes. Both pipelines
read the features, build an index over the database with one codebook (trained on other images), and write
the top-k pairs of each query in hloc's pairs format:

* jasmk: ``jasmk.storage.hloc.read_features`` -> ``jasmk.build_index(names=)`` -> ``jasmk.pairs.query_pairs``
  -> ``hloc.write_pairs`` (what ``jasmk index`` and ``jasmk pairs --index --queries`` run);
* the peer: an h5py loop as a user script reads hloc's file, asmk's ``build_ivf`` and ``query_ivf`` (top k),
  and the pairs written from its ranks.

Times are medians of ``--repeat`` runs in one process (warm: JIT and faiss loaded), in seconds; "agree" is the
fraction of pairs both write (ties may be ordered differently).

Usage: python experiments/bench_hloc.py [--sizes 500 2000 5000] [--per-image 300] [--topk 20] [--repeat 3]
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

import jasmk
from jasmk import configure_logging, pairs
from jasmk.storage import hloc

DIM = 128


def write_features(path, rng, *, n_db, n_query, per_image, n_scenes):
    import h5py

    pts = rng.standard_normal((n_scenes, 4 * per_image, DIM)).astype(np.float32)
    with h5py.File(path, "w", libver="latest") as fd:
        for kind, n in (("db", n_db), ("query", n_query)):
            for i in range(n):
                s = int(rng.integers(n_scenes))
                m = int(rng.integers(per_image // 2, 3 * per_image // 2))
                x = pts[s, rng.integers(0, 4 * per_image, m)] + 0.4 * rng.standard_normal((m, DIM)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                grp = fd.create_group(f"{kind}/scene{s:04d}/{i:06d}.jpg")
                grp.create_dataset("keypoints", data=rng.uniform(0, 1024, (m, 2)).astype(np.float16))
                grp.create_dataset("descriptors", data=x.T.astype(np.float16))
                grp.create_dataset("scores", data=rng.uniform(0, 1, m).astype(np.float16))


def peer_read(path, prefix):
    """What a user script does with hloc's file: list the groups, read each image's descriptors."""
    import h5py

    names, feats, ids = [], [], []
    with h5py.File(path, "r") as fd:
        listed = []
        fd.visititems(lambda _, obj: listed.append(obj.parent.name.strip("/")) if isinstance(obj, h5py.Dataset)
                      else None)
        for name in sorted(set(n for n in listed if n.startswith(prefix))):
            desc = fd[name]["descriptors"][()].T.astype(np.float32)
            feats.append(desc)
            ids.append(np.full(len(desc), len(names)))
            names.append(name)
    return np.concatenate(feats), np.concatenate(ids), names


def run_asmk(path, cb, k):
    from asmk import asmk_method
    from asmk import codebook as cdb_pkg
    from asmk import index as idx_pkg

    params = {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": cb.size}},
              "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                            "quantize": {"multiple_assignment": 1}, "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {}, "search": {"topk": k},
                            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}
    t = {}
    t0 = time.perf_counter()
    db_feats, db_ids, db_names = peer_read(path, "db/")
    q_feats, q_ids, q_names = peer_read(path, "query/")
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=cb.size)
    cdb.index(np.ascontiguousarray(cb.centroids, np.float32))
    built = asmk_method.ASMKMethod(params, {}, codebook=cdb).build_ivf(db_feats, db_ids)
    t["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, qids, ranks, _ = built.query_ivf(q_feats, q_ids)
    result = [(q_names[int(q)], db_names[int(j)]) for q, row in zip(qids, ranks) for j in row[:k]]
    t["pairs"] = time.perf_counter() - t0
    return t, result


def run_jasmk(path, cb, k, out):
    t = {}
    t0 = time.perf_counter()
    db = hloc.read_features(path, prefix="db/")
    q = hloc.read_features(path, prefix="query/")
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = jasmk.build_index(db.feats, db.ids, codebook=cb, names=db.names)
    t["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = pairs.query_pairs(index, q.feats, q.ids, k, query_names=q.names)
    hloc.write_pairs(out, result)
    t["pairs"] = time.perf_counter() - t0
    return t, result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000], help="database images")
    ap.add_argument("--queries", type=int, default=100, help="query images")
    ap.add_argument("--per-image", type=int, default=300, help="mean descriptors per image")
    ap.add_argument("--words", type=int, default=1024, help="codebook size")
    ap.add_argument("--topk", type=int, default=20, help="pairs per query")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size (median)")
    args = ap.parse_args()
    configure_logging()
    rng = np.random.default_rng(0)
    folder = tempfile.mkdtemp(prefix="bench_hloc-")
    train = rng.standard_normal((60 * args.words, DIM)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    cb = jasmk.train_codebook(train, size=args.words)
    print("| db images | descriptors | step | asmk 0.1.1 s | jasmk s | asmk / jasmk | pairs agree |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        path = os.path.join(folder, f"features-{n}.h5")
        write_features(path, rng, n_db=n, n_query=args.queries, per_image=args.per_image,
                       n_scenes=max(2, n // 10))
        peer_t, ours_t = [], []
        for _ in range(args.repeat):
            t, ref = run_asmk(path, cb, args.topk)
            peer_t.append(t)
            t, got = run_jasmk(path, cb, args.topk, os.path.join(folder, "pairs.txt"))
            ours_t.append(t)
        agree = len(set(ref) & set(got)) / max(len(ref), 1)
        n_desc = hloc.read_features(path, prefix="db/").feats.shape[0]
        for step in ("read", "build", "pairs", "total"):
            if step == "total":
                a = statistics.median(sum(t.values()) for t in peer_t)
                b = statistics.median(sum(t.values()) for t in ours_t)
            else:
                a = statistics.median(t[step] for t in peer_t)
                b = statistics.median(t[step] for t in ours_t)
            print(f"| {n:,} | {n_desc:,} | {step} | {a:.3f} | {b:.3f} | {a / b:.2f}x | "
                  f"{100 * agree:.1f} % |", flush=True)
        os.remove(path)


if __name__ == "__main__":
    main()
