"""Choose jasmk's ``preset="sift"`` on a validation split of the real photos of ``experiments/bench_real.py``.

The scenes of ``bench_real.py`` (its cached features and verified-overlap ground truth, ``--work``) are split in
two by name: every other scene in sorted order is validation, the rest is test; the distractors stay in both
databases. Every combination of the grid below is scored on the validation queries (mAP under verified overlap);
the best one is then reported on the test queries beside HOW's defaults (jasmk's defaults), which is the only
number the test split contributes. Run ``bench_real.py`` first (it caches the features and the codebooks).

    python experiments/tune_sift.py [--work /tmp/bench_real] [--words 1024 4096] [--quantizer faiss]

``--quantizer`` is the word assignment of every run (``faiss``: exact, as the preset was chosen; ``auto``: what
``build_index`` / ``query`` use by default, the list search from 4,096 to 16,384 words on the CPU). The last table
also scores the shipped ``preset="sift"`` on both splits.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_real  # noqa: E402

import jasmk  # noqa: E402
from jasmk.core import presets  # noqa: E402

GRID = {
    "binary": (True, False),
    "use_idf": (False, True),
    "index_ma": (1, 2),
    "query_ma": (3, 5),
    "alpha": (3.0,),
    "threshold": (0.0, 0.1),
}


def split(data):
    """``(validation query mask, test query mask)``: real scenes alternate by sorted name."""
    scenes = sorted(s for s in set(data["q_scenes"]) if not s.startswith("distractor/"))
    val = set(scenes[0::2])
    in_val = np.array([s in val for s in data["q_scenes"]])
    return in_val, ~in_val, sorted(val), sorted(set(scenes) - val)


def evaluate(data, cb, cfg, verified, junk, mask, quantizer="faiss"):
    root = bench_real.rootsift
    index = jasmk.build_index(root(data["db_desc"]), data["db_ids"], codebook=cb, binary=cfg["binary"],
                              use_idf=cfg["use_idf"], multiple_assignment=cfg["index_ma"], quantizer=quantizer)
    q_ids = data["q_ids"]
    chosen = np.flatnonzero(mask)
    rows = np.isin(q_ids, chosen)
    res = jasmk.query(index, root(data["q_desc"][rows]), q_ids[rows], topk=index.n_images,
                      multiple_assignment=cfg["query_ma"], alpha=cfg["alpha"],
                      similarity_threshold=cfg["threshold"], quantizer=quantizer)
    m, p5, r10, _ = bench_real.metrics(res.ranks, verified[res.ids], junk[res.ids])
    return m, p5, r10


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench_real")
    ap.add_argument("--words", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--min-inliers", type=int, default=15)
    ap.add_argument("--quantizer", default="faiss", choices=["faiss", "auto", "hnsw", "ivf"],
                    help="word assignment of every run (faiss: exact)")
    args = ap.parse_args(argv)
    jasmk.configure_logging()
    data = dict(np.load(os.path.join(args.work, "data.npz"), allow_pickle=False))
    verified, _, junk = bench_real.ground_truth(data, args.min_inliers)
    val, test, val_scenes, test_scenes = split(data)
    print(f"validation scenes: {', '.join(val_scenes)}\ntest scenes: {', '.join(test_scenes)}\n")
    print("| words | ASMK* | idf | MA db | MA query | alpha | tau | val mAP | val P@5 | val R@10 |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    results = []
    for words in args.words:
        cb = bench_real.codebook(args.work, words)
        for values in itertools.product(*GRID.values()):
            cfg = dict(zip(GRID, values))
            m = evaluate(data, cb, cfg, verified, junk, val, args.quantizer)
            results.append((m[0], words, cfg))
            print(f"| {words:,} | {cfg['binary']} | {cfg['use_idf']} | {cfg['index_ma']} | {cfg['query_ma']} | "
                  f"{cfg['alpha']:g} | {cfg['threshold']:g} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} |", flush=True)
    best = max(results, key=lambda r: r[0])
    how = {"binary": True, "use_idf": False, "index_ma": 1, "query_ma": 5, "alpha": 3.0, "threshold": 0.0}
    print(f"\nbest on validation: {best[1]} words, {best[2]} (val mAP {best[0]:.1f})\n")
    print("| setting | words | test mAP | test P@5 | test R@10 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, words, cfg in (("chosen on validation", best[1], best[2]),
                             *(("HOW defaults", w, how) for w in args.words)):
        m = evaluate(data, bench_real.codebook(args.work, words), cfg, verified, junk, test, args.quantizer)
        print(f"| {name} | {words:,} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} |")
    p = presets.get("sift")
    shipped = {"binary": p.binary, "use_idf": p.use_idf, "index_ma": p.index_multiple_assignment,
               "query_ma": p.query_multiple_assignment, "alpha": p.alpha, "threshold": p.similarity_threshold}
    if os.path.isfile(os.path.join(args.work, f"codebook-{p.words}.npy")):
        cb = bench_real.codebook(args.work, p.words)
        print(f"\nthe shipped preset='sift' ({p.words} words, {shipped}), quantizer {args.quantizer!r}:\n")
        print("| split | mAP | P@5 | R@10 |")
        print("| --- | ---: | ---: | ---: |")
        for name, mask in (("validation", val), ("test", test)):
            m = evaluate(data, cb, shipped, verified, junk, mask, args.quantizer)
            print(f"| {name} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
