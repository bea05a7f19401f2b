"""``jasmk`` command line: codebook / index / query / score-matrix / pairs on .npy/.npz feature files.

Feature files: ``.npz`` with ``feats`` ``[N, D]`` and ``ids`` ``[N]`` (grouped, ascending), or a plain ``.npy``
``[N, D]`` for codebook training. Codebooks and indexes are Orbax checkpoint directories (an asmk codebook
``.pkl`` is accepted as ``--codebook`` too). ``show`` draws PNGs of query results and score matrices.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
import zipfile

import jax
import numpy as np

import jasmk

from . import evaluation as jeval
from . import logs, pairs, show
from .logs import configure_logging as _configure_logging
from .storage import atomic, checkpoint, paths, safepickle

log = logging.getLogger("jasmk")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------------------------
# reading feature and score files (headers checked before anything is allocated)


def _read_npy_header(handle, where):
    """``(shape, dtype)`` from the ``.npy`` header at the start of ``handle``."""
    fmt = np.lib.format
    version = fmt.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(handle)
    else:
        raise CliError(f"{where}: unsupported .npy format version {version}")
    if dtype.hasobject:
        raise CliError(f"{where} holds Python objects (dtype {dtype}); only numeric arrays are read")
    return shape, dtype


def _check_claim(where, shape, dtype, available):
    claimed = math.prod(int(n) for n in shape) * dtype.itemsize
    if claimed > available:
        raise CliError(f"{where}: its header claims a {dtype} array of shape {tuple(shape)} ({claimed} bytes) "
                       f"but only {available} bytes follow: truncated or damaged file")


def _check_array_file(path):
    """Check the headers of a ``.npy`` or ``.npz`` file against the bytes it really holds."""
    size = os.path.getsize(path)
    if size == 0:
        raise CliError(f"cannot read {path}: the file is empty")
    with open(path, "rb") as handle:
        magic = handle.read(6)
        handle.seek(0)
        if magic == b"\x93NUMPY":
            shape, dtype = _read_npy_header(handle, path)
            _check_claim(path, shape, dtype, size - handle.tell())
            return
    if not zipfile.is_zipfile(path):
        raise CliError(f"cannot read {path}: not a .npy or .npz file")
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            where = f"{path}:{info.filename}"
            if info.compress_type == zipfile.ZIP_STORED and info.file_size > info.compress_size:
                raise CliError(f"{where}: the archive claims more bytes than it stores")
            with archive.open(info) as member:
                shape, dtype = _read_npy_header(member, where)
                _check_claim(where, shape, dtype, info.file_size - member.tell())


def _load_arrays(path, keys=None):
    """``(array, None)`` from a ``.npy``, or ``({name: array} for those of keys present, all names)`` from an
    ``.npz`` (all arrays if ``keys`` is None)."""
    if not path:
        raise CliError("an input path is empty")
    if not os.path.exists(path):
        raise CliError(f"no such file: {path}")
    if os.path.isdir(path):
        raise CliError(f"{path} is a directory, not a .npy/.npz file")
    try:
        _check_array_file(path)
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return data, None
        with data:
            names = list(data.files) if keys is None else [k for k in keys if k in data.files]
            return {k: data[k] for k in names}, list(data.files)
    except CliError:
        raise
    except MemoryError:
        raise CliError(f"cannot read {path}: out of memory") from None
    except Exception as exc:  # OSError, ValueError, EOFError, zipfile.BadZipFile, ...
        raise CliError(f"cannot read {path}: {exc}") from None


def _load_feats(path, *, need_ids: bool):
    data, files = _load_arrays(path, keys=("feats", "ids"))
    if files is None:
        if need_ids:
            raise CliError(f"{path} is a plain array: give an .npz with 'feats' and 'ids'")
        return data, None
    keys = set(files)
    if "feats" not in keys or (need_ids and "ids" not in keys):
        raise CliError(f"{path} must hold 'feats'{' and ids' if need_ids else ''} arrays, it has {sorted(keys)}")
    return data["feats"], data.get("ids")


def _load_codebook(path):
    if path.endswith(".pkl"):
        return checkpoint.load_asmk_codebook(path)  # restricted unpickler: never runs code
    return checkpoint.load_codebook(path)


# ---------------------------------------------------------------------------------------------------------
# output checks (before any work) and atomic writes


def _same_path(a, b) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path, folder) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_not_input(out, inputs):
    for inp in inputs:
        if inp and os.path.exists(inp) and _same_path(out, inp):
            raise CliError(f"refusing to write --out {out}: it is an input of this command")


def _check_parent(out, flag="--out"):
    """The folder ``out`` goes into must exist: the CLI never creates folders the user did not name."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CliError(f"{flag} {out}: the folder {parent} does not exist (create it first)")


def _check_out_checkpoint(out, *, kind, inputs):
    """Fail before any work if the checkpoint ``out`` would replace an input or anything not of ``kind``."""
    if not out:
        raise CliError("--out is empty")
    _check_parent(out)
    _check_not_input(out, inputs)
    for inp in inputs:
        if inp and os.path.exists(inp) and _inside(inp, out):
            raise CliError(f"refusing to write --out {out}: the input {inp} lies inside it")
    checkpoint.check_save_target(out, kind=kind)


def _check_out_file(out, *, inputs, suffixes, what, flag="--out"):
    """Fail before any work if the file ``out`` would replace an input, a directory or part of a checkpoint, if
    its extension is not one of ``suffixes`` (what is written: ``what``), or if its folder does not exist."""
    if not out:
        raise CliError(f"{flag} is empty")
    if not out.lower().endswith(tuple(suffixes)):
        raise CliError(f"{flag} {out}: this command writes {what}; name the file with "
                       f"{' or '.join(suffixes)}")
    _check_parent(out, flag)
    _check_not_input(out, inputs)
    paths.check_file_target(out, name=flag)


# ---------------------------------------------------------------------------------------------------------
# commands


def _cmd_codebook(args):
    _check_out_checkpoint(args.out, kind="codebook", inputs=[args.feats])
    feats, _ = _load_feats(args.feats, need_ids=False)
    cb = jasmk.train_codebook(feats, size=args.size, niter=args.niter, seed=args.seed)
    checkpoint.save_codebook(args.out, cb)
    log.info("codebook of %d words saved to %s", cb.size, args.out)


def _cmd_index(args):
    _check_out_checkpoint(args.out, kind="index", inputs=[args.feats, args.codebook])
    feats, ids = _load_feats(args.feats, need_ids=True)
    index = jasmk.build_index(feats, ids, codebook=_load_codebook(args.codebook), binary=args.binary,
                              use_idf=args.use_idf, multiple_assignment=args.ma)
    checkpoint.save_index(args.out, index)
    log.info("index of %d images (%d entries) saved to %s", index.n_images, index.n_entries, args.out)


def _query_kwargs(args):
    return dict(multiple_assignment=args.ma, alpha=args.alpha, similarity_threshold=args.threshold,
                progress=not args.quiet)


def _cmd_query(args):
    _check_out_file(args.out, inputs=[args.index, args.qfeats], suffixes=(".npz",),
                    what="a .npz archive (ids, ranks, scores)")
    index = checkpoint.load_index(args.index)
    feats, ids = _load_feats(args.qfeats, need_ids=True)
    res = jasmk.query(index, feats, ids, topk=args.topk, **_query_kwargs(args))
    atomic.write_bytes_with(args.out, lambda f: np.savez(f, ids=res.ids, ranks=res.ranks, scores=res.scores))
    log.info("ranks of %d queries saved to %s", len(res.ids), args.out)


def _cmd_score_matrix(args):
    _check_out_file(args.out, inputs=[args.index, args.qfeats], suffixes=(".npy",), what="a .npy array")
    index = checkpoint.load_index(args.index)
    feats, ids = _load_feats(args.qfeats, need_ids=True)
    scores = jasmk.score_matrix(index, feats, ids, **_query_kwargs(args))
    atomic.write_bytes_with(args.out, lambda f: np.save(f, scores))
    log.info("score matrix %s saved to %s", scores.shape, args.out)


def _cmd_pairs(args):
    source = args.scores if args.scores is not None else args.index
    if (args.scores is None) == (args.index is None):
        raise CliError("give either a score matrix (SCORES) or --index with --feats, not both")
    if args.index is not None and args.feats is None:
        raise CliError("--index needs --feats: the .npz with 'feats' and 'ids' of the indexed images")
    _check_out_file(args.out, inputs=[source, args.names, args.feats], suffixes=(".txt", ".npy"),
                    what="a .txt list of pairs or a .npy [P, 2] array")
    na, k = pairs.parse_scene_graph(args.scene_graph)
    names = None
    if args.names:
        with open(args.names) as handle:
            names = [line.strip() for line in handle if line.strip()]
    if args.scores is not None:
        scores, files = _load_arrays(args.scores, keys=())
        if files is not None:
            raise CliError(f"{args.scores} must be a .npy score matrix, not an .npz")
        p, keys = pairs.retrieval_pairs(scores, na=na, k=k, seed=args.seed)
    else:  # straight from the index: no n x n matrix (O(n (Na + k)) memory)
        index = checkpoint.load_index(args.index)
        feats, ids = _load_feats(args.feats, need_ids=True)
        rows = jasmk.aggregate_images(jasmk.Codebook(index.centroids, index.codebook_size_param), feats, ids,
                                      binary=index.binary, multiple_assignment=args.ma)
        p, keys = pairs.retrieval_pairs_from_index(index, rows, na=na, k=k, seed=args.seed, alpha=args.alpha,
                                                   similarity_threshold=args.threshold, progress=not args.quiet)
    pairs.save_pairs(args.out, p, names=names)  # atomic itself (jasmk.storage.atomic); the path was checked above
    log.info("%d pairs (%d key images) saved to %s", len(p), len(keys), args.out)


def _read_list(path, what):
    """Lines of the text file ``path`` (blank lines skipped); relative paths are taken from its folder."""
    if not os.path.isfile(path):
        raise CliError(f"no such {what} file: {path}")
    with open(path) as handle:
        lines = [line.strip() for line in handle if line.strip()]
    if not lines:
        raise CliError(f"{path} lists no {what}")
    folder = os.path.dirname(os.path.abspath(path))
    return [line if os.path.isabs(line) else os.path.join(folder, line) for line in lines]


def _read_gnd(path):
    """Revisited ground truth: a .json list of {easy, hard, junk} dicts (or {"gnd": [...]}), or a gnd .pkl."""
    if not os.path.isfile(path):
        raise CliError(f"no such ground-truth file: {path}")
    if path.endswith(".pkl"):
        data = safepickle.load(path)  # restricted unpickler: never runs code
    else:
        try:
            with open(path) as handle:
                data = json.load(handle)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {path}: not JSON ({exc}); give a .json or a revisited gnd .pkl") from None
    if isinstance(data, dict) and "gnd" in data:
        data = data["gnd"]
    if not isinstance(data, (list, tuple)) or not all(isinstance(g, dict) for g in data):
        raise CliError(f"{path} must hold a list of dicts with 'easy', 'hard' and 'junk' id lists")
    return list(data)


def _cmd_show(args):
    if not args.grid and not args.heatmap:
        raise CliError("give --grid PNG (results grid) and/or --heatmap PNG (score matrix heat map)")
    inputs = [args.results, args.images, args.query_images, args.gnd]
    for out, flag in ((args.grid, "--grid"), (args.heatmap, "--heatmap")):
        if not out:
            continue
        _check_out_file(out, inputs=inputs, suffixes=(".png",), what="a PNG picture", flag=flag)
        show.check_out_path(out)
    if args.grid and args.heatmap and _same_path(args.grid, args.heatmap):
        raise CliError("--grid and --heatmap name the same file")
    data, files = _load_arrays(args.results)
    if files is None:
        scores = np.asarray(data)
        if scores.ndim != 2:
            raise CliError(f"{args.results} must be an [n_query, n_db] score matrix, got shape {scores.shape}")
        qids, ranks = np.arange(scores.shape[0]), jeval.ranks_from_scores(scores)
        scores_ranked = np.take_along_axis(scores, ranks, axis=1)
    else:
        if "ranks" not in data:
            raise CliError(f"{args.results} must hold 'ranks' (as 'jasmk query' writes), it has {sorted(files)}")
        ranks = np.asarray(data["ranks"])
        qids = np.asarray(data.get("ids", np.arange(len(ranks))))
        scores_ranked = data.get("scores")
        scores = None
        if ranks.ndim != 2 or qids.shape != (ranks.shape[0],):
            raise CliError(f"{args.results}: ranks must be [n_query, k] with one id per row, got ranks "
                           f"{ranks.shape} and ids {qids.shape}")
    if args.heatmap:
        if scores is None:
            raise CliError("--heatmap needs a score matrix (.npy from 'jasmk score-matrix'), not query results")
        images = _read_list(args.images, "image") if args.images else None
        if images is not None and len(images) != scores.shape[1]:
            raise CliError(f"{args.images} lists {len(images)} images but the score matrix has {scores.shape[1]} "
                           "database columns")
        names = [os.path.basename(p) for p in images] if images else None
        show.score_heatmap(scores, args.heatmap, col_names=names,
                           row_names=names if names and scores.shape[0] == len(names) else None)
        log.info("score heat map saved to %s", args.heatmap)
    if args.grid:
        if not args.images:
            raise CliError("--grid needs --images (one database image path per line, in database id order)")
        images = _read_list(args.images, "image")
        if args.query_images:
            queries = _read_list(args.query_images, "query image")
            if len(queries) != len(ranks):
                raise CliError(f"{args.query_images} lists {len(queries)} images but there are {len(ranks)} queries")
        else:  # the queries are database images: query id i is line i of --images
            if qids.size and (qids.min() < 0 or qids.max() >= len(images)):
                raise CliError(f"query ids reach {int(qids.max())} but {args.images} lists {len(images)} images: "
                               "give --query-images")
            queries = [images[int(i)] for i in qids]
        if scores is not None and len(images) != scores.shape[1]:
            raise CliError(f"{args.images} lists {len(images)} images but the score matrix has {scores.shape[1]} "
                           "database columns")
        gnd = _read_gnd(args.gnd) if args.gnd else None
        if gnd is not None and len(gnd) != len(ranks):
            raise CliError(f"{args.gnd} holds {len(gnd)} queries but the results have {len(ranks)}")
        if args.max_queries < 1 or args.topk < 1:
            raise CliError("--max-queries and --topk must be >= 1")
        show.results_grid(queries, images, ranks, args.grid, gnd=gnd, protocol=args.protocol, scores=scores_ranked,
                          topk=args.topk, rows=list(range(min(args.max_queries, len(ranks)))),
                          query_names=[os.path.basename(p) for p in queries],
                          db_names=[os.path.basename(p) for p in images])
        log.info("results of %d queries saved to %s", min(args.max_queries, len(ranks)), args.grid)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jasmk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    talk = ap.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_true", help="no progress bars")
    talk.add_argument("--verbose", action="store_true", help="also print jasmk's info messages (on stderr)")
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

    p = sub.add_parser("pairs", help="MASt3R-SfM image pairs from a score matrix, or straight from an index")
    p.add_argument("scores", nargs="?", default=None, help=".npy [n, n] score matrix (or use --index/--feats)")
    p.add_argument("--index", default=None, help="index checkpoint: pairs without the n x n matrix")
    p.add_argument("--feats", default=None, help="with --index: .npz with 'feats' and 'ids' of the indexed images")
    p.add_argument("--ma", type=int, default=5, help="with --index: multiple assignment of the query side")
    p.add_argument("--alpha", type=float, default=3.0)
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--scene-graph", default="retrieval-20-10", help="retrieval-Na-k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--names", default=None, help="text file with one image name per line")
    p.add_argument("--out", required=True, help=".txt ('i j' per line) or .npy [P, 2]")
    p.set_defaults(func=_cmd_pairs)

    p = sub.add_parser("show", help="PNG pictures: queries with their top results, score matrix heat map")
    p.add_argument("results", help=".npz from 'jasmk query' (ids, ranks, scores) or .npy from 'jasmk score-matrix'")
    p.add_argument("--images", default=None, help="text file: one database image path per line, in id order "
                   "(relative paths are read from the file's folder)")
    p.add_argument("--query-images", default=None, help="text file: one query image per query row (default: the "
                   "queries are database images, query id i is line i of --images)")
    p.add_argument("--gnd", default=None, help="ground truth marking the results: .json list of {easy, hard, junk} "
                   "dicts (or {\"gnd\": [...]}) or a revisited gnd_*.pkl")
    p.add_argument("--protocol", choices=("easy", "medium", "hard"), default="medium",
                   help="revisited protocol of the marking: green positive, red wrong, yellow junk")
    p.add_argument("--topk", type=int, default=5, help="results per query in the grid")
    p.add_argument("--max-queries", type=int, default=8, help="query rows in the grid (the first ones)")
    p.add_argument("--grid", default=None, help="results grid .png (needs --images)")
    p.add_argument("--heatmap", default=None, help="score matrix heat map .png (score matrix input only)")
    p.set_defaults(func=_cmd_show)
    return ap


def _persistent_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk between CLI runs (``JAX_COMPILATION_CACHE_DIR`` wins; default
    ``~/.cache/jasmk/xla``), so that each run does not compile the same kernels again; ``JASMK_XLA_CACHE=0``
    turns it off (the tests do: they call the CLI inside their own process and count compilations)."""
    if os.environ.get("JASMK_XLA_CACHE", "1") == "0":
        return
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jasmk", "xla")
    try:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # loading beats compiling, even small
    except Exception as exc:  # an old jax without these options: run without the cache
        log.debug("no persistent compilation cache: %s", exc)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(verbose=args.verbose)
    _persistent_compilation_cache()
    try:
        args.func(args)
    except (CliError, ValueError, OSError) as exc:
        log.debug("failed", exc_info=True)
        parser.exit(2, f"jasmk: error: {exc}\n")
    except MemoryError as exc:
        log.debug("failed", exc_info=True)
        parser.exit(2, f"jasmk: error: out of memory{f': {exc}' if str(exc) else ''}\n")
    except Exception as exc:  # anything else is still reported as one line, never a traceback
        log.debug("failed", exc_info=True)
        parser.exit(2, f"jasmk: error: {type(exc).__name__}: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def __getattr__(name):
    if name in ("configure_logging", "THIRD_PARTY_LEVELS"):
        warnings.warn(f"jasmk.cli.{name} moved to jasmk.logs.{name} (also jasmk.{name} for configure_logging); "
                      "the old path works until jasmk 0.3", DeprecationWarning, stacklevel=2)
        return getattr(logs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["CliError", "build_parser", "main"]
