"""Reproduce the seed's HOW + ASMK* results (ECCV'20, Table 2) with jasmk from the published HOW features,
following asmk's own parameter files (examples/params/eccv20_how_*.yml of asmk 0.1.1).

Nothing is downloaded here: fetch the files first (asmk's examples/demo_how.py reads the same ones).

  features  http://ptak.felk.cvut.cz/personal/toliageo/share/how/features/<name>.pkl
            <dataset>_<features>.pkl for roxford5k and rparis6k: a dict with 'vecs' [N, 128] float32,
            'imids' [N] (database image of each descriptor), 'qvecs', 'qimids' (the same for the queries);
            sfm120k_subset20k_<features>.pkl: the codebook training set, a dict with 'vecs'.
  gnd       http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/<dataset>/gnd_<dataset>.pkl
            a dict with 'gnd' (one dict per query: 'easy', 'hard', 'junk', 'bbx'), 'imlist', 'qimlist'.

Parameter sets (asmk's file names, as they are, shipped in jasmk/params/ and read with
jasmk.compat.load_params; a path to such a .yml file works too):

  eccv20_how_r18_1000    evaluates how_r18_1000 features, codebook trained on how_r18_1000
  eccv20_how_r50-_1000   evaluates how_r50-_1000 features, codebook trained on how_r50-_1000
  eccv20_how_r50-_2000   evaluates how_r50-_2000 features, codebook trained on how_r50-_1000 (as asmk does:
                         there is no sfm120k_subset20k_how_r50-_2000.pkl)

With the asmk demo's folder layout (ROOT/features/*.pkl, ROOT/test/<dataset>/gnd_<dataset>.pkl, and asmk's own
experiment folder ROOT/experiments/<params>/codebook.pkl when asmk's demo has run there):

    python experiments/reproduce_how.py --data-root ROOT --params eccv20_how_r50-_2000

or with explicit paths:

    python experiments/reproduce_how.py --params eccv20_how_r18_1000 \\
        --codebook-features sfm120k_subset20k_how_r18_1000.pkl \\
        --eval roxford5k roxford5k_how_r18_1000.pkl gnd_roxford5k.pkl \\
        --eval rparis6k rparis6k_how_r18_1000.pkl gnd_rparis6k.pkl

The codebook: asmk trains its 64k words with faiss k-means on a GPU. ``--codebook codebook.pkl`` takes asmk's
trained codebook (read through jasmk's restricted unpickler) for exactly asmk's centroids, and is found by
itself in ROOT/experiments/<params>/. Otherwise jasmk trains one with faiss k-means on the CPU: 64k words on
the ~16M descriptors of an sfm120k_subset20k file takes hours on a CPU (faiss prints its iterations as it
goes); ``--codebook DIR`` (a new folder) keeps the trained codebook for the next run.

R1M: ``--distractors PATH`` adds the 1M distractor images, as asmk's ``build_ivf(..., distractors_path=)``: a
distractor index built (or loaded) first, the dataset's images added after it. PATH is asmk's distractor IVF
pickle (build_ivf's cache_path), a jasmk index checkpoint folder, or a features pickle with 'vecs' and 'imids'.
The distractors are ranked with the database and count as negatives.

Parameters (the eccv20_how ones): 65536 words, ASMK* (binary), no idf, multiple assignment 1 to index and
5 to query, alpha 3, similarity threshold 0. Seed table (Medium mAP): R18 n=1000: ROxf 75.1, RPar 79.4;
-R50 n=1000: 78.3, 80.1; -R50 n=2000: 79.4, 81.6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing

import numpy as np

FEATURES_URL = "http://ptak.felk.cvut.cz/personal/toliageo/share/how/features/"
GND_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/"
CODEBOOK_DATASET = "sfm120k_subset20k"
DATASETS = ("roxford5k", "rparis6k")

# asmk 0.1.1's parameter files (examples/params/eccv20_how_*.yml) by name: jasmk ships them (jasmk/params/), and
# jasmk.compat.load_params reads them, or any asmk .yml file, as asmk's io_helpers.load_params does.
PARAM_FILES = ("eccv20_how_r18_1000", "eccv20_how_r50-_1000", "eccv20_how_r50-_2000")
# Medium-protocol mAP of the seed table, per parameter set and dataset.
EXPECTED = {
    "eccv20_how_r18_1000": {"roxford5k": 75.1, "rparis6k": 79.4},
    "eccv20_how_r50-_1000": {"roxford5k": 78.3, "rparis6k": 80.1},
    "eccv20_how_r50-_2000": {"roxford5k": 79.4, "rparis6k": 81.6},
}
PARAMS = {"codebook_size": 65536, "binary": True, "use_idf": False, "build_ma": 1, "query_ma": 5, "alpha": 3.0,
          "similarity_threshold": 0.0}


class InputError(SystemExit):
    """A missing or malformed input file (exits with its message)."""


class Setup(typing.NamedTuple):
    """One asmk parameter file, resolved: what to evaluate, what to train the codebook on, and the method's
    parameters (:data:`PARAMS` keys)."""

    name: str
    eval_features: str
    codebook_features: str
    codebook_dataset: str
    eval_datasets: tuple
    params: dict


def resolve_params(name_or_path: str, codebook_size=None) -> Setup:
    """The :class:`Setup` of an asmk parameter set: one of :data:`PARAM_FILES` by name, or a ``.yml`` file."""
    from jasmk.compat import load_params
    from jasmk.core.codebook import parse_size

    if name_or_path.endswith((".yml", ".yaml")):
        if not os.path.isfile(name_or_path):
            raise InputError(f"reproduce_how: parameter file not found: {name_or_path}")
        name = os.path.basename(name_or_path).rsplit(".", 1)[0]
    elif name_or_path in PARAM_FILES:
        name = name_or_path
    else:
        raise InputError(f"reproduce_how: unknown parameter set {name_or_path!r}: give one of "
                         f"{', '.join(sorted(PARAM_FILES))} or an asmk .yml file")
    try:
        content = load_params(name_or_path)
    except ValueError as err:
        raise InputError(f"reproduce_how: cannot read the parameter file {name_or_path}: {err}") from None
    try:
        demo = content["demo_how"]
        size = parse_size(content["train_codebook"]["codebook"]["size"] if codebook_size is None else codebook_size)
        params = {"codebook_size": size,
                  "binary": bool(content["build_ivf"]["kernel"]["binary"]),
                  "use_idf": bool(content["build_ivf"]["ivf"]["use_idf"]),
                  "build_ma": int(content["build_ivf"]["quantize"]["multiple_assignment"]),
                  "query_ma": int(content["query_ivf"]["quantize"]["multiple_assignment"]),
                  "alpha": float(content["query_ivf"]["similarity"]["alpha"]),
                  "similarity_threshold": float(content["query_ivf"]["similarity"]["similarity_threshold"])}
        setup = Setup(name, str(demo["eval_features"]), str(demo["codebook_features"]),
                      str(demo.get("codebook_dataset", CODEBOOK_DATASET)),
                      tuple(demo.get("eval_datasets") or DATASETS), params)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"reproduce_how: parameter set {name_or_path} lacks or garbles {err}") from None
    return setup


def _missing(path: str, url: str | None) -> InputError:
    hint = f" (download it from {url})" if url else " (download it first, see --help)"
    return InputError(f"reproduce_how: file not found: {path}{hint}")


def load_pickle(path: str, keys, what: str, url: str | None = None) -> dict:
    """Unpickle ``path`` with jasmk's restricted unpickler (numpy arrays and plain containers only: a downloaded
    file runs no code) and check it holds ``keys``."""
    from jasmk.storage import safepickle

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


def asmk_codebook_path(root: str, setup: Setup) -> str:
    """Where asmk's demo keeps the codebook it trained for ``setup`` (its exp_folder, data/experiments/<name>)."""
    return os.path.join(root, "experiments", setup.name, "codebook.pkl")


def plan(args, setup: Setup) -> tuple[str | None, list[tuple[str, str, str]]]:
    """``(codebook features path, [(dataset, features path, gnd path)])`` from the arguments; every input
    file must exist. May set ``args.codebook`` to asmk's codebook.pkl found in the data root."""
    evals = [tuple(e) for e in (args.eval or [])]
    cb_path = args.codebook_features
    if args.data_root:
        root = args.data_root
        if not os.path.isdir(root):
            raise InputError(f"reproduce_how: --data-root {root} is not a directory")
        if args.codebook is None and os.path.isfile(asmk_codebook_path(root, setup)):
            args.codebook = asmk_codebook_path(root, setup)
        if cb_path is None:
            cb_path = os.path.join(root, "features", f"{setup.codebook_dataset}_{setup.codebook_features}.pkl")
        if not evals:
            evals = [(ds, os.path.join(root, "features", f"{ds}_{setup.eval_features}.pkl"),
                      os.path.join(root, "test", ds, f"gnd_{ds}.pkl")) for ds in (args.datasets or setup.eval_datasets)]
    if not evals:
        raise InputError("reproduce_how: nothing to evaluate: give --data-root or --eval DATASET FEATURES GND")
    if cb_path is None and args.codebook is None:
        raise InputError("reproduce_how: give --codebook-features (or --data-root, or --codebook)")
    for ds, fp, gp in evals:
        if not os.path.isfile(fp):
            raise _missing(fp, f"{FEATURES_URL}{os.path.basename(fp)}")
        if not os.path.isfile(gp):
            raise _missing(gp, f"{GND_URL}{ds}/gnd_{ds}.pkl")
    if args.distractors and not os.path.exists(args.distractors):
        raise InputError(f"reproduce_how: --distractors {args.distractors} not found")
    if args.codebook is None or not os.path.exists(args.codebook):
        if cb_path is None:
            raise InputError("reproduce_how: --codebook does not exist yet: give --codebook-features to train it")
        if not os.path.isfile(cb_path):
            raise _missing(cb_path, f"{FEATURES_URL}{os.path.basename(cb_path)}")
    return cb_path, evals


def get_codebook(args, cb_path: str, setup: Setup):
    """Load ``--codebook`` (an Orbax codebook directory or asmk's codebook.pkl) or train one (and save it there)."""
    import jasmk
    from jasmk.storage import checkpoint

    if args.codebook and os.path.isdir(args.codebook):
        return checkpoint.load_codebook(args.codebook)
    if args.codebook and os.path.isfile(args.codebook):
        try:
            cb = checkpoint.load_asmk_codebook(args.codebook)  # restricted unpickler: runs no code
        except Exception as err:  # noqa: BLE001  (a damaged or foreign pickle)
            raise InputError(f"reproduce_how: cannot read asmk's codebook from {args.codebook}: {err}") from None
        print(f"codebook: asmk's {cb.size} words from {args.codebook}")
        return cb
    train = load_pickle(cb_path, ["vecs"], "codebook training features", FEATURES_URL)
    vecs = train["vecs"]
    k = setup.params["codebook_size"]
    slow = int(np.shape(vecs)[0]) * k >= 10**9
    if slow:
        print(f"reproduce_how: training {k} words on {np.shape(vecs)[0]} descriptors with faiss k-means on the CPU: "
              "this takes hours (asmk trains on a GPU); asmk's codebook.pkl (--codebook) skips it.",
              file=sys.stderr, flush=True)
    t = time.perf_counter()
    cb = jasmk.train_codebook(vecs, size=k, progress=slow)  # a progress bar over the k-means iterations
    print(f"codebook: {cb.size} words from {len(vecs)} descriptors in {time.perf_counter() - t:.0f}s")
    if args.codebook:
        checkpoint.save_codebook(args.codebook, cb)
    return cb


def get_distractors(path: str, cb, params: dict):
    """The distractor index (asmk's ``distractors_path``): an asmk IVF pickle, a jasmk index checkpoint folder,
    or a features pickle with 'vecs' and 'imids' indexed here with ``cb``."""
    import jasmk
    from jasmk.storage import checkpoint

    t = time.perf_counter()
    if os.path.isdir(path):
        index = checkpoint.load_index(path)
    else:
        data = load_pickle(path, [], "distractor IVF or features")
        if data.get("type") == "IVF":
            try:
                index = checkpoint.load_asmk_ivf(data, cb)
            except (KeyError, TypeError, ValueError) as err:
                raise InputError(f"reproduce_how: cannot read asmk's distractor IVF {path}: {err}") from None
        elif "vecs" in data and "imids" in data:
            index = jasmk.build_index(data["vecs"], data["imids"], codebook=cb, binary=params["binary"],
                                      use_idf=params["use_idf"], multiple_assignment=params["build_ma"])
        else:
            raise InputError(f"reproduce_how: {path} is neither asmk's IVF pickle nor features with 'vecs' and "
                             "'imids'")
    if index.n_words != cb.size or not np.array_equal(np.asarray(index.centroids), np.asarray(cb.centroids)):
        raise InputError(f"reproduce_how: the distractor index {path} was built with another codebook")
    if index.binary != params["binary"] or index.use_idf != params["use_idf"]:
        raise InputError(f"reproduce_how: the distractor index {path} has binary={index.binary}, "
                         f"use_idf={index.use_idf}; the parameters say {params['binary']}, {params['use_idf']}")
    print(f"distractors: {index.n_images} images from {path} in {time.perf_counter() - t:.0f}s")
    return index


def check_database_ids(imids, imlist, feats_path: str, gnd_path: str) -> int:
    """The database size ``len(imlist)`` after checking the features' database ids ``0..n-1`` against it."""
    ids = np.asarray(imids)
    n_db = len(imlist)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"reproduce_how: {feats_path}: 'imids' must be a non-empty 1-D integer array")
    if ids.min() < 0 or ids.max() >= n_db:
        raise InputError(f"reproduce_how: {feats_path} has database image ids in [{ids.min()}, {ids.max()}] but "
                         f"{gnd_path} lists {n_db} database images (imlist): features and ground truth of "
                         "different datasets?")
    have = np.unique(ids).size
    if have != n_db:
        raise InputError(f"reproduce_how: {feats_path} has descriptors for {have} database images but {gnd_path} "
                         f"lists {n_db} (imlist): features and ground truth of different datasets?")
    return n_db


def evaluate(dataset: str, feats_path: str, gnd_path: str, cb, params: dict, distractors=None) -> dict:
    """Index the database (after the distractors, if any), query it and evaluate: the three protocols' results
    (percent) and timings."""
    import jasmk
    from jasmk import evaluation as jeval

    desc = load_pickle(feats_path, ["vecs", "imids", "qvecs", "qimids"], "HOW features",
                       f"{FEATURES_URL}{os.path.basename(feats_path)}")
    gnd_all = load_pickle(gnd_path, ["gnd", "imlist"], "ground truth", f"{GND_URL}{dataset}/gnd_{dataset}.pkl")
    gnd = list(gnd_all["gnd"])
    n_db = check_database_ids(desc["imids"], gnd_all["imlist"], feats_path, gnd_path)
    n_query = int(np.unique(np.asarray(desc["qimids"])).size)
    if n_query != len(gnd):
        raise InputError(f"reproduce_how: {feats_path} has {n_query} query images but {gnd_path} has {len(gnd)} "
                         "queries (features and ground truth of different datasets?)")
    t = time.perf_counter()
    index = jasmk.build_index(desc["vecs"], desc["imids"], codebook=cb, binary=params["binary"],
                              use_idf=params["use_idf"], multiple_assignment=params["build_ma"],
                              distractors=distractors)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    res = jasmk.query(index, desc["qvecs"], desc["qimids"], multiple_assignment=params["query_ma"],
                      alpha=params["alpha"], similarity_threshold=params["similarity_threshold"], progress=True)
    t_query = time.perf_counter() - t
    ranks, n_distractors = res.ranks, index.imid_offset
    if n_distractors:  # asmk reports distractor d as d - n_distractors: put them after the database ids
        ranks = np.where(ranks < 0, ranks + n_distractors + n_db, ranks)
    out = jeval.evaluate_revisited(ranks, gnd, n_db=n_db + n_distractors, ks=(1, 5, 10))
    return {"dataset": dataset, "n_db": n_db, "n_distractors": n_distractors, "n_query": n_query,
            "seconds_index": t_index, "seconds_query": t_query,
            **{p: {"map": out[p]["map"], "mp@k": out[p]["mp@k"]} for p in ("easy", "medium", "hard")}}


def expected_map(dataset: str, feats_path: str, setup: Setup) -> float | None:
    """The seed table's Medium mAP for these features (named as published, without distractors), or None."""
    if os.path.basename(feats_path) == f"{dataset}_{setup.eval_features}.pkl":
        return EXPECTED.get(setup.name, {}).get(dataset)
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None,
                    help="asmk parameter set: eccv20_how_r18_1000 (default), eccv20_how_r50-_1000, "
                         "eccv20_how_r50-_2000, or a path to an asmk .yml file")
    ap.add_argument("--features", choices=sorted(n.removeprefix("eccv20_") for n in PARAM_FILES),
                    help="the same as --params eccv20_<FEATURES>")
    ap.add_argument("--data-root", help="folder in the asmk demo layout (features/, test/<dataset>/, experiments/)")
    ap.add_argument("--datasets", nargs="+", default=None, help="datasets used with --data-root (default: the "
                                                                "parameter set's, roxford5k rparis6k)")
    ap.add_argument("--codebook-features", help="pickle with 'vecs' for codebook training")
    ap.add_argument("--eval", nargs=3, action="append", metavar=("DATASET", "FEATURES", "GND"),
                    help="evaluate DATASET from its features and gnd pickles (repeatable)")
    ap.add_argument("--codebook-size", default=None, help="codebook size (default: the parameter set's, 64k)")
    ap.add_argument("--codebook", help="an existing Orbax codebook directory or asmk codebook.pkl to use; "
                                       "if it does not exist, the trained codebook is saved there")
    ap.add_argument("--distractors", help="R1M: asmk's distractor IVF pickle, a jasmk index folder, or features "
                                          "with 'vecs' and 'imids' (indexed first, as asmk's distractors_path)")
    ap.add_argument("--json", help="also write the results here as JSON")
    ap.add_argument("--verbose", action="store_true", help="print jasmk's info messages on stderr")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jasmk import configure_logging

    configure_logging(verbose=args.verbose, prefix="reproduce_how")
    if args.params and args.features:
        raise InputError("reproduce_how: give --params or --features, not both")
    setup = resolve_params(args.params or f"eccv20_{args.features or 'how_r18_1000'}", args.codebook_size)
    params = setup.params
    cb_path, evals = plan(args, setup)  # every file checked before hours of work start
    cb = get_codebook(args, cb_path, setup)
    distractors = get_distractors(args.distractors, cb, params) if args.distractors else None
    results = []
    for dataset, feats_path, gnd_path in evals:
        r = evaluate(dataset, feats_path, gnd_path, cb, params, distractors)
        results.append(r)
        maps = ", ".join(f"{p[0].upper()}: {r[p]['map']:.1f}" for p in ("easy", "medium", "hard"))
        mpk = ", ".join(f"{p[0].upper()}: " + "/".join(f"{v:.1f}" for v in r[p]["mp@k"].values())
                        for p in ("easy", "medium", "hard"))
        exp = None if distractors is not None else expected_map(dataset, feats_path, setup)
        ref = f" (seed table M: {exp})" if exp is not None else ""
        extra = f" +{r['n_distractors']} distractors" if r["n_distractors"] else ""
        print(f"{dataset}{extra}: mAP {maps}{ref}; mP@1/5/10 {mpk}; "
              f"index {r['seconds_index']:.0f}s, query {r['seconds_query']:.0f}s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"params": {"name": setup.name, "eval_features": setup.eval_features,
                                  "codebook_features": setup.codebook_features, **params},
                       "codebook": args.codebook or cb_path, "results": results}, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
