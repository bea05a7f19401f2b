"""Reproduce the seed's HOW + ASMK* table (ECCV'20, Table 2) with jasmk, from the downloaded HOW features.

The user downloads (no network here, so this script only reads local files):
  * HOW descriptors, as published for the asmk demo: ``<dataset>_how_r18_1000.pkl`` for roxford5k and rparis6k
    (dicts with 'vecs' [N, 128], 'imids' [N], 'qvecs', 'qimids') and the codebook training set
    (a dict with 'vecs'), e.g. ``sfm120k_subset20k_how_r18_1000.pkl``;
  * the revisited ground truth ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (a dict with 'gnd').

    python experiments/reproduce_how.py --codebook-features FEATS/sfm120k_subset20k_how_r18_1000.pkl \\
        --eval roxford5k FEATS/roxford5k_how_r18_1000.pkl TEST/gnd_roxford5k.pkl \\
        --eval rparis6k FEATS/rparis6k_how_r18_1000.pkl TEST/gnd_rparis6k.pkl

Parameters are eccv20_how's: 65536 words, ASMK* (binary), no idf, MA 1 to index and 5 to query, alpha 3,
threshold 0. Expected (seed README): R18_how n=1000: ROxf (M) 75.1, RPar (M) 79.4.
"""

import argparse
import logging
import os
import pickle
import sys
import time

import jasmk
from jasmk import eval as jeval

EXPECTED = {"roxford5k": 75.1, "rparis6k": 79.4}


def load_pickle(path, keys, what):
    if not os.path.isfile(path):
        raise SystemExit(f"reproduce_how: {what} not found: {path} (download it first, see --help)")
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    missing = [k for k in keys if k not in data]
    if missing:
        raise SystemExit(f"reproduce_how: {path} lacks {missing} (is it the right {what}?)")
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebook-features", required=True, help="pickle with 'vecs' for codebook training")
    ap.add_argument("--eval", nargs=3, action="append", required=True, metavar=("DATASET", "FEATURES", "GND"))
    ap.add_argument("--codebook-size", default="64k")
    ap.add_argument("--codebook-cache", default=None, help="save/load the trained codebook here (Orbax)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from jasmk import checkpoint

    for _, feats_path, gnd_path in args.eval:  # fail early on missing files
        for p in (feats_path, gnd_path):
            if not os.path.isfile(p):
                raise SystemExit(f"reproduce_how: file not found: {p} (download it first, see --help)")
    if args.codebook_cache and os.path.isdir(args.codebook_cache):
        cb = checkpoint.load_codebook(args.codebook_cache)
    else:
        train = load_pickle(args.codebook_features, ["vecs"], "codebook training features")
        t = time.perf_counter()
        cb = jasmk.train_codebook(train["vecs"], size=args.codebook_size)
        print(f"codebook: {cb.size} words in {time.perf_counter() - t:.0f}s")
        if args.codebook_cache:
            checkpoint.save_codebook(args.codebook_cache, cb)
    for dataset, feats_path, gnd_path in args.eval:
        desc = load_pickle(feats_path, ["vecs", "imids", "qvecs", "qimids"], "HOW features")
        gnd = load_pickle(gnd_path, ["gnd"], "ground truth")["gnd"]
        t = time.perf_counter()
        index = jasmk.build_index(desc["vecs"], desc["imids"], codebook=cb, binary=True, use_idf=False,
                                  multiple_assignment=1)
        res = jasmk.query(index, desc["qvecs"], desc["qimids"], multiple_assignment=5, alpha=3.0,
                          similarity_threshold=0.0, progress=True)
        elapsed = time.perf_counter() - t
        out = jeval.evaluate_revisited(res.ranks, gnd, n_db=index.n_images)
        line = ", ".join(f"{k[0].upper()}: {v['map']:.1f}" for k, v in out.items())
        exp = f" (seed table, M: {EXPECTED[dataset]})" if dataset in EXPECTED else ""
        print(f"{dataset}: mAP {line}{exp}; index + query {elapsed:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
