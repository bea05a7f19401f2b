"""Reproduce the seed's HOW + ASMK* results (ECCV'20, Table 2) with jasmk from the published HOW features.

Nothing is downloaded here: fetch the files first (the asmk package's examples/demo_how.py reads the same ones).

  features  http://ptak.felk.cvut.cz/personal/toliageo/share/how/features/<name>.pkl
            <dataset>_<features>.pkl for roxford5k and rparis6k: a dict with 'vecs' [N, 128] float32,
            'imids' [N] (database image of each descriptor), 'qvecs', 'qimids' (the same for the queries);
            sfm120k_subset20k_<features>.pkl: the codebook training set, a dict with 'vecs'.
  gnd       http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/<dataset>/gnd_<dataset>.pkl
            a dict with 'gnd' (one dict per query: 'easy', 'hard', 'junk', 'bbx'), 'imlist', 'qimlist'.

<features> is how_r18_1000, how_r50-_1000 or how_r50-_2000. With the asmk demo's folder layout
(ROOT/features/*.pkl, ROOT/test/<dataset>/gnd_<dataset>.pkl):

    python experiments/reproduce_how.py --data-root ROOT --features how_r18_1000

or with explicit paths:

    python experiments/reproduce_how.py --codebook-features sfm120k_subset20k_how_r18_1000.pkl \\
        --eval roxford5k roxford5k_how_r18_1000.pkl gnd_roxford5k.pkl \\
        --eval rparis6k rparis6k_how_r18_1000.pkl gnd_rparis6k.pkl

Parameters are the eccv20_how ones: 65536 words, ASMK* (binary), no idf, multiple assignment 1 to index and
5 to query, alpha 3, similarity threshold 0. Seed table (Medium mAP): R18 n=1000: ROxf 75.1, RPar 79.4;
-R50 n=1000: 78.3, 80.1; -R50 n=2000: 79.4, 81.6.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

FEATURES_URL = "http://ptak.felk.cvut.cz/personal/toliageo/share/how/features/"
GND_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/"
CODEBOOK_DATASET = "sfm120k_subset20k"
DATASETS = ("roxford5k", "rparis6k")
# Medium-protocol mAP of the seed table, per feature set and dataset.
EXPECTED = {
    "how_r18_1000": {"roxford5k": 75.1, "rparis6k": 79.4},
    "how_r50-_1000": {"roxford5k": 78.3, "rparis6k": 80.1},
    "how_r50-_2000": {"roxford5k": 79.4, "rparis6k": 81.6},
}
PARAMS = {"codebook_size": 65536, "binary": True, "use_idf": False, "build_ma": 1, "query_ma": 5, "alpha": 3.0,
          "similarity_threshold": 0.0}


class InputError(SystemExit):
    """A missing or malformed input file (exits with its message)."""


def _missing(path: str, url: str | None) -> InputError:
    hint = f" (download it from {url})" if url else " (download it first, see --help)"
    return InputError(f"reproduce_how: file not found: {path}{hint}")


def load_pickle(path: str, keys, what: str, url: str | None = None) -> dict:
    """Unpickle ``path`` with jasmk's restricted unpickler (numpy arrays and plain containers only: a downloaded
    file runs no code) and check it holds ``keys``."""
    from jasmk import safepickle

    if not os.path.isfile(path):
        raise _missing(path, url)
    try:
        data = safepickle.load(path)
    except Exception as err:  # noqa: BLE001  (any unpickling failure means a bad file)
        raise InputError(f"reproduce_how: cannot read {what} from {path}: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"reproduce_how: {path} holds a {type(data).__name__}, not the dict of {what}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise InputError(f"reproduce_how: {path} lacks {missing} (is it the {what}?)")
    return data


def plan(args) -> tuple[str | None, list[tuple[str, str, str]]]:
    """``(codebook features path, [(dataset, features path, gnd path)])`` from the arguments; every input
    file must exist."""
    evals = [tuple(e) for e in (args.eval or [])]
    cb_path = args.codebook_features
    feat_name = args.features
    if args.data_root:
        root = args.data_root
        if not os.path.isdir(root):
            raise InputError(f"reproduce_how: --data-root {root} is not a directory")
        if cb_path is None:
            cb_path = os.path.join(root, "features", f"{CODEBOOK_DATASET}_{feat_name}.pkl")
        if not evals:
            evals = [(ds, os.path.join(root, "features", f"{ds}_{feat_name}.pkl"),
                      os.path.join(root, "test", ds, f"gnd_{ds}.pkl")) for ds in args.datasets]
    if not evals:
        raise InputError("reproduce_how: nothing to evaluate: give --data-root or --eval DATASET FEATURES GND")
    if cb_path is None and args.codebook is None:
        raise InputError("reproduce_how: give --codebook-features (or --data-root, or --codebook)")
    for ds, fp, gp in evals:
        if not os.path.isfile(fp):
            raise _missing(fp, f"{FEATURES_URL}{os.path.basename(fp)}")
        if not os.path.isfile(gp):
            raise _missing(gp, f"{GND_URL}{ds}/gnd_{ds}.pkl")
    if args.codebook is None or not os.path.exists(args.codebook):
        if cb_path is None:
            raise InputError("reproduce_how: --codebook does not exist yet: give --codebook-features to train it")
        if not os.path.isfile(cb_path):
            raise _missing(cb_path, f"{FEATURES_URL}{os.path.basename(cb_path)}")
    return cb_path, evals


def get_codebook(args, cb_path: str):
    """Load ``--codebook`` (an Orbax codebook directory or asmk's codebook.pkl) or train one (and save it there)."""
    import jasmk
    from jasmk import checkpoint

    if args.codebook and os.path.isdir(args.codebook):
        return checkpoint.load_codebook(args.codebook)
    if args.codebook and os.path.isfile(args.codebook):
        return checkpoint.load_asmk_codebook(args.codebook)
    train = load_pickle(cb_path, ["vecs"], "codebook training features", FEATURES_URL)
    t = time.perf_counter()
    cb = jasmk.train_codebook(train["vecs"], size=args.codebook_size)
    print(f"codebook: {cb.size} words from {len(train['vecs'])} descriptors in {time.perf_counter() - t:.0f}s")
    if args.codebook:
        checkpoint.save_codebook(args.codebook, cb)
    return cb


def evaluate(dataset: str, feats_path: str, gnd_path: str, cb) -> dict:
    """Index the database, query it and evaluate: the three protocols' results (percent) and timings."""
    import jasmk
    from jasmk import eval as jeval

    desc = load_pickle(feats_path, ["vecs", "imids", "qvecs", "qimids"], "HOW features",
                       f"{FEATURES_URL}{os.path.basename(feats_path)}")
    gnd_all = load_pickle(gnd_path, ["gnd"], "ground truth", f"{GND_URL}{dataset}/gnd_{dataset}.pkl")
    gnd = list(gnd_all["gnd"])
    n_query = int(np.unique(np.asarray(desc["qimids"])).size)
    if n_query != len(gnd):
        raise InputError(f"reproduce_how: {feats_path} has {n_query} query images but {gnd_path} has {len(gnd)} "
                         "queries (features and ground truth of different datasets?)")
    t = time.perf_counter()
    index = jasmk.build_index(desc["vecs"], desc["imids"], codebook=cb, binary=PARAMS["binary"],
                              use_idf=PARAMS["use_idf"], multiple_assignment=PARAMS["build_ma"])
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    res = jasmk.query(index, desc["qvecs"], desc["qimids"], multiple_assignment=PARAMS["query_ma"],
                      alpha=PARAMS["alpha"], similarity_threshold=PARAMS["similarity_threshold"], progress=True)
    t_query = time.perf_counter() - t
    n_db = len(gnd_all["imlist"]) if "imlist" in gnd_all else index.n_images
    out = jeval.evaluate_revisited(res.ranks, gnd, n_db=n_db, ks=(1, 5, 10))
    return {"dataset": dataset, "n_db": n_db, "n_query": n_query, "seconds_index": t_index,
            "seconds_query": t_query,
            **{p: {"map": out[p]["map"], "mp@k": out[p]["mp@k"]} for p in ("easy", "medium", "hard")}}


def expected_map(dataset: str, feats_path: str) -> float | None:
    """The seed table's Medium mAP for these features (named as published), or None."""
    base = os.path.basename(feats_path)
    for name, table in EXPECTED.items():
        if base == f"{dataset}_{name}.pkl":
            return table.get(dataset)
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", help="folder in the asmk demo layout (features/, test/<dataset>/)")
    ap.add_argument("--features", default="how_r18_1000", choices=sorted(EXPECTED),
                    help="feature set name used with --data-root (default: how_r18_1000)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), help="datasets used with --data-root")
    ap.add_argument("--codebook-features", help="pickle with 'vecs' for codebook training")
    ap.add_argument("--eval", nargs=3, action="append", metavar=("DATASET", "FEATURES", "GND"),
                    help="evaluate DATASET from its features and gnd pickles (repeatable)")
    ap.add_argument("--codebook-size", default=str(PARAMS["codebook_size"]), help="codebook size (default 65536)")
    ap.add_argument("--codebook", help="an existing Orbax codebook directory or asmk codebook.pkl to use; "
                                       "if it does not exist, the trained codebook is saved there")
    ap.add_argument("--json", help="also write the results here as JSON")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cb_path, evals = plan(args)  # every file checked before hours of work start
    cb = get_codebook(args, cb_path)
    results = []
    for dataset, feats_path, gnd_path in evals:
        r = evaluate(dataset, feats_path, gnd_path, cb)
        results.append(r)
        maps = ", ".join(f"{p[0].upper()}: {r[p]['map']:.1f}" for p in ("easy", "medium", "hard"))
        mpk = ", ".join(f"{p[0].upper()}: " + "/".join(f"{v:.1f}" for v in r[p]["mp@k"].values())
                        for p in ("easy", "medium", "hard"))
        exp = expected_map(dataset, feats_path)
        ref = f" (seed table M: {exp})" if exp is not None else ""
        print(f"{dataset}: mAP {maps}{ref}; mP@1/5/10 {mpk}; "
              f"index {r['seconds_index']:.0f}s, query {r['seconds_query']:.0f}s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"params": PARAMS, "results": results}, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
