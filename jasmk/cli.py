"""The ``jasmk`` command line: codebook, index, add, query, score-matrix, pairs, info and show, on hloc's
``features.h5`` or ``.npy`` / ``.npz`` feature files (see :data:`DESCRIPTION`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import typing
import warnings
import zipfile

import jax
import numpy as np

import jasmk

from . import api, logs, pairs, show
from . import evaluation as jeval
from .core import presets
from .logs import configure_logging as _configure_logging
from .storage import asmk_format, atomic, checkpoint, hloc, paths, safepickle

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


# ---------------------------------------------------------------------------------------------------------
# inputs: .npz / .npy feature files and hloc's features.h5


class Features(typing.NamedTuple):
    """Descriptors read from an input file: ``feats [N, D]``, ``ids [N]`` (None for a plain ``.npy``) and the
    image names (hloc's, or an ``.npz``'s ``names``; None without)."""

    feats: np.ndarray
    ids: np.ndarray | None
    names: list | None


def _read_features(path, *, need_ids: bool, prefix=None, image_list=None, first_id: int = 0) -> Features:
    """Features from ``path``: hloc's ``features.h5`` (images chosen by ``prefix`` / ``image_list``, numbered from
    ``first_id``), an ``.npz`` with ``feats``, ``ids`` and optionally ``names``, or a plain ``.npy``."""
    if path and os.path.isfile(path) and hloc.is_hdf5(path):
        names = hloc.read_image_list(image_list) if image_list else None
        got = hloc.read_features(path, prefix=prefix, names=names, first_id=first_id)
        return Features(got.feats, got.ids, got.names)
    if prefix is not None or image_list is not None:
        raise CliError(f"--prefix / --list select images of an hloc features.h5; {path} is not one")
    data, files = _load_arrays(path, keys=("feats", "ids", "names"))
    if files is None:
        if need_ids:
            raise CliError(f"{path} is a plain array: give an .npz with 'feats' and 'ids' (or hloc's features.h5)")
        return Features(data, None, None)
    keys = set(files)
    if "feats" not in keys or (need_ids and "ids" not in keys):
        raise CliError(f"{path} must hold 'feats'{' and ids' if need_ids else ''} arrays, it has {sorted(keys)}")
    names = None
    if "names" in data:
        raw = np.asarray(data["names"])
        if raw.dtype.kind != "U" or raw.ndim != 1:
            raise CliError(f"{path}: 'names' must be a 1-D array of strings (one per image), got {raw.dtype} "
                           f"{raw.shape}")
        names = raw.tolist()
    return Features(data["feats"], data.get("ids"), names)


def _load_codebook(path):
    if not path:
        raise CliError("--codebook is empty")
    if not os.path.exists(path):
        raise CliError(f"no such codebook: {path}")
    return api.as_codebook(path)  # a codebook or index checkpoint, or asmk's codebook .pkl (never unpickled blindly)


def _load_index(path):
    if not os.path.exists(path):
        raise CliError(f"no such index: {path}")
    return checkpoint.load_index(path)


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

say = logging.getLogger("jasmk.cli")  # the one line a successful command prints (--quiet silences it)


def _index_summary(index) -> str:
    kind = "ASMK*" if index.binary else "ASMK"
    named = ", named" if index.names is not None else ""
    return (f"{index.n_images} images, {index.n_entries} postings, {index.n_words} words, {kind}"
            f"{', idf' if index.use_idf else ''}{named}")


def _cmd_codebook(args):
    _check_out_checkpoint(args.out, kind="codebook", inputs=[args.feats])
    got = _read_features(args.feats, need_ids=False, prefix=args.prefix, image_list=args.list)
    cb = jasmk.train_codebook(got.feats, size=args.size, niter=args.niter, seed=args.seed, progress=not args.quiet)
    checkpoint.save_codebook(args.out, cb)
    say.info("wrote %s (codebook: %d words, %d-d, trained on %d descriptors)", args.out, cb.size, cb.dim,
             len(got.feats))


def _cmd_index(args):
    _check_out_checkpoint(args.out, kind="index", inputs=[args.feats, args.codebook])
    codebook = _load_codebook(args.codebook)
    got = _read_features(args.feats, need_ids=True, prefix=args.prefix, image_list=args.list)
    preset = presets.get(args.preset)
    index = jasmk.build_index(_feats_for(args, got.feats), got.ids, codebook=codebook,
                              binary=_or(args.binary, preset.binary), use_idf=_or(args.use_idf, preset.use_idf),
                              multiple_assignment=_or(args.ma, preset.index_multiple_assignment), names=got.names)
    checkpoint.save_index(args.out, index)
    say.info("wrote %s (index: %s)", args.out, _index_summary(index))


def _cmd_add(args):
    out = args.out or args.index
    if not _same_path(out, args.index):
        _check_out_checkpoint(out, kind="index", inputs=[args.index, args.feats])
    index = _load_index(args.index)
    before = index.n_images
    got = _read_features(args.feats, need_ids=True, prefix=args.prefix, image_list=args.list,
                         first_id=index.next_name - index.imid_offset)
    index = jasmk.add_images(index, _feats_for(args, got.feats), got.ids, names=got.names,
                             multiple_assignment=_or(args.ma, presets.get(args.preset).index_multiple_assignment))
    checkpoint.save_index(out, index)  # over the index itself: an incremental save of what changed
    say.info("wrote %s (index: %s; %d added)", out, _index_summary(index), index.n_images - before)


def _query_kwargs(args):
    preset = presets.get(args.preset)
    return dict(multiple_assignment=_or(args.ma, preset.query_multiple_assignment), alpha=_or(args.alpha, preset.alpha),
                similarity_threshold=_or(args.threshold, preset.similarity_threshold), progress=not args.quiet)


def _or(value, default):
    return default if value is None else value


def _feats_for(args, feats):
    """Descriptors as the preset takes them (``sift``: RootSIFT from raw SIFT, never twice)."""
    mode = presets.get(args.preset).rootsift
    return presets.sift_input(feats, mode=mode) if mode else feats


def _names_arrays(index, got: Features) -> dict:
    """The name arrays written next to results: query names and the database's ids and names."""
    out = {}
    if got.names is not None:
        out["query_names"] = np.asarray(got.names, dtype=str)
    if index.names is not None:
        out["db_ids"] = index.image_ids
        out["db_names"] = np.asarray(index.names.tolist(), dtype=str)
    return out


def _cmd_query(args):
    _check_out_file(args.out, inputs=[args.index, args.qfeats], suffixes=(".npz",),
                    what="a .npz archive (ids, ranks, scores)")
    index = _load_index(args.index)
    got = _read_features(args.qfeats, need_ids=True, prefix=args.prefix, image_list=args.list)
    res = jasmk.query(index, _feats_for(args, got.feats), got.ids, topk=args.topk, **_query_kwargs(args))
    arrays = dict(ids=res.ids, ranks=res.ranks, scores=res.scores, **_names_arrays(index, got))
    atomic.write_bytes_with(args.out, lambda f: np.savez(f, **arrays))
    say.info("wrote %s (ranks of %d queries, top %d of %d images)", args.out, len(res.ids), res.ranks.shape[1],
             index.n_images)


def _cmd_score_matrix(args):
    _check_out_file(args.out, inputs=[args.index, args.qfeats], suffixes=(".npy", ".npz"),
                    what="a .npy array, or an .npz with the scores and the row and column ids (and names)")
    index = _load_index(args.index)
    got = _read_features(args.qfeats, need_ids=True, prefix=args.prefix, image_list=args.list)
    scores = jasmk.score_matrix(index, _feats_for(args, got.feats), got.ids, **_query_kwargs(args))
    if args.out.lower().endswith(".npz"):
        arrays = {"scores": scores, "query_ids": np.unique(np.asarray(got.ids, np.int64)),
                  "db_ids": index.image_ids, **_names_arrays(index, got)}
        atomic.write_bytes_with(args.out, lambda f: np.savez(f, **arrays))
    else:
        atomic.write_bytes_with(args.out, lambda f: np.save(f, scores))
    say.info("wrote %s (scores of %d queries x %d images)", args.out, *scores.shape)


def _read_names_file(path, n, what):
    if path is None:
        return None
    names = hloc.read_image_list(path)
    if len(names) != n:
        raise CliError(f"{path} lists {len(names)} {what} names, expected {n} (one per line)")
    return names


def _pairs_from_results(args):
    """``(pairs, what)`` of top-k query → database pairs from a score matrix (.npy / .npz) or query results."""
    data, files = _load_arrays(args.scores)
    if files is None:
        scores = np.asarray(data)
        if scores.ndim != 2:
            raise CliError(f"{args.scores} must be an [n_query, n_db] score matrix, got shape {scores.shape}")
        data = {"scores": scores}
    if "ranks" in data:  # jasmk query's results: ranks are database ids, best first
        ranks = np.asarray(data["ranks"])
        qids = np.asarray(data.get("ids", np.arange(len(ranks))))
        n_db = None
    elif "scores" in data:
        scores = np.asarray(data["scores"])
        qids = np.asarray(data.get("query_ids", np.arange(scores.shape[0])))
        n_db = scores.shape[1]
    else:
        raise CliError(f"{args.scores} holds neither 'scores' nor 'ranks' (it has {sorted(files)})")
    db_ids = np.asarray(data["db_ids"]) if "db_ids" in data else None
    shared = hloc.read_image_list(args.names) if args.names else None  # line i names image id i
    qnames = data["query_names"].tolist() if "query_names" in data else (
        _read_names_file(args.query_names, len(qids), "query") if args.query_names else None)
    dnames = data["db_names"].tolist() if "db_names" in data else (
        hloc.read_image_list(args.db_names) if args.db_names else shared)
    if qnames is None and shared is not None:  # the queries are images of the same collection
        if qids.size and (qids.min() < 0 or qids.max() >= len(shared)):
            raise CliError(f"query ids reach {int(qids.max())} but {args.names} lists {len(shared)} names: give "
                           "--query-names")
        qnames = [shared[int(i)] for i in qids]
    if qnames is None:
        qnames = [str(int(i)) for i in qids]
    if n_db is not None and dnames is not None and len(dnames) != n_db:
        raise CliError(f"{len(dnames)} database names for a score matrix of {n_db} columns")
    if n_db is not None:  # a score matrix
        if dnames is None:
            dnames = [str(int(i)) for i in (db_ids if db_ids is not None else np.arange(n_db))]
        return pairs.topk_pairs(scores, args.topk, query_names=qnames, db_names=dnames)
    # ranks: map database ids to names through db_ids (or the names file's line = id)
    out = []
    for qname, row in zip(qnames, ranks):
        if dnames is None:
            names = [str(int(j)) for j in row]
        elif db_ids is not None:
            names = [dnames[int(j)] for j in np.searchsorted(db_ids, row)]
        else:
            if row.size and (row.min() < 0 or row.max() >= len(dnames)):
                raise CliError(f"the results rank database id {int(row.max())} but the names list {len(dnames)}")
            names = [dnames[int(j)] for j in row]
        out.extend((qname, n) for n in [n for n in names if n != qname][:args.topk])
    return out


def _cmd_pairs(args):
    if (args.scores is None) == (args.index is None):
        raise CliError("give either a score matrix or query results (SCORES), or --index, not both")
    source = args.scores if args.scores is not None else args.index
    if args.index is not None and (args.feats is None) == (args.queries is None):
        raise CliError("--index needs --queries (query -> database pairs with --topk) or --feats (the indexed "
                       "images, for the MASt3R-SfM scene graph)")
    _check_out_file(args.out, inputs=[source, args.names, args.feats, args.queries, args.query_names,
                                      args.db_names], suffixes=(".txt", ".npy"),
                    what="a .txt list of pairs or a .npy [P, 2] array")
    topk_mode = args.topk is not None or args.queries is not None
    if topk_mode:
        if args.topk is None:
            raise CliError("--queries needs --topk K: the database images to pair with each query")
        if args.out.lower().endswith(".npy"):
            raise CliError("query -> database pairs are written as a text pairs file (.txt), hloc's format")
        if args.queries is not None:
            index = _load_index(args.index)
            got = _read_features(args.queries, need_ids=True, prefix=args.prefix, image_list=args.list)
            qnames = got.names if got.names is not None else [str(int(i)) for i in np.unique(got.ids)]
            result = pairs.query_pairs(index, _feats_for(args, got.feats), got.ids, args.topk, query_names=qnames,
                                       **_query_kwargs(args))
        else:
            result = _pairs_from_results(args)
        hloc.write_pairs(args.out, result)
        say.info("wrote %s (%d pairs, %d queries x top %d)", args.out, len(result), len({q for q, _ in result}),
                 args.topk)
        return
    na, k = pairs.parse_scene_graph(args.scene_graph)
    names = None
    if args.names:
        with open(args.names) as handle:
            names = [line.strip() for line in handle if line.strip()]
    if args.scores is not None:
        scores, files = _load_arrays(args.scores, keys=("scores",))
        if files is not None:
            if "scores" not in scores:
                raise CliError(f"{args.scores} holds no 'scores' (query results: give --topk K for pairs)")
            scores = scores["scores"]
        if scores.ndim == 2 and scores.shape[0] != scores.shape[1]:
            raise CliError(f"the score matrix is {scores.shape[0]} x {scores.shape[1]}, not square: give --topk K "
                           "for query -> database pairs (the MASt3R-SfM scene graph needs one image set on both "
                           "sides)")
        p, keys = pairs.retrieval_pairs(scores, na=na, k=k, seed=args.seed)
    else:  # straight from the index: no n x n matrix (O(n (Na + k)) memory)
        index = _load_index(args.index)
        got = _read_features(args.feats, need_ids=True, prefix=args.prefix, image_list=args.list)
        kw = _query_kwargs(args)
        rows = jasmk.aggregate_images(jasmk.Codebook(index.centroids, index.codebook_size_param),
                                      _feats_for(args, got.feats), got.ids, binary=index.binary,
                                      multiple_assignment=kw["multiple_assignment"])
        p, keys = pairs.retrieval_pairs_from_index(index, rows, na=na, k=k, seed=args.seed, alpha=kw["alpha"],
                                                   similarity_threshold=kw["similarity_threshold"],
                                                   progress=not args.quiet)
        if names is None and index.names is not None:
            names = index.names.tolist()
    pairs.save_pairs(args.out, p, names=names)  # atomic itself (jasmk.storage.atomic); the path was checked above
    say.info("wrote %s (%d pairs, %d key images)", args.out, len(p), len(keys))


def _info(path) -> dict:
    """What the file or checkpoint at ``path`` holds, as an ordered dict of plain values."""
    if not os.path.exists(path):
        raise CliError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        kind = checkpoint.checkpoint_kind(path)
        if kind == "index":
            index = checkpoint.load_index(path)
            stats = index.stats()
            out = {"kind": "index", "path": path, "images": index.n_images, "postings": index.n_entries,
                   "segments": len(index.segments), "words": index.n_words, "dim": index.dim,
                   "codebook size": index.codebook_size_param,
                   "kernel": ("ASMK* (binary)" if index.binary else "ASMK (real)"), "idf": index.use_idf,
                   "postings per image": round(float(stats["vectors_per_image"]), 2),
                   "empty words": stats["empty_vw"], "longest posting list": stats["max_entries_per_vw"]}
            if index.n_images:
                ids = index.image_ids
                out["ids"] = f"{int(ids[0])}..{int(ids[-1])}" + (" (with gaps)" if index.ids is not None else "")
                out["next free id"] = index.next_name - index.imid_offset
            if index.imid_offset:
                out["distractors"] = index.imid_offset
            if index.names is not None:
                names = index.names.tolist()
                out["names"] = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
            return out
        if kind == "codebook":
            cb = checkpoint.load_codebook(path)
            return {"kind": "codebook", "path": path, "words": cb.size, "dim": cb.dim, "size parameter": cb.size_param}
        if kind is not None:
            return {"kind": kind, "path": path}
        raise CliError(f"{path} is a folder that holds no jasmk checkpoint")
    if asmk_format.is_pickle(path):
        cb = asmk_format.load_asmk_codebook(path)
        return {"kind": "asmk codebook (.pkl)", "path": path, "words": cb.size, "dim": cb.dim}
    if hloc.is_hdf5(path):
        got = hloc.summarize(path)  # metadata only: no descriptor is read
        names = got.names
        return {"kind": "hloc features (.h5)", "path": path, "images": int(np.count_nonzero(got.counts)),
                "descriptors": int(got.counts.sum()), "dim": got.dim, "dtype": got.dtype,
                "without descriptors": int(np.count_nonzero(got.counts == 0)),
                "names": ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")}
    data, files = _load_arrays(path)
    if files is None:
        return {"kind": ".npy array", "path": path, "shape": list(data.shape), "dtype": str(data.dtype)}
    return {"kind": ".npz archive", "path": path, **{k: f"{v.dtype} {list(v.shape)}" for k, v in data.items()}}


def _cmd_info(args):
    info = _info(args.path)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=1, default=str) + "\n")
    else:
        width = max(len(k) for k in info)
        sys.stdout.write("".join(f"{k + ':':<{width + 1}} {v}\n" for k, v in info.items()))


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
    inputs = [args.results, args.images, args.query_images, args.gnd, args.image_dir]
    for out, flag in ((args.grid, "--grid"), (args.heatmap, "--heatmap")):
        if not out:
            continue
        _check_out_file(out, inputs=inputs, suffixes=(".png",), what="a PNG picture", flag=flag)
        show.check_out_path(out)
    if args.grid and args.heatmap and _same_path(args.grid, args.heatmap):
        raise CliError("--grid and --heatmap name the same file")
    data, files = _load_arrays(args.results)
    archive = data if files is not None else {}  # names and ids written beside named results
    if files is not None and "ranks" not in data and "scores" in data:  # jasmk score-matrix's .npz
        data, files = np.asarray(data["scores"]), None
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
    if args.image_dir is not None:  # images named as the index names them (hloc: paths relative to the image folder)
        if args.images or args.query_images:
            raise CliError("give --image-dir or --images / --query-images, not both")
        if "db_names" not in archive:
            raise CliError(f"--image-dir needs the results of a named index (built from hloc's features.h5 or with "
                           f"names): {args.results} holds no db_names; give --images instead")
        db_names = archive["db_names"].tolist()
        images = [os.path.join(args.image_dir, n) for n in db_names]
        if files is not None and "db_ids" in archive:  # query results rank database ids: columns of db_names
            ranks = np.searchsorted(np.asarray(archive["db_ids"]), ranks)
        queries = ([os.path.join(args.image_dir, n) for n in archive["query_names"].tolist()]
                   if "query_names" in archive else None)
    else:
        images = _read_list(args.images, "image") if args.images else None
        queries = _read_list(args.query_images, "query image") if args.query_images else None
    if args.heatmap:
        if scores is None:
            raise CliError("--heatmap needs a score matrix (.npy from 'jasmk score-matrix'), not query results")
        if images is not None and len(images) != scores.shape[1]:
            raise CliError(f"{args.images} lists {len(images)} images but the score matrix has {scores.shape[1]} "
                           "database columns")
        names = [os.path.basename(p) for p in images] if images else None
        show.score_heatmap(scores, args.heatmap, scale=args.scale, col_names=names,
                           row_names=names if names and scores.shape[0] == len(names) else None)
        say.info("wrote %s (heat map of %d x %d scores, %s scale)", args.heatmap, *scores.shape, args.scale)
    if args.grid:
        if images is None:
            raise CliError("--grid needs --images (one database image path per line, in database id order) or, "
                           "for a named index, --image-dir")
        if queries is not None:
            if len(queries) != len(ranks):
                raise CliError(f"{len(queries)} query images but there are {len(ranks)} queries")
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
        say.info("wrote %s (results of %d queries)", args.grid, min(args.max_queries, len(ranks)))


DESCRIPTION = """\
ASMK image retrieval: train a codebook, build and grow an index, query it, make image pairs.

Feature files: hloc's features.h5 (descriptors [D, N] per image group; --prefix or --list pick the images),
an .npz with 'feats' [N, D], 'ids' [N] (grouped, ascending) and optionally 'names', or a plain .npy [N, D]
for codebook training. Codebooks and indexes are checkpoint folders; an asmk codebook .pkl is accepted as
--codebook too. 'jasmk COMMAND --help' shows each command's options and defaults.
"""

EPILOG = """\
examples:
  jasmk codebook train.npy --size 1024 --out cb
  jasmk index features.h5 --prefix db/ --codebook cb --out idx
  jasmk pairs --index idx --queries features.h5 --prefix query/ --topk 20 --out pairs.txt
  jasmk query idx queries.npz --topk 100 --out results.npz
  jasmk info idx
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default in its help (where it has one worth saying)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default:" in text or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _selection(p, *, query: bool = False):
    side = "query" if query else "db"
    p.add_argument("--prefix", f"--{side}-prefix", dest="prefix", default=None, metavar="PREFIX",
                   help="features.h5 only: the images whose name starts with PREFIX (hloc's "
                        f"--{side}_prefix; default: all)")
    p.add_argument("--list", f"--{side}-list", dest="list", default=None, metavar="TXT",
                   help=f"features.h5 only: the images named in this text file, one per line (hloc's --{side}_list)")


def _preset_option(p):
    p.add_argument("--preset", choices=sorted(presets.PRESETS), default="how",
                   help="parameters for a kind of local feature (docs/real_photos.md): how (HOW, also jasmk's "
                        "defaults), mast3r, or sift (RootSIFT made from raw SIFT, hloc's used as it is)")


def _database_options(p):
    """The preset, database multiple assignment and image selection of ``index`` and ``add``."""
    _preset_option(p)
    p.add_argument("--ma", type=int, default=None,
                   help="words per database descriptor (multiple assignment) (default: the preset's; how: 1)")
    _selection(p)


def _query_options(p, *, ma_help="words per query descriptor (multiple assignment)"):
    _preset_option(p)
    p.add_argument("--ma", type=int, default=None, help=f"{ma_help} (default: the preset's; how: 5)")
    p.add_argument("--alpha", type=float, default=None,
                   help="selectivity exponent of the match kernel (default: the preset's; how: 3)")
    p.add_argument("--threshold", type=float, default=None,
                   help="similarity threshold tau: word matches scoring at most this count for nothing (default: the "
                        "preset's; how: 0)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jasmk", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Help)
    ap.add_argument("--version", action="version", version=f"jasmk {jasmk.__version__}")
    talk = ap.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_true", help="print nothing on success: no progress, no summary line")
    talk.add_argument("--verbose", action="store_true", help="also print jasmk's info messages (on stderr)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_, description=None):
        p = sub.add_parser(name, help=help_, description=description or help_, formatter_class=_Help)
        p.set_defaults(func=func)
        return p

    p = command("codebook", _cmd_codebook, "train a codebook (k-means) on local descriptors")
    p.add_argument("feats", help="features.h5, .npy [N, D] or .npz with 'feats'")
    p.add_argument("--size", required=True, help="number of visual words: 1024, '64k', ...")
    p.add_argument("--niter", type=int, default=10, help="k-means iterations")
    p.add_argument("--seed", type=int, default=1234, help="k-means seed (faiss's; asmk's codebooks use 1234)")
    _selection(p)
    p.add_argument("--out", required=True, help="codebook checkpoint folder to write")

    p = command("index", _cmd_index, "build an index (inverted file) of database images")
    p.add_argument("feats", help="features.h5, or .npz with 'feats' [N, D] and 'ids' [N] (and 'names')")
    p.add_argument("--codebook", required=True, help="codebook checkpoint folder or asmk codebook .pkl")
    p.add_argument("--binary", action=argparse.BooleanOptionalAction, default=None,
                   help="ASMK* (packed sign bits); --no-binary: ASMK (real vectors) (default: the preset's; how: "
                        "ASMK*)")
    p.add_argument("--use-idf", action=argparse.BooleanOptionalAction, default=None,
                   help="weight words by inverse document frequency (default: the preset's; how: no)")
    _database_options(p)
    p.add_argument("--out", required=True, help="index checkpoint folder to write")

    p = command("add", _cmd_add, "add images to an index (saved over it, writing only what changed)")
    p.add_argument("index", help="index checkpoint folder")
    p.add_argument("feats", help="features.h5 (numbered after the index's images), or .npz with 'feats' and 'ids' "
                   "(larger than every id in the index)")
    _database_options(p)
    p.add_argument("--out", default=None, help="index checkpoint folder to write (default: the index itself)")

    p = command("query", _cmd_query, "rank database images for each query image")
    p.add_argument("index", help="index checkpoint folder")
    p.add_argument("qfeats", help="features.h5, or .npz with 'feats' and 'ids' of the query images")
    _query_options(p)
    p.add_argument("--topk", type=int, default=None, help="results per query (default: every database image)")
    _selection(p, query=True)
    p.add_argument("--out", required=True, help=".npz to write: ids, ranks, scores (and query_names, db_ids, "
                   "db_names with named images)")

    p = command("score-matrix", _cmd_score_matrix, "dense [n_query, n_db] score matrix")
    p.add_argument("index", help="index checkpoint folder")
    p.add_argument("qfeats", help="features.h5, or .npz with 'feats' and 'ids' of the query images")
    _query_options(p)
    _selection(p, query=True)
    p.add_argument("--out", required=True, help=".npy (the matrix) or .npz (scores, query_ids, db_ids and names)")

    p = command("pairs", _cmd_pairs, "image pairs: query -> database top-k (hloc) or the MASt3R-SfM scene graph",
                description="Image pairs to match. With --topk K: each query's K best database images, as hloc's "
                "'query_name db_name' lines (from --index with --queries, or from a score matrix or query results); "
                "a database image of the query's own name is left out. Without --topk: the MASt3R-SfM "
                "retrieval-Na-k scene graph of a square score matrix, or of --index with --feats.")
    p.add_argument("scores", nargs="?", default=None,
                   help=".npy / .npz score matrix (jasmk score-matrix) or .npz query results (jasmk query)")
    p.add_argument("--index", default=None, help="index checkpoint folder (instead of SCORES)")
    p.add_argument("--queries", default=None, help="with --index and --topk: query features (features.h5 or .npz); "
                   "the database's own features give exhaustive-like pairs, self excluded")
    p.add_argument("--feats", default=None, help="with --index, for the scene graph: features of the indexed images")
    p.add_argument("--topk", type=int, default=None, help="database images per query (query -> database pairs)")
    _query_options(p, ma_help="with --index: words per query descriptor (multiple assignment)")
    _selection(p, query=True)
    p.add_argument("--scene-graph", default="retrieval-20-10", help="retrieval-Na-k: Na key images, k neighbours")
    p.add_argument("--seed", type=int, default=0, help="seed of the scene graph's first key image")
    p.add_argument("--names", default=None, help="text file naming image id i on line i (both sides)")
    p.add_argument("--query-names", default=None, help="text file: one name per query row (--topk)")
    p.add_argument("--db-names", default=None, help="text file: one name per database column (--topk)")
    p.add_argument("--out", required=True, help=".txt pairs file, or .npy [P, 2] (scene graph only)")

    p = command("info", _cmd_info, "what an index, codebook or features file holds")
    p.add_argument("path", help="index or codebook checkpoint folder, asmk codebook .pkl, features.h5, .npy or .npz")
    p.add_argument("--json", action="store_true", help="print JSON instead of aligned lines")

    p = command("show", _cmd_show, "PNG pictures: queries with their top results, score matrix heat map")
    p.add_argument("results", help=".npz from 'jasmk query' (ids, ranks, scores) or .npy from 'jasmk score-matrix'")
    p.add_argument("--images", default=None, help="text file: one database image path per line, in id order "
                   "(relative paths are read from the file's folder)")
    p.add_argument("--query-images", default=None, help="text file: one query image per query row (default: the "
                   "queries are database images, query id i is line i of --images)")
    p.add_argument("--gnd", default=None, help="ground truth marking the results: .json list of {easy, hard, junk} "
                   "dicts (or {\"gnd\": [...]}) or a revisited gnd_*.pkl")
    p.add_argument("--image-dir", default=None, help="folder the index's image names are relative to (hloc's image "
                   "folder): results of a named index need no --images")
    p.add_argument("--protocol", choices=("easy", "medium", "hard"), default="medium",
                   help="revisited protocol of the marking: green positive, red wrong, yellow junk")
    p.add_argument("--topk", type=int, default=5, help="results per query in the grid")
    p.add_argument("--max-queries", type=int, default=8, help="query rows in the grid (the first ones)")
    p.add_argument("--scale", choices=("row", "log", "linear"), default="row",
                   help="heat map colours: each row over its best other image, log10 of the score, or the raw score")
    p.add_argument("--grid", default=None, help="results grid .png to write (needs --images)")
    p.add_argument("--heatmap", default=None, help="score matrix heat map .png to write (score matrix input only)")
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
    say.setLevel(logging.WARNING if args.quiet else logging.INFO)
    _persistent_compilation_cache()
    try:
        args.func(args)
    except ImportError as exc:  # an optional dependency: the message says which extra to install
        log.debug("failed", exc_info=True)
        parser.exit(2, f"jasmk: error: {exc}\n")
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
