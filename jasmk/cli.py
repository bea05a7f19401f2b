"""``jasmk`` command line: codebook / index / query / score-matrix / pairs on .npy/.npz feature files.

Feature files: ``.npz`` with ``feats`` ``[N, D]`` and ``ids`` ``[N]`` (grouped, ascending), or a plain ``.npy``
``[N, D]`` for codebook training. Codebooks and indexes are Orbax checkpoint directories (an asmk codebook
``.pkl`` is accepted as ``--codebook`` too).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

log = logging.getLogger("jasmk")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _load_feats(path, *, need_ids: bool):
    if not os.path.exists(path):
        raise CliError(f"no such file: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    if isinstance(data, np.ndarray):
        if need_ids:
            raise CliError(f"{path} is a plain array: give an .npz with 'feats' and 'ids'")
        return data, None
    keys = set(data.files)
    if "feats" not in keys or (need_ids and "ids" not in keys):
        raise CliError(f"{path} must hold 'feats'{' and ids' if need_ids else ''} arrays, it has {sorted(keys)}")
    return data["feats"], (data["ids"] if "ids" in keys else None)


def _load_codebook(path):
    from . import checkpoint

    if path.endswith(".pkl"):
        return checkpoint.load_asmk_codebook(path)
    return checkpoint.load_codebook(path)


def _cmd_codebook(args):
    import jasmk
    from . import checkpoint

    feats, _ = _load_feats(args.feats, need_ids=False)
    cb = jasmk.train_codebook(feats, size=args.size, niter=args.niter, seed=args.seed)
    checkpoint.save_codebook(args.out, cb)
    log.info("codebook of %d words saved to %s", cb.size, args.out)


def _cmd_index(args):
    import jasmk
    from . import checkpoint

    feats, ids = _load_feats(args.feats, need_ids=True)
    index = jasmk.build_index(feats, ids, codebook=_load_codebook(args.codebook), binary=args.binary,
                              use_idf=args.use_idf, multiple_assignment=args.ma)
    checkpoint.save_index(args.out, index)
    log.info("index of %d images (%d entries) saved to %s", index.n_images, index.n_entries, args.out)


def _query_kwargs(args):
    return dict(multiple_assignment=args.ma, alpha=args.alpha, similarity_threshold=args.threshold,
                progress=not args.quiet)


def _cmd_query(args):
    import jasmk
    from . import checkpoint

    index = checkpoint.load_index(args.index)
    feats, ids = _load_feats(args.qfeats, need_ids=True)
    res = jasmk.query(index, feats, ids, topk=args.topk, **_query_kwargs(args))
    _atomic_save(args.out, lambda f: np.savez(f, ids=res.ids, ranks=res.ranks, scores=res.scores))
    log.info("ranks of %d queries saved to %s", len(res.ids), args.out)


def _cmd_score_matrix(args):
    import jasmk
    from . import checkpoint

    index = checkpoint.load_index(args.index)
    feats, ids = _load_feats(args.qfeats, need_ids=True)
    scores = jasmk.score_matrix(index, feats, ids, **_query_kwargs(args))
    _atomic_save(args.out, lambda f: np.save(f, scores))
    log.info("score matrix %s saved to %s", scores.shape, args.out)


def _cmd_pairs(args):
    from . import pairs

    if not os.path.exists(args.scores):
        raise CliError(f"no such file: {args.scores}")
    scores = np.load(args.scores, allow_pickle=False)
    na, k = pairs.parse_scene_graph(args.scene_graph)
    names = None
    if args.names:
        with open(args.names) as handle:
            names = [line.strip() for line in handle if line.strip()]
    p, keys = pairs.retrieval_pairs(scores, na=na, k=k, seed=args.seed)
    pairs.save_pairs(args.out, p, names=names)
    log.info("%d pairs (%d key images) saved to %s", len(p), len(keys), args.out)


def _atomic_save(path, write):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jasmk", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("codebook", help="train a codebook (faiss k-means)")
    p.add_argument("feats", help=".npy [N, D] or .npz with 'feats'")
    p.add_argument("--size", required=True, help="number of words: 1024, '64k', ...")
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.set_defaults(func=_cmd_codebook)

    p = sub.add_parser("index", help="build an inverted file")
    p.add_argument("feats", help=".npz with 'feats' [N, D] and 'ids' [N]")
    p.add_argument("--codebook", required=True, help="codebook checkpoint directory or asmk codebook .pkl")
    p.add_argument("--binary", action=argparse.BooleanOptionalAction, default=True, help="ASMK* (default) or ASMK")
    p.add_argument("--use-idf", action="store_true")
    p.add_argument("--ma", type=int, default=1, help="multiple assignment when indexing")
    p.add_argument("--out", required=True, help="index checkpoint directory")
    p.set_defaults(func=_cmd_index)

    for name, func, help_ in (("query", _cmd_query, "rank database images for each query image"),
                              ("score-matrix", _cmd_score_matrix, "dense [n_query, n_db] score matrix")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("index", help="index checkpoint directory")
        p.add_argument("qfeats", help=".npz with 'feats' and 'ids' of the query images")
        p.add_argument("--ma", type=int, default=5, help="multiple assignment for queries")
        p.add_argument("--alpha", type=float, default=3.0)
        p.add_argument("--threshold", type=float, default=0.0)
        if name == "query":
            p.add_argument("--topk", type=int, default=None)
        p.add_argument("--out", required=True, help=".npz (query: ids, ranks, scores) or .npy (score-matrix)")
        p.set_defaults(func=func)

    p = sub.add_parser("pairs", help="MASt3R-SfM image pairs from a score matrix")
    p.add_argument("scores", help=".npy [n, n] score matrix")
    p.add_argument("--scene-graph", default="retrieval-20-10", help="retrieval-Na-k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--names", default=None, help="text file with one image name per line")
    p.add_argument("--out", required=True, help=".txt ('i j' per line) or .npy [P, 2]")
    p.set_defaults(func=_cmd_pairs)
    return ap


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="jasmk: %(message)s")
    try:
        args.func(args)
    except (CliError, ValueError, OSError) as exc:
        parser.exit(2, f"jasmk: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
